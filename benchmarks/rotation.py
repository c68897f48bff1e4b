"""Rotation benchmark: W4A4 and W4A6 with and without the rotate transform, on the embedded
default's language model (docs/results.md, "Rotations").

Benchmark protocol (docs/protocol.md, text protocol): calibration 64 windows of 512 tokens
from the first 60% of the pydoc-topics text; held-out perplexity over the last 40% in
non-overlapping 512-token windows; every decoder linear quantized, per-token dynamic
activations; quantized propagation.

Cells, per setting (W4A4, W4A6): RTN, GPTQ, rotate + RTN, rotate + GPTQ,
rotate + GPTQ + lowrank-64, rotate + GPTQ + QE; and at W4A4KV4 (the KV cache in 4 bits too) the
three rotate + GPTQ cells. The summary line gives the share of
rotate + GPTQ's perplexity gap to FP32 that QE closes (target ≥ 50%) and whether QE beats
lowrank-64 on the same base. Resumable: each finished cell is a JSON file under --out; run a
subset with --cells (substrings of cell labels), list the cells and their state with --list.

    nice -n 10 python benchmarks/rotation.py --cells "rtn+none@W4A4"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_cell_list, print_table, rewrite_full_report  # noqa: E402

SETTINGS = ["W4A4", "W4A6"]
# The 4-bit KV cache on the rotate + GPTQ bases only: without the rotation W4A4 already collapses.
KV_SETTINGS = ["W4A4KV4"]
# (transform, quantizer, compensator)
COMPOSITIONS = [
    ("none", "rtn", "none"),
    ("none", "gptq", "none"),
    ("rotate", "rtn", "none"),
    ("rotate", "gptq", "none"),
    ("rotate", "gptq", "lowrank[rank=64]"),
    ("rotate", "gptq", "qe"),
]
COLUMNS = ["setting", "transform", "quantizer", "compensator", "ppl", "eval_tokens", "quantize_seconds",
           "bits_per_weight_with_adapters", "status"]


def cells():
    from qe.commands.compare import grid_cells

    out = []
    for s in SETTINGS:
        for t, q, c in COMPOSITIONS:
            out.extend(grid_cells([q], [c], [s], transforms=[t]))
    for s in KV_SETTINGS:
        for t, q, c in COMPOSITIONS:
            if (t, q) == ("rotate", "gptq"):
                out.extend(grid_cells([q], [c], [s], transforms=[t]))
    return out


def summary(rows: list[dict]) -> list[str]:
    """Per setting: the share of rotate + GPTQ's gap to FP32 that QE closes, and QE vs lowrank-64."""
    ppl = {r["label"]: r.get("ppl") for r in rows if r.get("status") == "ok"}
    fp = ppl.get("FP32")
    lines = []
    for s in SETTINGS + KV_SETTINGS:
        base, qe_, lr = (ppl.get(f"rotate+gptq+{c}@{s}") for c in ("none", "qe", "lowrank[rank=64]"))
        if fp is None or base is None or qe_ is None:
            lines.append(f"{s}: rotate+gptq and rotate+gptq+qe not both measured yet")
            continue
        closed = (base - qe_) / (base - fp) if base != fp else float("nan")
        vs = "not measured" if lr is None else ("beats" if qe_ < lr else "does not beat") + f" lowrank-64 ({lr:.3f})"
        lines.append(f"{s}: rotate+gptq+qe closes {100 * closed:.1f}% of rotate+gptq's gap to FP32 "
                     f"({base:.3f} -> {qe_:.3f}, FP32 {fp:.3f}; target >= 50%) and {vs}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/rotation")
    ap.add_argument("--cells", default=None, help="comma list of substrings of cell labels to run")
    ap.add_argument("--list", action="store_true", help="list the cells and whether they are done")
    ap.add_argument("--report", action="store_true", help="only rewrite the report over every finished cell")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import torch

    from qe.commands.compare import CompareOptions, run_compare

    if args.threads:
        torch.set_num_threads(args.threads)
    all_cells = cells()
    labels = [c.label for c in all_cells]
    out = Path(args.out)
    if args.list:
        print_cell_list(labels, out)
        return
    if not args.report:
        wanted = [c for c in all_cells if not args.cells or any(s.strip() in c.label for s in args.cells.split(","))]
        if not wanted:
            sys.exit(f"--cells {args.cells!r} matches no cell; cells look like {labels[0]}")
        options = CompareOptions(calib="pydoc", samples=64, eval_tokens=None, caption_nll=False, progress=True)
        for cell in wanted:  # one cell per call: each is saved as soon as it is done
            run_compare(None, [cell.quantizer], [cell.compensator], [cell.setting], out=out, options=options,
                        transforms=[cell.transform])
    rows = rewrite_full_report(out, labels)
    print_table(rows, COLUMNS)
    lines = summary(rows)
    print("\n".join(lines))
    (out / "benchmark.json").write_text(json.dumps({"machine": machine(), "rows": rows, "summary": lines}, indent=1))
    print(f"wrote {out}/results.csv, results.md, index.html and benchmark.json (every finished cell)")


if __name__ == "__main__":
    main()
