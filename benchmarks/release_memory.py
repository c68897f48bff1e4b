"""What handing freed heap memory back to the system costs and saves (``qe/memory.py``).

qe calls ``malloc_trim`` after every linear and every block. Each pair of runs quantizes the
first ``--blocks`` blocks of a random-weight SmolLM2 model (the memory benchmark's models and
recipe, offloaded to disk) twice, side by side, one process each: as qe does, and with the
release turned off in that process. Paired runs share the machine's load, so their ratio is
what to read; the table gives each pair and the medians.

    OMP_NUM_THREADS=1 python benchmarks/release_memory.py --size 135M --blocks 12 --pairs 3

Writes benchmarks/results/release-memory.json and .csv and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, print_table

RESULTS = Path(__file__).resolve().parent / "results" / "release-memory"


def run_one(size: str, blocks: int, release: bool, out_json: Path) -> None:
    """The memory benchmark's offloaded run of the first ``blocks`` blocks in this process,
    with qe's release of freed memory on or off; its row goes to ``out_json``."""
    import memory as bench

    import qe.capture
    import qe.pipeline

    if not release:  # the two places qe releases memory, turned off for this process only
        qe.capture.release_freed_memory = qe.pipeline.release_freed_memory = lambda: False
    bench.run_one(size, "offload", 2, out_json, blocks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="135M")
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)
    ap.add_argument("--row", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        run_one(args.size, args.blocks, args.one == "on", Path(args.row))
        return
    import memory as bench

    bench.model_dir(args.size)  # written outside the measured processes
    rows = []
    for pair in range(1, args.pairs + 1):
        with tempfile.TemporaryDirectory() as tmp:
            procs = {mode: subprocess.Popen([sys.executable, __file__, "--one", mode, "--size", args.size,
                                             "--blocks", str(args.blocks), "--row", f"{tmp}/{mode}.json"])
                     for mode in ("on", "off")}
            for proc in procs.values():
                if proc.wait() != 0:
                    sys.exit(f"a measured run failed (exit {proc.returncode})")
            on, off = (json.loads(Path(f"{tmp}/{mode}.json").read_text()) for mode in ("on", "off"))
        rows.append({"pair": pair, "cpu_s_release": on["cpu_s"], "cpu_s_kept": off["cpu_s"],
                     "cpu_ratio": round(on["cpu_s"] / off["cpu_s"], 3),
                     "faults_release": on["minor_faults"], "faults_kept": off["minor_faults"],
                     "peak_anon_GB_release": on["peak_anon_GB"], "peak_anon_GB_kept": off["peak_anon_GB"]})
        print(f"pair {pair}: {rows[-1]}", file=sys.stderr)
    columns = list(rows[0])
    summary = {"pair": "median", **{c: median([r[c] for r in rows]) for c in columns[1:]}}
    print_table([*rows, summary], columns)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps(
        {"size": args.size, "blocks": args.blocks, "machine": machine(), "pairs": rows, "median": summary}, indent=1))
    with RESULTS.with_suffix(".csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows([*rows, summary])


if __name__ == "__main__":
    main()
