"""The README's quick-start quantization, timed, with the figures a user sees.

Runs ``qe quantize`` on the embedded default model with the quick start's settings and the
default calibration (for this model: half real-text windows, half image-caption pairs), and
records the wall time, the process CPU time, the load average around the run and the
before/after check (held-out perplexity full precision → quantized; last-hidden-state error on
calibration samples vs held-out text). Each row is one composition; the table is resumable
(finished rows are kept in results.json) and ``--only`` runs a subset.

    python benchmarks/quickstart.py --only "gptq+qe@W4A8"
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
from _common import machine, print_table, write_csv

# (quantizer, compensator, setting): the README's example and the baselines beside it
ROWS = [("rtn", "qe", "W4A8"), ("rtn", "none", "W4A8"), ("gptq", "qe", "W4A8"), ("gptq", "none", "W4A8")]
COLUMNS = ["composition", "samples", "wall_s", "cpu_s", "ppl_fp", "ppl_quantized", "err_calibration",
           "err_heldout", "load_before", "load_after"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="comma list of substrings of compositions (quantizer+compensator@setting)")
    ap.add_argument("--samples", type=int, default=32, help="calibration samples (the quick start's default, 32)")
    ap.add_argument("--out", default="benchmarks/results/quickstart")
    args = ap.parse_args()

    from qe.commands.quantize import run_quantize
    from qe.recipe import Recipe

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    done = json.loads(results_file.read_text())["rows"] if results_file.is_file() else []
    for quantizer, compensator, setting in ROWS:
        label = f"{quantizer}+{compensator}@{setting}"
        if args.only and not any(s.strip() in label for s in args.only.split(",")):
            continue
        recipe = Recipe(quantizer=quantizer, compensator=compensator, setting=setting, samples=args.samples)
        load_before = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        with tempfile.TemporaryDirectory() as tmp:
            _, manifest = run_quantize(recipe, None, out=Path(tmp) / "ckpt", progress=True)
        check = manifest["heldout_check"]
        row = {"composition": label, "samples": args.samples, "wall_s": round(time.perf_counter() - t0, 1),
               "cpu_s": round(time.process_time() - c0, 1), "ppl_fp": round(check["ppl_full_precision"], 3),
               "ppl_quantized": round(check["ppl_quantized"], 3),
               "err_calibration": round(check["hidden_rel_error_calibration"], 5),
               "err_heldout": round(check["hidden_rel_error_heldout"], 5),
               "calibration": manifest["calibration"]["source"],
               "tokens_by_source": manifest["calibration"]["tokens_by_source"],
               "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}
        done = [r for r in done if not (r["composition"] == label and r["samples"] == args.samples)] + [row]
        results_file.write_text(json.dumps({"machine": machine(), "rows": done}, indent=1))
        write_csv(out / "results.csv", done)
        print_table(done, COLUMNS)
    print(f"wrote {results_file} and results.csv")


if __name__ == "__main__":
    main()
