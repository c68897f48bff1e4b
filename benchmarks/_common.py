"""Shared helpers for the benchmark scripts: timing, memory, table output, resumable results."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def machine() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "machine": platform.machine(), "load_avg": os.getloadavg()[0]}


def finished_cells(out: Path) -> dict[str, str]:
    """``{cell label: status}`` of the cells a benchmark's ``qe compare`` directory holds (read
    from its cell files by :func:`qe.commands.compare.collect_rows`: no model load)."""
    from qe.commands.compare import GRID_FILE, collect_rows

    out = Path(out)
    if not (out / GRID_FILE).is_file():
        return {}
    return {r["label"]: r.get("status", "?") for r in collect_rows(out, all_cells=True)}


def print_cell_list(labels: list[str], out: Path) -> None:
    done = finished_cells(out)
    for label in labels:
        print(f"{done.get(label, 'todo'):5}  {label}")
    print(f"{sum(done.get(label) == 'ok' for label in labels)} of {len(labels)} cells done in {out}")


def rewrite_full_report(out: Path, order: list[str] = ()) -> list[dict]:
    """Rewrite a benchmark's ``results.csv``/``results.md``/plots/``index.html`` over every
    finished cell (each ``qe compare`` call writes its own cells only) and return the rows.
    Rows follow ``order`` (cell labels; FP32 first, cells not in it last). The benchmarks run
    on the embedded default, whose vision tower is synthetic."""
    from qe.commands.compare import GRID_FILE, collect_rows
    from qe.commands.compare_report import write_compare_report
    from qe.models.default_model import SYNTHETIC_NOTE

    out = Path(out)
    rank = {label: i for i, label in enumerate(["FP32", *order])}
    rows = sorted(collect_rows(out, all_cells=True), key=lambda r: (rank.get(r["label"], len(rank)), r["label"]))
    grid = json.loads((out / GRID_FILE).read_text())
    grid["cells"] = [r["label"] for r in rows if r["label"] != "FP32"]
    write_compare_report(out, rows, {**grid, "synthetic_vision_tower": True, "notes": [SYNTHETIC_NOTE]})
    return rows


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    with Path(path).open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def write_results(out: str | Path, summary: dict, rows: list[dict]) -> None:
    """``<out>.json`` (the summary, with the runs) and ``<out>.csv`` (one row per run)."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    write_csv(path.with_suffix(".csv"), rows)
    print(f"wrote {path.with_suffix('.json')} and {path.with_suffix('.csv')}")


class ResultStore:
    """A JSON file of finished rows keyed by name, rewritten atomically after each row, so an
    interrupted benchmark resumes where it stopped."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: dict[str, dict] = json.loads(self.path.read_text())["rows"] if self.path.exists() else {}

    def has(self, key: str) -> bool:
        return key in self.rows

    def put(self, key: str, row: dict) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Two jobs may fill one store: under a lock, rows on disk (the other job's, and newer
        # versions of this one's) are kept and this row is added.
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.exists():
                self.rows = {**self.rows, **json.loads(self.path.read_text())["rows"]}
            self.rows[key] = row
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"machine": machine(), "rows": self.rows}, indent=1))
            os.replace(tmp, self.path)

    def write_csv(self, path: Path, columns: list[str]) -> None:
        import csv

        with Path(path).open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["key"] + columns, extrasaction="ignore")
            w.writeheader()
            for key, row in self.rows.items():
                w.writerow({"key": key, **row})
