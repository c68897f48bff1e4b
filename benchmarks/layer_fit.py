"""Single-layer fit benchmark: fit time and held-out error of lowrank-64 vs Quant Experts.

On real activations of the embedded default model's language model (SmolLM2-135M; text-only
windows of the benchmark protocol's pydoc text: calibration tokens from the first 60%,
held-out tokens from the last 40%), or on synthetic activations with ``--synthetic``. For
each chosen linear:

* statistics as the pipeline streams them (``InputStats``, ``ImportanceStats`` with the
  paper's act-weight estimator, k = 32);
* the QE base: C_s exempted, α chosen from QE's grid by ``qe.transforms.smoothing.choose_alpha`` at the
  first ``--a-bits`` value (one linear per group here; the pipeline sums a group's linears);
* fits, timed (wall and CPU seconds, given the statistics and tokens): lowrank-64 on the
  plain base, lowrank-64 on QE's base, and qe (default config), plus ``--extra`` ones;
* relative output error ``‖Y − Ŷ‖² / ‖Y‖²`` on held-out tokens through ``QuantLinear`` (the
  deployed forward: per-token activation quantization, exempt channels zeroed), per A-bits;
* the deployed layer's forward on ``--forward-tokens`` held-out tokens at the first A-bits
  (torch path, median wall ms, all of a layer's variants timed round-robin in one run), and
  QE's ratio to lowrank-64 per shape.

Prints a table and writes JSON. Keep it short on a shared machine:

    python benchmarks/layer_fit.py --calib-tokens 8192 --heldout-tokens 4096 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table

LINEARS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "down": "mlp.down_proj"}


def capture_real(blocks: list[int], linears: list[str], calib_tokens: int, heldout_tokens: int):
    """Inputs of the chosen linears on calibration and held-out text windows."""
    from qe.data.text import (
        calibration_windows,
        eval_windows,
        pydoc_text,
        split_tokens,
        tokenize_text,
    )
    from qe.models.loading import load_model

    loaded = load_model(None)
    model = loaded.model.eval()
    ids = tokenize_text(loaded.tokenizer, pydoc_text())
    split = split_tokens(ids)
    windows = {"calib": calibration_windows(split.calib_ids, n=max(1, calib_tokens // 512)),
               "heldout": eval_windows(split.eval_ids, max_tokens=heldout_tokens)}
    decoder = loaded.adapter.decoder_blocks(model)
    captured: dict[tuple[int, str], dict[str, list[torch.Tensor]]] = {}
    current = {"part": "calib"}
    handles = []
    for b in blocks:
        for lin in linears:
            key = (b, lin)
            captured[key] = {"calib": [], "heldout": []}
            module = decoder[b].get_submodule(LINEARS[lin])

            def hook(mod, args, key=key):
                captured[key][current["part"]].append(args[0].detach().reshape(-1, args[0].shape[-1]).float().clone())

            handles.append(module.register_forward_pre_hook(hook))
    weights = {(b, lin): decoder[b].get_submodule(LINEARS[lin]).weight.detach().float().clone() for b in blocks for lin in linears}
    with torch.no_grad():
        for part, wins in windows.items():
            current["part"] = part
            for w in wins:
                model(input_ids=torch.as_tensor(w)[None])
    for h in handles:
        h.remove()
    return {key: (weights[key], torch.cat(v["calib"]), torch.cat(v["heldout"])) for key, v in captured.items()}


def synthetic(shapes: list[tuple[int, int]], calib_tokens: int, heldout_tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for d_in, d_out in shapes:
        scale = torch.ones(d_in)
        scale[torch.randperm(d_in, generator=g)[:8]] = 20
        boost = torch.ones(8, d_in)
        for i in range(8):
            boost[i, torch.randperm(d_in, generator=g)[:32]] = 4
        T = calib_tokens + heldout_tokens
        X = torch.randn(T, d_in, generator=g) * scale * boost[torch.randint(8, (T,), generator=g)]
        out[(f"{d_in}x{d_out}", "syn")] = (torch.randn(d_out, d_in, generator=g) * 0.02, X[:calib_tokens], X[calib_tokens:])
    return out


def layer_context(name, W, X, k, alpha=None):
    from qe.analysis.estimators import ActWeight
    from qe.analysis.statistics import ImportanceStats, InputStats, LinearStats
    from qe.compensators.base import LayerContext
    from qe.settings import parse_setting
    from qe.transforms import smoothing

    d_in = W.shape[1]
    est = ActWeight()
    inp = InputStats(d_in, sample_positions=torch.arange(X.shape[0]))
    imp = ImportanceStats(d_in, k, est.prepare(W), est)
    mod = torch.zeros(X.shape[0], dtype=torch.int8)
    for s in range(0, X.shape[0], 4096):
        inp.update(X[s : s + 4096], mod[s : s + 4096], s)
        imp.update(X[s : s + 4096], mod[s : s + 4096], s)
    stats = LinearStats(name, inp, imp)
    scale = None if alpha is None else smoothing.smoothing_scales(inp.absmax, [W], alpha)
    tokens, H, W_s = inp.sample, inp.xtx, W
    if scale is not None:
        tokens, H, W_s = smoothing.smooth_tokens(tokens, scale), smoothing.smooth_hessian(H, scale), smoothing.smooth_weight(W, scale)
    return LayerContext(name, 0, W_s, None, parse_setting("W4A8"), stats, hessian=H, tokens=tokens,
                        token_modality=inp.sample_modality, input_scale=scale, seed=0)


def held_out_errors(W, X_held, q, plan, module, scale, a_bits_list):
    from qe.quantizers.qlinear import QuantLinear

    Y = X_held @ W.T
    out = {}
    for a_bits in a_bits_list:
        ql = QuantLinear.from_quantized(q, a_bits=a_bits, input_scale=scale, act_exempt=plan.act_exempt, compensator=module)
        with torch.no_grad():
            out[f"A{a_bits}"] = float((Y - ql(X_held)).double().pow(2).sum() / Y.double().pow(2).sum())
    return out


def time_forwards(layers: dict, x: torch.Tensor, repeats: int = 15) -> dict:
    """Median wall milliseconds of each ``QuantLinear`` forward on ``x``, the layers timed
    round-robin (one call of each per round) so that load on a shared machine hits them alike."""
    times = {name: [] for name in layers}
    with torch.no_grad():
        for _ in range(3):  # warm-up
            for ql in layers.values():
                ql(x)
        for _ in range(repeats):
            for name, ql in layers.items():
                t = time.perf_counter()
                ql(x)
                times[name].append((time.perf_counter() - t) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", action="store_true", help="synthetic activations of the default model's shapes")
    ap.add_argument("--blocks", default="2,12,24")
    ap.add_argument("--linears", default="q,gate,down")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--heldout-tokens", type=int, default=4096)
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", default="6,8")
    ap.add_argument("--extra", default="", help="more compensators, comma list, e.g. qe[mode=oracle-routing]")
    ap.add_argument("--forward-tokens", type=int, default=512, help="held-out tokens of the timed forward")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/layer_fit.json")
    ap.add_argument("--summarize", metavar="JSON", help="only recompute the summary of an earlier run's JSON")
    args = ap.parse_args()
    if args.summarize:
        data = json.loads(Path(args.summarize).read_text())
        a_bits = [int(a) for a in data["args"]["a_bits"].split(",")]
        data["summary"] = summarize(data["rows"], a_bits)
        Path(args.summarize).write_text(json.dumps(data, indent=1))
        print("\n".join(data["summary"]["lines"]))
        return
    torch.set_num_threads(args.threads)

    from qe.compensators.base import LayerPlan
    from qe.plugins import QEPluginManager, split_plugin_list
    from qe.quantizers.grid import quantize_rtn
    from qe.quantizers.qlinear import QuantLinear
    from qe.transforms import smoothing

    a_bits_list = [int(a) for a in args.a_bits.split(",")]
    t0 = time.perf_counter()
    if args.synthetic:
        data = synthetic([(576, 576), (576, 1536), (1536, 576)], args.calib_tokens, args.heldout_tokens)
    else:
        data = capture_real([int(b) for b in args.blocks.split(",")], args.linears.split(","), args.calib_tokens, args.heldout_tokens)
    print(f"activations ready in {time.perf_counter() - t0:.1f} s")
    pm = QEPluginManager(load_entry_points=False)
    specs = ["lowrank[rank=64]", "lowrank[rank=64;on_qe_base=true]", "qe"] + split_plugin_list(args.extra)
    rows = []
    for (block, lin), (W, X_cal, X_held) in data.items():
        name = f"{block}.{lin}"
        plain = layer_context(name, W, X_cal, 32)
        q_plain = quantize_rtn(W, args.w_bits, 0, True)
        base = held_out_errors(W, X_held, q_plain, LayerPlan(), None, None, a_bits_list)
        rows.append({"layer": name, "shape": f"{W.shape[1]}->{W.shape[0]}", "compensator": "none", **base})
        deployed = {"none": QuantLinear.from_quantized(q_plain, a_bits=a_bits_list[0])}
        for spec in specs:
            comp = pm.create("compensator", spec)
            comp.plan(plain)  # warms lazy imports outside the timed fit
            plan = comp.plan(plain)
            alpha = None
            if comp.smoothing_candidates():
                def quantize_fn(w_s, h_s, exempt):
                    return quantize_rtn(w_s, args.w_bits, 0, True, exempt).dequantize()

                alpha = smoothing.choose_alpha(comp.smoothing_candidates(), plain.stats.input.absmax, [W], X_cal,
                                                  quantize_fn, a_bits_list[0], exempt=plan.exempt, act_exempt=plan.act_exempt).alpha
            ctx = layer_context(name, W, X_cal, 32, alpha)
            q = quantize_rtn(ctx.weight, args.w_bits, 0, True, plan.exempt)
            wall, cpu = time.perf_counter(), time.process_time()
            module = comp.fit(ctx, q, plan)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            row = {"layer": name, "shape": f"{W.shape[1]}->{W.shape[0]}", "compensator": spec, "alpha": alpha,
                   "fit_s": wall, "fit_cpu_s": cpu}
            row.update(held_out_errors(W, X_held, q, plan, module, ctx.input_scale, a_bits_list))
            figs = getattr(module, "fit_figures", {})
            for key in ("router_agreement", "residual_router", "residual_oracle", "residual_shared"):
                if key in figs:
                    row[key] = figs[key]
            if "cpu_seconds_by_step" in figs:
                row["cpu_by_step"] = {k: round(v, 3) for k, v in figs["cpu_seconds_by_step"].items()}
            rows.append(row)
            deployed[spec] = QuantLinear.from_quantized(q, a_bits=a_bits_list[0], input_scale=ctx.input_scale,
                                                        act_exempt=plan.act_exempt, compensator=module)
            print_table([row], ["layer", "compensator", "alpha", "fit_s", "fit_cpu_s", *[f"A{a}" for a in a_bits_list], "router_agreement"])
        forward_ms = time_forwards(deployed, X_held[: args.forward_tokens])
        for r in rows:
            if r["layer"] == name:
                r["forward_ms"] = forward_ms[r["compensator"]]
    cols = ["layer", "shape", "compensator", "alpha", "fit_s", "fit_cpu_s", *[f"A{a}" for a in a_bits_list],
            "router_agreement", "forward_ms"]
    print()
    print_table(rows, cols)
    summary = summarize(rows, a_bits_list)
    for line in summary["lines"]:
        print(line)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "args": vars(args), "rows": rows, "summary": summary}, indent=1))
    print(f"wrote {out}")


def summarize(rows, a_bits_list):
    """Geometric-mean error ratios of every compensator to lowrank-64 on QE's base (the
    baseline that isolates routing), and QE's fit-time ratio to lowrank-64 per shape."""
    import math

    reference = "lowrank[rank=64;on_qe_base=true]"
    by = {(r["layer"], r["compensator"]): r for r in rows}
    layers = sorted({r["layer"] for r in rows})
    compensators = list(dict.fromkeys(r["compensator"] for r in rows))
    lines, out = [], {}
    for a in a_bits_list:
        for comp in compensators:
            ratios = [by[(l, comp)][f"A{a}"] / by[(l, reference)][f"A{a}"] for l in layers
                      if (l, comp) in by and (l, reference) in by]
            if ratios and comp != reference:
                gm = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
                out[f"A{a}:{comp}/{reference}"] = gm
                lines.append(f"A{a}: {comp} / lowrank-64 (QE base): geometric mean {gm:.3f} (range {min(ratios):.3f}–{max(ratios):.3f})")
    for s in sorted({r["shape"] for r in rows}):
        lr_t = [r["fit_cpu_s"] for r in rows if r["shape"] == s and r["compensator"] == "lowrank[rank=64]"]
        for comp in compensators:
            if not comp.startswith("qe"):
                continue
            qe_t = [r["fit_cpu_s"] for r in rows if r["shape"] == s and r["compensator"] == comp]
            if qe_t and lr_t:
                ratio = (sum(qe_t) / len(qe_t)) / (sum(lr_t) / len(lr_t))
                out[f"fit_cpu_ratio:{comp}:{s}"] = ratio
                lines.append(f"{s}: {comp} fit {sum(qe_t) / len(qe_t):.2f} s CPU vs lowrank-64 {sum(lr_t) / len(lr_t):.2f} s CPU: {ratio:.1f}×")
    for s in sorted({r["shape"] for r in rows}):
        fwd = {r["compensator"]: [] for r in rows}
        for r in rows:
            if r["shape"] == s and "forward_ms" in r:
                fwd[r["compensator"]].append(r["forward_ms"])
        lr = fwd.get("lowrank[rank=64]")
        for comp in compensators:
            if comp.startswith("qe") and fwd.get(comp) and lr:
                ratio = statistics.median(fwd[comp]) / statistics.median(lr)
                out[f"forward_ratio:{comp}:{s}"] = ratio
                lines.append(f"{s}: {comp} forward {statistics.median(fwd[comp]):.2f} ms vs lowrank-64 "
                             f"{statistics.median(lr):.2f} ms: {ratio:.2f}× (none: {statistics.median(fwd['none']):.2f} ms)")
    return {"lines": lines, **out}


if __name__ == "__main__":
    main()
