"""``qe compare``: a grid of compositions measured side by side, sharing work between cells.

Cells are quantizer × compensator × setting. Work shared across the whole grid: the model
load, the tokenized calibration and evaluation data, block 0's captured inputs, and the
full-precision reference figures. In ``fp-inputs`` mode every block's statistics are streamed
once for all cells (each block sees full-precision inputs whatever the cell), and a base
quantization that several compensators build on (same quantizer, setting, smoothing and
exemption) is computed once. In the default ``quantized`` mode each cell propagates through
its own quantized blocks, as deployed, so only block 0's inputs are shared.

Each finished cell is a JSON file under ``cells/`` keyed by a hash of its recipe, the model,
the dtype and the data, so a rerun skips what is done; a failing cell is recorded with its
error and the grid goes on, and the next run retries it (its record keeps every error).
``grid.json`` names the keys of the current grid's cells, and ``results.csv``, ``results.md``,
plots and ``index.html`` are rewritten from those cells only at the end of every run: a cell
file of other options or data is never reported as current. A lock beside the directory
keeps two runs from writing it at once.

With ``executor="ray"`` (``qe compare --executor ray``, :mod:`qe.commands.compare_ray`) each
pending cell runs as a Ray task and this process writes the rows it returns, under the same keys.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path

from qe.commands.compare_cells import (
    DEFAULT_EVAL_TOKENS,
    EXECUTORS,
    Cell,
    CompareOptions,
    Evaluator,
    failure_row,
    grid_cells,
    json_default,
    run_cells,
    stable_hash,
)
from qe.data.calibration import calibration_set, data_hash, token_counts
from qe.data.sources import check_source
from qe.errors import ConfigError, QEError
from qe.models.loading import LoadedModel, load_model
from qe.paths import atomic_write_json, check_output, output_lock
from qe.plugins import default_manager
from qe.settings import QuantSetting

# The cell engine's names, re-exported: ``from qe.commands.compare import CompareOptions`` is public API.
__all__ = ["GRID_FILE", "collect_rows", "run_compare", "Cell", "CompareOptions", "DEFAULT_EVAL_TOKENS", "EXECUTORS",
           "Evaluator", "failure_row", "grid_cells", "run_cells"]

GRID_FILE = "grid.json"


def run_compare(
    model: str | None,
    quantizers: str | list[str],
    compensators: str | list[str],
    settings: str | list[QuantSetting],
    *,
    out: str | Path,
    options: CompareOptions | None = None,
    force: bool = False,
    loaded: LoadedModel | None = None,
    manager=None,
    transforms: str | list[str] = "none",
) -> tuple[Path, list[dict]]:
    """Run (or resume) a grid; return the output directory and one row per cell."""
    options = options or CompareOptions()
    manager = manager or default_manager()
    if options.propagation not in ("quantized", "fp-inputs"):
        raise ConfigError(f"propagation {options.propagation!r} unknown: use quantized or fp-inputs")
    if options.executor not in EXECUTORS:
        raise ConfigError(f"executor {options.executor!r} unknown: use {' or '.join(EXECUTORS)}")
    if options.executor == "ray":
        from qe.commands.compare_ray import check_ray_options, probe_cluster

        check_ray_options(options, loaded)
        probe_cluster()  # an unreachable cluster fails before any work
    cells = grid_cells(quantizers, compensators, settings, options.estimator, manager, transforms)  # validated before loading
    if options.propagation == "fp-inputs":
        changing = sorted({c.transform for c in cells if c.composition.transform.create().changes_model()})
        if changing:
            raise ConfigError(f"transform {changing[0]} changes the model, so its statistics cannot be shared with the "
                              "other cells in fp-inputs mode: run it with --propagation quantized")
    out = Path(out)
    grid = {"model": model or "embedded-default", "cells": [c.label for c in cells], "options": options.describe()}
    check_output(out, kind="dir", allow_existing=True)
    check_source(options.calib)
    with output_lock(out):
        return _run_grid(model, cells, grid, out, options, force, loaded, manager)


def _run_grid(model, cells, grid, out, options, force, loaded, manager) -> tuple[Path, list[dict]]:
    grid_file = out / GRID_FILE
    if grid_file.is_file():
        try:
            previous = json.loads(grid_file.read_text())
        except (OSError, ValueError):
            previous = {}
        same = {k: previous.get(k) for k in ("model", "options")} == {k: grid[k] for k in ("model", "options")}
        if not same and not force:
            raise QEError(f"{out} holds a different grid (model or options differ): choose another --out or pass --force")
    elif out.exists() and any(out.iterdir()) and not force:
        raise QEError(f"{out} exists and is not a qe compare directory: choose another --out or pass --force")

    t_start = time.perf_counter()
    loaded = loaded or load_model(model, device=options.device, dtype=options.dtype,
                                  trust_remote_code=options.trust_remote_code, placement=options.placement)
    source, encoded = calibration_set(loaded, options.calib, options.samples, options.progress)
    dhash = data_hash(encoded)
    model_id = str(loaded.path or loaded.name)
    base_key = {"model": model_id, "data": dhash, "options": options.describe()}
    for c in cells:
        c.key = stable_hash({**base_key, "cell": c.composition.fingerprint()})
    fp_key = f"fp-{stable_hash(base_key)}"
    calib_facts = {"data_hash": dhash, "calibration": source, "calibration_tokens": token_counts(encoded)}
    keys = {"keys": {c.label: c.key for c in cells}, "fp_key": fp_key}
    atomic_write_json(out / GRID_FILE, {**grid, **calib_facts, **keys}, default=json_default)
    cells_dir = out / "cells"
    evaluator = Evaluator(loaded, options)

    fp_file = cells_dir / f"{fp_key}.json"
    if not fp_file.is_file():
        row = {"quantizer": "–", "compensator": "–", "setting": "FP32", "label": "FP32", "status": "ok",
               **evaluator(loaded.model), "bits_per_weight": 32.0, "bits_per_weight_with_adapters": 32.0,
               "added_params": 0, "added_flops_per_token": 0}
        atomic_write_json(fp_file, row, default=json_default)

    def record(cell: Cell, row: dict) -> None:
        atomic_write_json(cells_dir / f"{cell.key}.json", row, default=json_default)

    pending = [c for c in cells if not _done(cells_dir, c)]
    manager.hook.qe_run_start(command="compare", info={"model": loaded.name, "cells": [c.label for c in pending],
                                                      "num_blocks": len(loaded.adapter.decoder_blocks(loaded.model)),
                                                      "progress": options.progress})
    if pending:
        earlier_errors = {c.key: _errors_of(cells_dir, c) for c in pending}
        if options.executor == "ray":
            from qe.commands.compare_ray import run_on_ray

            run_on_ray(model, pending, options, dhash, record, manager)
        else:
            run_cells(loaded, pending, encoded, evaluator, record, manager, options)
        _keep_error_history(cells_dir, pending, earlier_errors)

    rows = collect_rows(out)
    from qe.commands.compare_report import write_compare_report

    write_compare_report(out, rows, {**grid, **calib_facts, "notes": loaded.notes,
                                     "synthetic_vision_tower": loaded.synthetic_vision,
                                     "seconds_this_run": time.perf_counter() - t_start,
                                     "created": _dt.datetime.now(_dt.timezone.utc).isoformat()})
    manager.hook.qe_run_end(command="compare", output=str(out), figures={"cells": float(len(rows) - 1)})
    return out, rows


def _read_cell(path: Path) -> dict | None:
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # missing or damaged: the cell runs again
    return row if isinstance(row, dict) else None


def _errors_of(cells_dir: Path, cell: Cell) -> list[str]:
    """The errors an earlier run recorded for ``cell`` (oldest first)."""
    row = _read_cell(cells_dir / f"{cell.key}.json")
    if not row or row.get("status") == "ok":
        return []
    return list(row.get("errors") or [row.get("error", "unknown error")])


def _keep_error_history(cells_dir: Path, cells: list[Cell], earlier: dict[str, list[str]]) -> None:
    """A retried cell's record keeps the errors of the runs before: ``errors`` while it still
    fails, ``previous_errors`` once it succeeds."""
    for cell in cells:
        before = earlier.get(cell.key) or []
        path = cells_dir / f"{cell.key}.json"
        row = _read_cell(path)
        if row is None:
            continue
        if row.get("status") == "ok":
            if not before:
                continue
            row["previous_errors"] = before
        else:
            row["errors"] = before + [row.get("error", "unknown error")]
        atomic_write_json(path, row, default=json_default)


def _done(cells_dir: Path, cell: Cell) -> bool:
    """Finished and ok: a cell whose record is an error (or damaged) runs again."""
    row = _read_cell(cells_dir / f"{cell.key}.json")
    return bool(row) and row.get("status") == "ok"


def collect_rows(out: Path, all_cells: bool = False) -> list[dict]:
    """Rows of the current grid's cells (FP32 first), read from the cell files that
    ``grid.json`` names by key, so figures of other options or data never pass as current;
    with ``all_cells``, every row recorded under ``out``, one per label (benchmarks that
    gather subsets of a larger grid)."""
    grid = json.loads((out / GRID_FILE).read_text())
    order = {label: i for i, label in enumerate(grid["cells"])}
    if not all_cells and isinstance(grid.get("keys"), dict):
        rows = []
        for key in [grid.get("fp_key"), *(grid["keys"].get(lbl) for lbl in grid["cells"])]:
            row = _read_cell(out / "cells" / f"{key}.json") if key else None
            if row is not None:
                rows.append(row)
        return rows
    rows = []
    for f in sorted((out / "cells").glob("*.json")):
        row = _read_cell(f)
        if row is None:
            continue
        if all_cells or row["label"] == "FP32" or row["label"] in grid["cells"]:
            rows.append(row)
    rows.sort(key=lambda r: -1 if r["label"] == "FP32" else order.get(r["label"], 1 << 30))
    seen, unique = set(), []
    for r in rows:  # an FP32 row per data hash may exist from older runs: keep one
        if r["label"] in seen:
            continue
        seen.add(r["label"])
        unique.append(r)
    return unique
