"""Latency of the quantized linear kernels on the linear shapes of Qwen2-VL-2B and -7B.

    python benchmarks/kernel_speed.py [--out DIR] [--tokens 1 16 128 2048] [--models 2b 7b]

On a CUDA GPU (triton installed) it times, per linear shape and token count, the median over
``--repeats`` runs (CUDA events, after ``--warmup`` runs that also let the autotuner settle):

* ``fp16``: cuBLAS ``F.linear`` with fp16 weights and activations;
* ``w4a8_gemm``: the W4A8 GEMM kernel alone (int8 codes and scales given);
* ``w4a8_layer``: activation quantization + the GEMM (a QuantLinear without compensator);
* ``qe_layer``: the full QE layer (prologue with shared down-projection and router, GEMM with
  the shared term in its epilogue, grouped routed experts), r_s = 32, N_r = 8, r_r = 32.

TFLOP/s counts the dense GEMM's ``2·T·d_in·d_out`` for every variant, so the figures compare
time on the same work. Targets: the QE layer within 1.3× the W4A8 GEMM at 2048 tokens, and
faster than fp16 cuBLAS at 1 token.

Without CUDA the script times the torch twins on a small subset on the CPU, says that GPU
figures need a GPU, and exits 0. It is a benchmark, not a test: run it by hand.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from qe.kernels import QELinearWeights, backend, qe_linear, quantize_activations, quantized_linear
from qe.packing import pack

# (linear names, d_in, d_out) of the decoder linears; q/o, k/v and gate/up share shapes.
MODELS = {
    "2b": ("Qwen2-VL-2B", [("q_proj,o_proj", 1536, 1536), ("k_proj,v_proj", 1536, 256),
                           ("gate_proj,up_proj", 1536, 8960), ("down_proj", 8960, 1536)]),
    "7b": ("Qwen2-VL-7B", [("q_proj,o_proj", 3584, 3584), ("k_proj,v_proj", 3584, 512),
                           ("gate_proj,up_proj", 3584, 18944), ("down_proj", 18944, 3584)]),
}
QE_RANKS = dict(shared_rank=32, experts=8, expert_rank=32)
CPU_SUBSET = {"models": ["2b"], "shapes": 2, "tokens": [1, 16], "repeats": 3}
QE_OVER_W4A8_TARGET = 1.3


@dataclass
class Row:
    model: str
    linears: str
    d_in: int
    d_out: int
    tokens: int
    variant: str
    device: str
    backend: str
    median_ms: float
    tflops: float


def layer_weights(d_in: int, d_out: int, device: str, gen: torch.Generator) -> tuple[QELinearWeights, torch.Tensor]:
    """Random W4A8 per-channel symmetric weights with a QE compensator, and an fp16 weight."""
    codes = torch.randint(0, 16, (d_out, d_in), generator=gen)
    scales = torch.rand(d_out, 1, generator=gen) * 0.01 + 1e-3
    w16 = ((codes - 8) * scales).half()
    r_s, n, r = QE_RANKS["shared_rank"], QE_RANKS["experts"], QE_RANKS["expert_rank"]

    def randn(*shape, fan_in):
        return (torch.randn(*shape, generator=gen) / fan_in**0.5).half().to(device)

    w = QELinearWeights(
        qweight=pack(codes, 4).to(device), scales=scales.to(device), zeros=torch.full((d_out, 1), 8.0, device=device),
        bits=4, group_size=0, symmetric=True, a_bits=8,
        input_scale=(torch.rand(d_in, generator=gen) + 0.5).to(device),
        act_keep=(torch.rand(d_in, generator=gen) > 32 / d_in).to(device),
        shared_a=randn(d_out, r_s, fan_in=r_s), shared_b=randn(r_s, d_in, fan_in=d_in),
        router=torch.rand(n, d_in, generator=gen).half().to(device),
        routed_a=randn(n, d_out, r, fan_in=r), routed_b=randn(n, r, d_in, fan_in=d_in),
    )
    return w, w16.to(device)


def time_ms(fn, repeats: int, warmup: int, cuda: bool) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(models: list[str], tokens: list[int], repeats: int, warmup: int, max_shapes: int | None) -> list[Row]:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32  # CPU matmuls in fp16 are slow and not the point
    gen = torch.Generator().manual_seed(0)
    rows = []
    for key in models:
        model, shapes = MODELS[key]
        for linears, d_in, d_out in shapes[:max_shapes]:
            w, w16 = layer_weights(d_in, d_out, device, gen)
            w16 = w16.to(dtype)
            for t in tokens:
                x = torch.randn(t, d_in, generator=gen).to(dtype).to(device)
                codes, x_scales = quantize_activations(x, 8, w.input_scale, w.act_keep)
                variants = {
                    "fp16" if cuda else "fp32": lambda: F.linear(x, w16),
                    "w4a8_gemm": lambda: quantized_linear(codes, x_scales, w.qweight, w.scales, w.zeros, bits=4,
                                                          group_size=0, symmetric=True, out_dtype=dtype),
                    "w4a8_layer": lambda: quantized_linear(*quantize_activations(x, 8, w.input_scale, w.act_keep),
                                                           w.qweight, w.scales, w.zeros, bits=4, group_size=0,
                                                           symmetric=True, out_dtype=dtype),
                    "qe_layer": lambda: qe_linear(x, w),
                }
                flops = 2.0 * t * d_in * d_out
                for name, fn in variants.items():
                    ms = time_ms(fn, repeats, warmup, cuda)
                    rows.append(Row(model, linears, d_in, d_out, t, name, device,
                                    ("cublas" if cuda else "torch") if name.startswith("fp") else backend(), ms, flops / (ms * 1e-3) / 1e12))
                    print(f"{model:12s} {linears:18s} {d_in:6d}→{d_out:<6d} T={t:<5d} {name:11s} "
                          f"{ms:9.3f} ms {rows[-1].tflops:8.3f} TFLOP/s", flush=True)
    return rows


def targets(rows: list[Row]) -> list[dict]:
    """The two targets per linear shape, where the measured token counts allow them."""
    by_key = {(r.model, r.linears, r.tokens, r.variant): r.median_ms for r in rows}
    out = []
    for model, linears in sorted({(r.model, r.linears) for r in rows}):
        qe_big, gemm_big = by_key.get((model, linears, 2048, "qe_layer")), by_key.get((model, linears, 2048, "w4a8_gemm"))
        if qe_big and gemm_big:
            ratio = qe_big / gemm_big
            out.append({"model": model, "linears": linears, "target": f"qe_layer ≤ {QE_OVER_W4A8_TARGET}× w4a8_gemm @ 2048",
                        "value": round(ratio, 3), "met": ratio <= QE_OVER_W4A8_TARGET})
        qe_one, fp16_one = by_key.get((model, linears, 1, "qe_layer")), by_key.get((model, linears, 1, "fp16"))
        if qe_one and fp16_one:
            ratio = qe_one / fp16_one
            out.append({"model": model, "linears": linears, "target": "qe_layer < fp16 cuBLAS @ 1 token",
                        "value": round(ratio, 3), "met": ratio < 1.0})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for kernels.csv and kernels.json")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 128, 2048])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if cuda:
        models, tokens, repeats, max_shapes = args.models, args.tokens, args.repeats, None
        print(f"GPU: {torch.cuda.get_device_name()} · kernels backend: {backend()}")
    else:
        models, tokens, repeats, max_shapes = (CPU_SUBSET["models"], CPU_SUBSET["tokens"], CPU_SUBSET["repeats"],
                                               CPU_SUBSET["shapes"])
        print("No CUDA device: GPU figures need a GPU. Timing the torch twins on the CPU on a small subset "
              f"({CPU_SUBSET}); these CPU figures say nothing about the Triton kernels' speed.")
    rows = run(models, tokens, repeats, 1 if not cuda else args.warmup, max_shapes)
    met = targets(rows) if cuda else []
    for t in met:
        print(f"target {t['model']} {t['linears']}: {t['target']}: {t['value']} → {'met' if t['met'] else 'NOT met'}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "kernels.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
        meta = {"gpu": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__,
                "python": platform.python_version(), "qe_ranks": QE_RANKS, "repeats": repeats,
                "note": None if cuda else "CPU run of the torch twins: GPU figures need a GPU"}
        (args.out / "kernels.json").write_text(json.dumps(
            {"meta": meta, "rows": [asdict(r) for r in rows], "targets": met}, indent=2, ensure_ascii=False))
        print(f"wrote {args.out / 'kernels.csv'} and {args.out / 'kernels.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
