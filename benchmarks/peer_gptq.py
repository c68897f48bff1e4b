"""A peer's GPTQ (llm-compressor or GPTQModel) on the same model, text and calibration as qe:
wall time and perplexity, for a same-run ratio against benchmarks/quantize_time.py
(docs/protocol.md, other tools).

Two steps, because the peers pin other packages than qe:

1. in qe's environment, export what the peer needs (the embedded default's language model as a
   plain transformers checkpoint, qe's 64 calibration windows and the held-out windows as
   token ids; nothing of qe is imported by step 2):

       .venv/bin/python benchmarks/peer_gptq.py export --dir /tmp/peer

2. in a separate environment (python -m venv /tmp/peer-venv; /tmp/peer-venv/bin/pip install
   torch==2.13.0 llmcompressor==0.14.0.1), quantize with the peer at one intra-op thread and
   score it:

       /tmp/peer-venv/bin/python benchmarks/peer_gptq.py run --dir /tmp/peer --group-size 64

   GPTQModel (the only peer that takes g128 on 576-wide layers; python -m venv /tmp/gm-venv;
   /tmp/gm-venv/bin/pip install torch==2.13.0 gptqmodel==7.6.0; it needs
   GPTQMODEL_CPU_WORKERS set on a 2-core machine) the same way with ``--tool gptqmodel``. Its
   checkpoint is saved and reloaded through GPTQModel, and the fp32 model is scored with the
   linears GPTQModel dequantizes (its CPU kernels do not score this model in fp32); the wall
   time covers ``quantize()`` only, as for llm-compressor's ``oneshot``.

Run step 2 beside ``quantize_time.py --threads 1`` (two single-threaded processes on the two
cores) to put both under the same conditions; each writes its own JSON. Name them
``qe_<tag>_run<i>.json`` and ``<peer>_<tag>_run<i>.json`` (peer: llmcompressor or gptqmodel)
in one folder, then

       .venv/bin/python benchmarks/peer_gptq.py summarize --dir benchmarks/results/gptq_wall_time

prints each pair's ratio and the medians, and writes pairs.csv and summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

# _common needs the standard library only, so this also imports in the peer's environment.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, print_table, write_csv


def export(out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from transformers import LlamaForCausalLM

    from qe.data.calibration import calibration_set
    from qe.evaluation.perplexity import heldout_windows
    from qe.models.default_model import load_smollm2_from_gguf
    from qe.models.loading import load_model

    out.mkdir(parents=True, exist_ok=True)
    lm, tokenizer = load_smollm2_from_gguf()
    config = lm.config
    if hasattr(config, "quantization_config"):  # the GGUF loader's marker; the weights are plain fp32 now
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(lm.state_dict())
    plain.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    loaded = load_model(None)
    _, encoded = calibration_set(loaded, "pydoc", 64, False)
    (out / "calib.json").write_text(json.dumps([e.inputs["input_ids"][0].tolist() for e in encoded]))
    (out / "eval.json").write_text(json.dumps([w.tolist() for w in heldout_windows(loaded.tokenizer)]))
    print(f"exported model, {len(encoded)} calibration windows and the held-out windows to {out}")


PEERS = ("llmcompressor", "gptqmodel")  # file-name prefixes of the peers' JSON results


def _score(model, windows) -> tuple[float, int]:
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), 8):
            batch = torch.tensor(windows[i:i + 8])
            logits = model(input_ids=batch).logits.float()
            nll += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                           batch[:, 1:].reshape(-1), reduction="sum"))
            count += batch[:, 1:].numel()
    return math.exp(nll / count), count


def _write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"{result['tool']} GPTQ {result['setting']}: {result['quantize_s']:.1f} s with {result['threads']} thread(s), "
          f"perplexity {result['ppl']:.3f}; wrote {out}")


def run(directory: Path, group_size: int, threads: int, out: Path, samples: int = 64, eval_windows: int | None = None) -> None:
    import torch

    torch.set_num_threads(threads)
    import llmcompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory / "model", dtype=torch.float32)
    ids = json.loads((directory / "calib.json").read_text())[:samples]
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})
    strategy = "group" if group_size else "channel"
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy=strategy,
                               group_size=group_size or None)
    recipe = GPTQModifier(config_groups={"g": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head"])
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=512, num_calibration_samples=len(ids),
            shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    ppl, count = _score(model, json.loads((directory / "eval.json").read_text())[:eval_windows])
    _write(out, {"tool": f"llm-compressor {llmcompressor.__version__}", "setting": f"W4A16 {strategy} {group_size or ''}",
                 "threads": threads, "calibration_windows": len(ids), "quantize_s": seconds, "ppl": ppl,
                 "eval_tokens": count, "load_avg_before": load_before, "load_avg_after": os.getloadavg()[0]})


def run_gptqmodel(directory: Path, group_size: int, threads: int, out: Path, samples: int = 64,
                  eval_windows: int | None = None) -> None:
    import tempfile

    import torch

    torch.set_num_threads(threads)
    import gptqmodel
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from transformers import AutoModelForCausalLM

    ids = json.loads((directory / "calib.json").read_text())[:samples]
    calibration = [{"input_ids": x, "attention_mask": [1] * len(x)} for x in ids]
    config = QuantizeConfig(bits=4, group_size=group_size or -1, sym=True)
    model = GPTQModel.load(str(directory / "model"), config, device="cpu", dtype=torch.float32)
    load_before = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    model.quantize(calibration, batch_size=1)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    with tempfile.TemporaryDirectory() as saved:
        model.save(saved)
        del model
        # Scored in fp32 like every other row: the saved codes and scales, dequantized by
        # GPTQModel's own module, replace the linears of the fp32 model. Its CPU kernels do not
        # score directly: the fused one needs the input width to be a multiple of the group
        # size (576 is not one of 128), the plain torch one refuses fp32.
        quantized = GPTQModel.load(saved, device="cpu", dtype=torch.float16, backend=BACKEND.GPTQ_TORCH)
        reference = AutoModelForCausalLM.from_pretrained(directory / "model", dtype=torch.float32)
        replaced, rel_err = 0, []
        with torch.no_grad():
            for name, module in quantized.model.named_modules():
                if hasattr(module, "qweight") and hasattr(module, "dequantize_weight"):
                    target = reference.get_submodule(name)
                    W = module.dequantize_weight().T.float()  # GPTQ layout is (in, out)
                    rel_err.append(float((W - target.weight).norm() / target.weight.norm()))
                    target.weight.copy_(W)
                    replaced += 1
        del quantized
        expected = sum(isinstance(m, torch.nn.Linear) and ".layers." in n for n, m in reference.named_modules())
        if replaced != expected:  # scoring a partly replaced model would pass the fp32 model off as quantized
            raise SystemExit(f"GPTQModel's checkpoint gave {replaced} quantized linears, the decoder has {expected}")
        ppl, count = _score(reference, json.loads((directory / "eval.json").read_text())[:eval_windows])
    strategy = f"group {group_size}" if group_size else "channel"
    _write(out, {"tool": f"GPTQModel {gptqmodel.__version__}", "setting": f"W4A16 {strategy}",
                 "config": {k: str(v) for k, v in sorted(vars(config).items()) if not k.startswith("_")},
                 "threads": threads, "calibration_windows": len(ids), "quantize_s": seconds, "ppl": ppl,
                 "quantize_cpu_s": cpu_seconds,  # well above quantize_s means its workers used more than one core
                 "cpu_workers": os.environ.get("GPTQMODEL_CPU_WORKERS"),
                 "eval_tokens": count, "linears_scored": replaced,
                 "weight_rel_error_median": median(rel_err),
                 "load_avg_before": load_before, "load_avg_after": os.getloadavg()[0]})


def summarize(directory: Path) -> None:
    """Pair the runs written beside each other (``qe_<tag>_run<i>.json`` with
    ``<peer>_<tag>_run<i>.json``): per-run ratio, medians; print and write CSV + JSON."""
    import statistics

    rows = []
    for peer_file in sorted(p for peer in PEERS for p in directory.glob(f"{peer}_*_run*.json")):
        peer_name, tag, run = peer_file.stem.split("_")[:3]
        qe_file = directory / peer_file.name.replace(f"{peer_name}_", "qe_", 1)
        if not qe_file.exists():
            continue
        run = run.removeprefix("run")
        peer, ours = json.loads(peer_file.read_text()), json.loads(qe_file.read_text())
        rows.append({"peer": peer_name, "setting": tag, "run": run, "qe_s": round(ours["quantize_s"], 1),
                     "peer_s": round(peer["quantize_s"], 1), "ratio": round(ours["quantize_s"] / peer["quantize_s"], 3),
                     "peer_ppl": round(peer["ppl"], 3)})
    if not rows:
        raise SystemExit(f"no paired runs in {directory}: run step 2 beside quantize_time.py first")
    summary = []
    for peer_name, tag in sorted({(r["peer"], r["setting"]) for r in rows}):
        mine = [r for r in rows if (r["peer"], r["setting"]) == (peer_name, tag)]
        summary.append({"peer": peer_name, "setting": tag, "runs": len(mine),
                        "qe_median_s": statistics.median(r["qe_s"] for r in mine),
                        "peer_median_s": statistics.median(r["peer_s"] for r in mine),
                        "median_ratio": statistics.median(r["ratio"] for r in mine)})
    write_csv(directory / "pairs.csv", rows)
    (directory / "summary.json").write_text(json.dumps({"pairs": rows, "summary": summary}, indent=1))
    print_table(rows, list(rows[0]))
    print()
    print_table(summary, list(summary[0]))
    print(f"wrote {directory}/pairs.csv and summary.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["export", "run", "summarize"])
    ap.add_argument("--tool", choices=PEERS, default="llmcompressor", help="the peer that step 2 runs")
    ap.add_argument("--dir", default="/tmp/peer", help="where step 1 writes and step 2 reads (summarize: the runs)")
    ap.add_argument("--group-size", type=int, default=64, help="0 for per channel")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--samples", type=int, default=64, help="calibration windows (64 is the protocol; fewer to smoke-test)")
    ap.add_argument("--eval-windows", type=int, default=None, help="held-out windows to score (default all 88)")
    args = ap.parse_args()
    directory = Path(args.dir)
    if args.step == "export":
        export(directory)
    elif args.step == "summarize":
        summarize(directory)
    else:
        out = Path(args.out or f"benchmarks/results/gptq_wall_time/{args.tool}_g{args.group_size}.json")
        runner = run_gptqmodel if args.tool == "gptqmodel" else run
        runner(directory, args.group_size, args.threads, out, args.samples, args.eval_windows)


if __name__ == "__main__":
    main()
