"""``qe compare --executor ray``: each grid cell as a Ray task (README, "Grids on a cluster").

A task is self-contained: it loads the model, builds the calibration set, captures block 0's
inputs, quantizes and evaluates its one cell, and returns the cell's row. The driver writes the
rows into the grid directory under the same keys as a serial run, so a grid started serially
finishes on a cluster (and the other way round), and the workers need no storage shared with
the driver. In fp-inputs mode each task streams its own cell's statistics: the sharing of a
serial fp-inputs grid is lost, the figures are the same.

Ray reruns a task whose worker process dies (up to :data:`MAX_RETRIES` times); a cell that
still fails is recorded as an error row, like a cell that raises, and the next run retries it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import traceback
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from tqdm.auto import tqdm

from qe.commands.compare_cells import Cell, CompareOptions, Evaluator, failure_row, grid_cells, run_cells
from qe.errors import ConfigError, QEError

MAX_RETRIES = 3  # reruns of a cell whose worker process died (Ray's own default for tasks)


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray, which is not installed: pip install 'qe-quant[ray]'") from None
    return ray


def check_ray_options(options: CompareOptions, loaded: Any = None) -> None:
    """Refuse, before any work, what the Ray executor cannot run (one line each)."""
    _ray()
    if loaded is not None:
        raise ConfigError("the Ray executor loads the model in each task: pass the model's name, not a loaded model")
    if not options.cell_cpus > 0:
        raise ConfigError(f"--cell-cpus {options.cell_cpus:g}: a cell needs at least part of a CPU, give a number above 0")
    if not options.cell_gpus >= 0:
        raise ConfigError(f"--cell-gpus {options.cell_gpus:g}: give 0 (CPU cells) or more")


def cell_device(options: CompareOptions) -> str:
    """Where a cell's task computes: the GPU Ray gave it when it reserves one, else the CPU."""
    return "cuda" if options.cell_gpus > 0 else "cpu"


@contextlib.contextmanager
def ray_connection(quiet: bool = False) -> Iterator[Any]:
    """Ray, connected: the session already open in this process, else the cluster at
    ``RAY_ADDRESS``, else this machine's (one started by ``ray.init`` here ends with the run)."""
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    address = probe_cluster()
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR if quiet else logging.WARNING)
    except Exception as exc:  # ConnectionError, version mismatch, ...
        raise _unreachable(address, exc) from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _unreachable(address: str | None, exc: BaseException) -> ConfigError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ConfigError(f"cannot reach the Ray cluster at {address or 'this machine'} ({first}): set RAY_ADDRESS "
                       "to the head node's address, start one there with `ray start --head`, or unset "
                       "RAY_ADDRESS to run on this machine")


def probe_cluster(timeout: float = 5.0) -> str | None:
    """``RAY_ADDRESS`` (None when unset), after checking that something answers there: ``ray.init``
    itself retries for minutes, and a grid checks before any work (a connection is opened only
    when some cell is left to run)."""
    address = os.environ.get("RAY_ADDRESS") or None
    if address is None or address in ("auto", "local"):
        return address
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    try:
        if not sep or not port.isdigit():
            raise ValueError("not host:port")
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise _unreachable(address, exc) from None
    return address


def run_cell_task(model: str | None, cell_spec: dict, options: CompareOptions, data_hash: str,
                  manager: Any = None) -> dict:
    """One cell, from the model's name to its row (what a Ray task runs; also callable in
    process). A failure, including calibration data that differ from the driver's, is returned
    as the cell's error row."""
    import torch

    from qe.data.calibration import calibration_set
    from qe.data.calibration import data_hash as hash_of
    from qe.models.loading import load_model
    from qe.plugins import default_manager

    manager = manager or default_manager()
    try:
        cell = grid_cells([cell_spec["quantizer"]], [cell_spec["compensator"]], [cell_spec["setting"]],
                          options.estimator, manager, [cell_spec["transform"]])[0]
    except (Exception, QEError) as exc:  # e.g. a plugin the driver has and this worker lacks
        message = str(exc).splitlines()[0] if str(exc) else ""
        return {**cell_spec["row"], "status": "error", "traceback": traceback.format_exc(limit=4),
                "error": f"{type(exc).__name__}: {message} (on the Ray worker: install the same qe and plugins there)"}
    cell.key = cell_spec["key"]
    rows: dict[str, dict] = {}
    try:
        # The threads this task reserved; a worker that kept torch's default would share the
        # node's cores with every other cell.
        torch.set_num_threads(max(1, int(options.cell_cpus)))
        if cell.composition.fingerprint() != cell_spec["fingerprint"]:
            raise ConfigError(f"{cell.label} resolves differently on this worker than on the driver: install the "
                              "same qe version and plugins on every node")
        loaded = load_model(model, device=options.device, dtype=options.dtype,
                            trust_remote_code=options.trust_remote_code, placement=options.placement)
        _, encoded = calibration_set(loaded, options.calib, options.samples)
        if hash_of(encoded) != data_hash:
            raise ConfigError(f"the calibration data on this worker differ from the driver's (hash {hash_of(encoded)}, "
                              f"not {data_hash}): give --calib a file present at the same path on every node")
        run_cells(loaded, [cell], encoded, Evaluator(loaded, options), lambda c, row: rows.__setitem__(c.key, row),
                  manager, options)
    except (Exception, QEError) as exc:
        return failure_row(cell, exc)
    return rows[cell.key]


def cell_spec(cell: Cell) -> dict:
    """What a task needs to rebuild ``cell`` on a worker (plain data) and check it resolves alike."""
    return {"transform": cell.transform, "quantizer": cell.quantizer, "compensator": cell.compensator,
            "setting": cell.setting, "key": cell.key, "fingerprint": cell.composition.fingerprint(),
            "row": {"quantizer": cell.quantizer, "compensator": cell.compensator,
                    "setting": cell.setting.short_name, "label": cell.label}}


def _check_fits(ray: Any, options: CompareOptions) -> None:
    """Refuse cells no node can hold: Ray would keep such tasks waiting for ever."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(r.get("CPU", 0) >= options.cell_cpus and r.get("GPU", 0) >= options.cell_gpus for r in nodes):
        return
    largest = ", ".join(f"{r.get('CPU', 0):g} CPUs and {r.get('GPU', 0):g} GPUs" for r in nodes) or "none alive"
    raise ConfigError(f"no node of the Ray cluster holds a cell of {options.cell_cpus:g} CPUs and "
                      f"{options.cell_gpus:g} GPUs (its nodes: {largest}): lower --cell-cpus or --cell-gpus, "
                      "or add such a node")


def run_on_ray(model: str | None, cells: list[Cell], options: CompareOptions, data_hash: str,
               record: Callable[[Cell, dict], None], manager: Any) -> None:
    """Run ``cells`` as Ray tasks of ``--cell-cpus``/``--cell-gpus`` each; ``record`` each row on
    the driver as its task finishes (so an interrupted grid keeps every finished cell)."""
    from qe.plugins import default_manager

    task_options = replace(options, device=cell_device(options), progress=False)
    # Installed plugins load on each worker; only a manager built in code travels with the task.
    shipped = None if manager is default_manager() else manager
    with ray_connection(quiet=not options.progress) as ray:
        _check_fits(ray, options)
        task = ray.remote(num_cpus=options.cell_cpus, num_gpus=options.cell_gpus,
                          max_retries=MAX_RETRIES)(run_cell_task)
        refs = {task.remote(model, cell_spec(c), task_options, data_hash, shipped): c for c in cells}
        waiting = list(refs)
        if options.progress:
            total = ray.cluster_resources()
            tqdm.write(f"qe compare: {len(cells)} cells as Ray tasks of {options.cell_cpus:g} CPU, "
                       f"{options.cell_gpus:g} GPU each, on a cluster of {total.get('CPU', 0):g} CPUs, "
                       f"{total.get('GPU', 0):g} GPUs")
        bar = tqdm(total=len(cells), desc="compare (ray)", disable=not options.progress)
        try:
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1)
                for ref in done:
                    cell = refs[ref]
                    try:
                        row = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:  # raised outside the cell's own handling
                        row = failure_row(cell, exc.cause or exc, tb=str(exc))
                    except ray.exceptions.RayError as exc:  # the worker died more than MAX_RETRIES times
                        row = failure_row(cell, exc, tb="")
                        deaths = MAX_RETRIES + 1
                        row["error"] += (f" (its worker died {deaths} time{'s' if deaths > 1 else ''}; out of memory? "
                                         "reserve more per cell with --cell-cpus or --cell-gpus)")
                    record(cell, row)
                    bar.set_postfix_str(cell.label)
                    bar.update(1)
        finally:
            bar.close()
            for ref in waiting:  # interrupted: leave no task of this grid running on the cluster
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
