"""Compensator benchmark on the embedded default's language model (docs/results.md).

Main table, benchmark protocol of docs/protocol.md (64 calibration windows of 512 pydoc tokens,
perplexity on the whole held-out part, quantized propagation):
{RTN, GPTQ} × {none, lowrank whitened rank 64 (QE's per-token rank) on the plain base,
the same on QE's smoothed and exempted base, lowrank rank 288 (QE's parameter count),
LQER rank 64, QE} × {W4A8, W4A6, W3A16}, FP32 in the same table, with effective bits per
weight with and without adapters.

Ablations, reduced protocol (16 calibration windows, fp-inputs mode, stated in the table's
directory name and in benchmark.json): QE shared-only, routed-only, random routing, random
clustering and oracle routing, beside full QE, at GPTQ W4A6.

Resumable and run by subsets (--only substrings of cell labels; --part main|ablations):

    python benchmarks/compensators.py --part main --only "gptq+qe@W4A6"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_cell_list, print_table, rewrite_full_report

MAIN_QUANTIZERS = ["rtn", "gptq"]
MAIN_COMPENSATORS = ["none", "lowrank[rank=64]", "lowrank[rank=64;on_qe_base=true]", "lowrank[rank=288]",
                     "lowrank[rank=64;method=lqer]", "qe"]
MAIN_SETTINGS = ["W4A8", "W4A6", "W3A16"]
ABLATIONS = ["qe", "qe[mode=shared-only]", "qe[mode=routed-only]", "qe[mode=random-routing]",
             "qe[mode=random-clustering]", "qe[mode=oracle-routing]", "lowrank[rank=64;on_qe_base=true]"]
COLUMNS = ["setting", "quantizer", "compensator", "ppl", "mean_rel_error_base", "mean_rel_error", "router_agreement",
           "bits_per_weight", "bits_per_weight_with_adapters", "quantize_seconds", "fit_seconds", "status"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["main", "ablations"], default="main")
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default=None, help="comma list of substrings of cell labels to run")
    ap.add_argument("--list", action="store_true", help="list the cells and whether they are done")
    ap.add_argument("--report", action="store_true", help="only rewrite the report over every finished cell")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from qe.commands.compare import CompareOptions, grid_cells, run_compare

    if args.part == "main":
        cells = grid_cells(MAIN_QUANTIZERS, MAIN_COMPENSATORS, MAIN_SETTINGS)
        options = CompareOptions(calib="pydoc", samples=64, eval_tokens=None, caption_nll=False)
        out = Path(args.out or "benchmarks/results/compensators")
    else:
        cells = grid_cells(["gptq"], ABLATIONS, ["W4A6"])
        options = CompareOptions(calib="pydoc", samples=16, eval_tokens=None, caption_nll=False,
                                 propagation="fp-inputs")
        out = Path(args.out or "benchmarks/results/compensators-ablations-16win-fp-inputs")
    if args.list:
        print_cell_list([c.label for c in cells], out)
        return
    if args.report:
        print_table(rewrite_full_report(out, [c.label for c in cells]), COLUMNS)
        return
    wanted = [c for c in cells if not args.only or any(s.strip() in c.label for s in args.only.split(","))]
    if not wanted:
        sys.exit(f"--only {args.only!r} matches no cell; cells look like {cells[0].label}")
    if options.propagation == "fp-inputs":
        # Every cell's block i sees the full-precision inputs, so one call streams the
        # statistics once for all wanted cells (and quantizes a shared base once). The
        # ablation grid has one quantizer and one setting, so the product is the wanted cells.
        def axis(name):
            return list(dict.fromkeys(getattr(c, name) for c in wanted))

        run_compare(None, axis("quantizer"), axis("compensator"), axis("setting"), out=out, options=options)
    else:
        # Quantized propagation shares nothing after block 0: one call per cell, so each
        # finished cell is kept if a later one is interrupted.
        for cell in wanted:
            run_compare(None, [cell.quantizer], [cell.compensator], [cell.setting], out=out, options=options)
    rows = rewrite_full_report(out, [c.label for c in cells])
    print_table(rows, COLUMNS)
    (out / "benchmark.json").write_text(json.dumps({"machine": machine(), "protocol": options.describe(),
                                                    "rows": rows}, indent=1))
    print(f"wrote {out}/results.csv, results.md, index.html and benchmark.json (every finished cell)")


if __name__ == "__main__":
    main()
