"""Block-wise capture against a plain forward: wall time and peak memory (docs/results.md).

Each phase runs in its own process (so its peak RSS is its own), alternating, --repeats times:

* ``forward``: load the model, tokenize the samples, one plain forward per sample;
* ``capture``: load, tokenize, capture block 0's inputs and run every decoder block from
  them while streaming each linear's statistics (XᵀX, maxima, moments and a 16,384-token
  sample), as ``qe quantize`` does before it quantizes, with full-precision propagation.

Times exclude the model load and tokenization (timed separately). Prints a table of medians;
writes JSON and CSV.

    python benchmarks/capture.py --samples 32 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, peak_rss_gb, print_table, write_results  # noqa: E402


def run_phase(phase: str, samples: int, calib: str | None) -> dict:
    import torch

    from qe.analysis.statistics import choose_sample_positions
    from qe.capture import StreamContext, attach_stats, capture_block_inputs, run_block
    from qe.data.calibration import calibration_set
    from qe.models.loading import load_model

    t0 = time.perf_counter()
    loaded = load_model(None)
    _, encoded = calibration_set(loaded, calib, samples)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        if phase == "forward":
            for e in encoded:
                loaded.model(**e.inputs, use_cache=False)
        else:
            inputs = capture_block_inputs(loaded, encoded, progress=False)
            positions = choose_sample_positions(inputs.total_tokens, 16384)
            context = StreamContext()
            adapter = loaded.adapter
            for i, block in enumerate(adapter.decoder_blocks(loaded.model)):
                with attach_stats(block, adapter, prefix=str(i), context=context, sample_positions=positions,
                                  hessian=True, moments=True):
                    out = run_block(block, inputs, context=context, block_index=i)
                inputs = inputs.with_hidden(out)
    return {"phase": phase, "seconds": time.perf_counter() - t0, "setup_seconds": setup, "peak_rss_gb": peak_rss_gb(),
            "tokens": sum(e.num_tokens for e in encoded)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--calib", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/capture")
    ap.add_argument("--phase", choices=["forward", "capture"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args.phase, args.samples, args.calib)))
        return
    rows = []
    for r in range(args.repeats):
        for phase in ("forward", "capture"):
            cmd = [sys.executable, __file__, "--phase", phase, "--samples", str(args.samples)]
            if args.calib:
                cmd += ["--calib", args.calib]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            rows.append({"repeat": r, **json.loads(out)})
            print_table(rows[-1:], list(rows[-1]))
    fwd = [x for x in rows if x["phase"] == "forward"]
    cap = [x for x in rows if x["phase"] == "capture"]
    summary = {
        "samples": args.samples, "tokens": rows[0]["tokens"],
        "forward_s_median": median([x["seconds"] for x in fwd]), "capture_s_median": median([x["seconds"] for x in cap]),
        "ratio_median": median([c["seconds"] / f["seconds"] for f, c in zip(fwd, cap)]),
        "forward_peak_rss_gb": max(x["peak_rss_gb"] for x in fwd), "capture_peak_rss_gb": max(x["peak_rss_gb"] for x in cap),
        "machine": machine(), "runs": rows,
    }
    print()
    print_table([summary], ["samples", "tokens", "forward_s_median", "capture_s_median", "ratio_median",
                            "forward_peak_rss_gb", "capture_peak_rss_gb"])
    write_results(args.out, summary, rows)


if __name__ == "__main__":
    main()
