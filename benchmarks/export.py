"""``qe export``: wall time and sizes on disk against qe's own checkpoint (issue #19).

For each composition the model is quantized once (qe checkpoint), exported (compressed-tensors
base, plus a PEFT LoRA adapter where the compensator has low-rank terms), and the sizes of the
safetensors files are compared. For QE checkpoints the export also measures the perplexity of
qe's model with and without its routed experts (what dropping routing costs the adapter).

    python benchmarks/export.py                      # tiny:llava, four compositions
    python benchmarks/export.py --model default --samples 16 --eval-tokens 8192

Writes benchmarks/results/export[-<model>].json and .csv and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table

# (label, compensator, setting, export format). QE's smoothing is off (alphas=none): with
# grouped-query attention, o_proj's smoothing scales cannot fold into v_proj (see
# docs/export-format.md), and such a checkpoint is refused.
CELLS = [
    ("rtn+lowrank-8@W4A16g32", "lowrank[rank=8]", "W4A16g32", "peft-lora"),
    ("rtn+qe@W4A16g32", "qe[k=4;num_experts=4;shared_rank=8;expert_rank=4;alphas=none]", "W4A16g32sym", "peft-lora"),
    ("rtn+lowrank-8@W8A8", "lowrank[rank=8]", "W8A8", "peft-lora"),
    ("rtn+none@W4A8", "none", "W4A8", "compressed-tensors"),
]
DEFAULT_CELLS = [  # the embedded default (SmolLM2-135M): the QE default ranks, no smoothing
    ("rtn+lowrank-64@W4A16g64", "lowrank[rank=64]", "W4A16g64", "peft-lora"),
    ("rtn+qe@W4A16g64", "qe[k=32;num_experts=8;alphas=none]", "W4A16g64sym", "peft-lora"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny:llava", help="tiny:llava (default) or default (the embedded SmolLM2)")
    ap.add_argument("--samples", type=int, default=4, help="calibration samples per quantization")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens for the routed-expert perplexity")
    ap.add_argument("--out", default=None, help="results stem (default benchmarks/results/export[-model])")
    args = ap.parse_args()

    from qe.commands.quantize import run_quantize
    from qe.export.core import export_checkpoint
    from qe.models.loading import load_model
    from qe.recipe import Recipe

    model = None if args.model == "default" else args.model
    cells = DEFAULT_CELLS if model is None else CELLS
    stem = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / (
        "export" if args.model == "tiny:llava" else f"export-{args.model.replace(':', '_')}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, compensator, setting, fmt in cells:
            loaded = load_model(model)
            ckpt = Path(tmp) / f"{len(rows)}-ckpt"
            t0 = time.perf_counter()
            run_quantize(Recipe(quantizer="rtn", compensator=compensator, setting=setting, samples=args.samples),
                         out=ckpt, loaded=loaded, progress=False)
            quantize_s = time.perf_counter() - t0
            del loaded
            t0 = time.perf_counter()
            out, report = export_checkpoint(ckpt, fmt, Path(tmp) / f"{len(rows)}-export", eval_tokens=args.eval_tokens)
            export_s = time.perf_counter() - t0
            ppl = report.get("perplexity") or {}
            b = report["bytes"]
            row = {
                "cell": label, "format": fmt, "quantize_s": round(quantize_s, 2), "export_s": round(export_s, 2),
                "eval_s": round(ppl["seconds"], 2) if ppl else None,
                "checkpoint_MB": round(b["checkpoint"] / 1e6, 3), "base_MB": round(b["base"] / 1e6, 3),
                "adapter_MB": round(b["adapter"] / 1e6, 3),
                "export_vs_checkpoint": round((b["base"] + b["adapter"]) / b["checkpoint"], 3),
                "ppl_routed": ppl.get("with_routed_experts"), "ppl_shared_only": ppl.get("without_routed_experts"),
                "ppl_increase_%": round(100 * ppl["increase"], 3) if ppl else None,
                "eval_tokens": ppl.get("tokens"),
            }
            rows.append(row)
            print(f"{label}: done ({export_s:.1f} s export)", file=sys.stderr)
    columns = ["cell", "format", "quantize_s", "export_s", "eval_s", "checkpoint_MB", "base_MB", "adapter_MB",
               "export_vs_checkpoint", "ppl_routed", "ppl_shared_only", "ppl_increase_%", "eval_tokens"]
    print_table(rows, columns)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"model": args.model, "samples": args.samples,
                                                     "eval_tokens": args.eval_tokens, "machine": machine(),
                                                     "rows": rows}, indent=1))
    with stem.with_suffix(".csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
