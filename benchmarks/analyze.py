"""Benchmark of `qe analyze` statistics against a plain forward over the same samples.

Measured in the same run, alternating: a plain forward of the model over the calibration
samples, and the analysis statistics (capture + block-wise streaming + per-layer summaries).
Report rendering is timed separately. Prints a table; writes JSON and CSV.

    python benchmarks/analyze.py --samples 32 --repeats 3 --out benchmarks/results/analyze
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, peak_rss_gb, print_table, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/analyze")
    args = ap.parse_args()

    from qe.analysis.analyze import AnalyzeOptions, run_analysis
    from qe.analysis.report import write_report
    from qe.data.calibration import calibration_set, token_counts
    from qe.models.loading import load_model

    loaded = load_model(args.model)
    model_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    _, encoded = calibration_set(loaded, None, args.samples)
    tokens = sum(e.num_tokens for e in encoded)

    def plain_forward():
        with torch.no_grad():
            for e in encoded:
                loaded.model(**e.inputs, use_cache=False)

    rows = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        plain_forward()
        t_fwd = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = run_analysis(loaded, encoded, AnalyzeOptions(progress=False))
        t_stats = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as d:
            result.run = {"model": loaded.name, "adapter": loaded.adapter.name, "synthetic_vision_tower": loaded.synthetic_vision,
                          "notes": loaded.notes, "estimator": "act-weight", "k": 32, "num_experts": 8, "seed": 0,
                          "calibration": {"source": "images", "samples": len(encoded), "tokens": token_counts(encoded)}, "seconds": {}}
            t0 = time.perf_counter()
            write_report(Path(d), result, 32)
            t_report = time.perf_counter() - t0
        rows.append({"repeat": r, "forward_s": t_fwd, "statistics_s": t_stats, "ratio": t_stats / t_fwd, "report_s": t_report})
        print_table(rows[-1:], list(rows[-1]))
    summary = {
        "samples": len(encoded), "tokens": tokens, "layers": len(result.layers),
        "forward_s_median": median([r["forward_s"] for r in rows]),
        "statistics_s_median": median([r["statistics_s"] for r in rows]),
        "ratio_median": median([r["ratio"] for r in rows]),
        "report_s_median": median([r["report_s"] for r in rows]),
        "peak_rss_gb": peak_rss_gb(), "model_gb": model_bytes / 2**30,
        "rss_over_model_gb": peak_rss_gb() - model_bytes / 2**30,
        "machine": machine(), "runs": rows,
    }
    print()
    print_table([summary], ["samples", "tokens", "layers", "forward_s_median", "statistics_s_median", "ratio_median",
                            "report_s_median", "peak_rss_gb", "model_gb"])
    write_results(args.out, summary, rows)


if __name__ == "__main__":
    main()
