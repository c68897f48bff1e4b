"""Wall time of qe's block loop for one composition, at a chosen thread count (docs/protocol.md).

The peers' GPTQ times in docs/results.md (other tools) were taken with one intra-op thread while another
job shared the machine; this script gives qe's figure at a thread count of your choice, with
whatever else the machine runs at the time written beside it (load average), so that the
conditions are on record. Protocol of docs/protocol.md (64 × 512 pydoc calibration windows,
quantized propagation); perplexity is skipped beyond one window, as only time is measured.

    python benchmarks/quantize_time.py --quantizer gptq --setting W4A16g64sym --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantizer", default="gptq")
    ap.add_argument("--compensator", default="none")
    ap.add_argument("--setting", default="W4A16g64sym")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON to write (default benchmarks/results/quantize_time_<...>.json)")
    args = ap.parse_args()

    import torch

    from qe.commands.compare import CompareOptions, run_compare

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    options = CompareOptions(calib="pydoc", samples=64, eval_tokens=512, caption_nll=False, progress=False)
    t0, c0 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        _, rows = run_compare(None, [args.quantizer], [args.compensator], [args.setting], out=Path(tmp) / "grid",
                              options=options)
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    cell = next(r for r in rows if r["label"] != "FP32")
    if cell["status"] != "ok":
        sys.exit(f"the cell failed: {cell.get('error')}")
    result = {"composition": cell["label"], "threads": args.threads, "quantize_s": cell["quantize_seconds"],
              "block0_capture_s": cell.get("shared_capture_seconds"), "process_total_s": total,
              "process_cpu_s": total_cpu,  # all threads; beside process_total_s it shows the cores used
              "load_avg_before": load_before, "load_avg_after": os.getloadavg()[0], "machine": machine()}
    out = Path(args.out or f"benchmarks/results/quantize_time_{args.quantizer}_{args.setting}_{args.threads}thread.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"{cell['label']}: block loop {cell['quantize_seconds']:.1f} s with {args.threads} thread(s) "
          f"(process {total:.1f} s; load average {load_before:.2f} → {result['load_avg_after']:.2f}); wrote {out}")


if __name__ == "__main__":
    main()
