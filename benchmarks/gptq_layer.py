"""Wall time of GPTQ on one layer (the block loop's inner cost), median of several runs.

Shapes of the embedded default model's linears (576 → 576, 576 → 1536, 1536 → 576) with a
correlated, uneven synthetic calibration Hessian; W4 g128 asymmetric and per-channel symmetric.

    python benchmarks/gptq_layer.py --threads 1 --runs 5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, print_table, timed, write_csv

SHAPES = [(576, 576), (1536, 576), (576, 1536)]  # (d_out, d_in)
SETTINGS = [(128, False), (0, True)]  # (group size, symmetric)


def problem(seed: int, d_out: int, d_in: int, tokens: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d_in) + 0.5 * torch.randn(d_in, d_in, generator=g)
    X = torch.randn(tokens, d_in, generator=g) @ mix * torch.exp(torch.randn(d_in, generator=g))
    return torch.randn(d_out, d_in, generator=g), (X.T @ X).double()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=2048, help="calibration tokens behind the Hessian")
    ap.add_argument("--out", default="benchmarks/results/gptq_layer", help="folder for results.json and results.csv")
    args = ap.parse_args()

    import torch

    from qe.quantizers.gptq import gptq_quantize

    torch.set_num_threads(args.threads)
    rows = []
    for d_out, d_in in SHAPES:
        W, H = problem(0, d_out, d_in, args.tokens)
        for group_size, symmetric in SETTINGS:
            gptq_quantize(W[:8], H, 4, group_size, symmetric)  # warm-up
            times = [timed(lambda: gptq_quantize(W, H, 4, group_size, symmetric))[0] for _ in range(args.runs)]  # noqa: B023
            rows.append({"shape": f"{d_in}→{d_out}", "setting": f"W4 {'ch sym' if group_size == 0 else f'g{group_size} asym'}",
                         "median_s": round(median(times), 4), "min_s": round(min(times), 4), "runs": args.runs})
    print_table(rows, ["shape", "setting", "median_s", "min_s", "runs"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"machine": machine(), "threads": args.threads,
                                                  "tokens": args.tokens, "rows": rows}, indent=1))
    write_csv(out / "results.csv", rows)
    print(f"wrote {out}/results.json and results.csv")


if __name__ == "__main__":
    main()
