"""Quantizer benchmark on the embedded default's language model (docs/results.md).

Benchmark protocol (docs/protocol.md): calibration 64 windows of 512 tokens from the first 60% of the
pydoc-topics text; held-out perplexity over the last 40% in non-overlapping 512-token
windows; every decoder linear quantized; embeddings and lm_head in fp32; quantized
propagation (each block calibrated on the outputs of the quantized blocks before it).

Rows: {RTN, GPTQ, SmoothQuant transform + RTN, SmoothQuant transform + GPTQ} × {W4A16 per-channel sym, W4A16 g64 sym,
W4A16 g128 sym, W3A16 g128 asym, W8A8, W4A8, W4A6}, FP32 in the same table, with each cell's
quantization wall time (the block loop: statistics, quantization and propagation; block 0's
captured inputs are shared by the grid and not counted). The full table takes hours on two
cores: the script is resumable (finished cells are kept under --out) and runs subsets with
--only (substrings of cell labels, e.g. --only gptq+none@W4A16ch, smoothquant+rtn+none@W8A8).

    python benchmarks/quantizers.py --only "gptq+none@W4A16chsym,rtn+none@W4A16chsym"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_cell_list, print_table, rewrite_full_report  # noqa: E402

QUANTIZERS = ["rtn", "gptq"]
TRANSFORMS = ["none", "smoothquant"]  # SmoothQuant (α = 0.5) composed with either quantizer
SETTINGS = ["W4A16chsym", "W4A16g64sym", "W4A16g128sym", "W3A16g128asym", "W8A8", "W4A8", "W4A6"]
COLUMNS = ["setting", "transform", "quantizer", "compensator", "ppl", "eval_tokens", "quantize_seconds", "bits_per_weight", "status"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/quantizers")
    ap.add_argument("--only", default=None, help="comma list of substrings of cell labels to run")
    ap.add_argument("--list", action="store_true", help="list the cells and whether they are done")
    ap.add_argument("--report", action="store_true", help="only rewrite the report over every finished cell")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import torch

    from qe.commands.compare import CompareOptions, grid_cells, run_compare

    if args.threads:
        torch.set_num_threads(args.threads)
    cells = grid_cells(QUANTIZERS, ["none"], SETTINGS, transforms=TRANSFORMS)
    wanted = [c for c in cells if not args.only or any(s.strip() in c.label for s in args.only.split(","))]
    if args.list:
        print_cell_list([c.label for c in cells], Path(args.out))
        return
    if args.report:
        print_table(rewrite_full_report(Path(args.out), [c.label for c in cells]), COLUMNS)
        return
    if not wanted:
        sys.exit(f"--only {args.only!r} matches no cell; cells look like {cells[0].label}")
    options = CompareOptions(calib="pydoc", samples=64, eval_tokens=None, caption_nll=False, progress=True)
    out = Path(args.out)
    for cell in wanted:  # one cell per call: each is saved as soon as it is done
        run_compare(None, [cell.quantizer], ["none"], [cell.setting], out=out, options=options,
                    transforms=[cell.transform])
    rows = rewrite_full_report(out, [c.label for c in cells])
    print_table(rows, COLUMNS)
    (out / "benchmark.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    print(f"wrote {out}/results.csv, results.md, index.html and benchmark.json (every finished cell)")


if __name__ == "__main__":
    main()
