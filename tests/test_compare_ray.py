"""qe compare --executor ray on a local Ray cluster started here: the same rows and cell keys as
a serial grid in both propagation modes, a killed worker's cell rerun, resuming across executors,
and the one-line errors (no Ray, no cluster)."""

import json
import os
import sys
from pathlib import Path

import pytest

import qe
from qe import cli
from qe.commands.compare import CompareOptions, run_compare
from qe.compensators.base import Compensator
from qe.errors import ConfigError
from qe.plugins import QEPluginManager

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'qe-quant[ray]')")

GRID = ("tiny:llava", "rtn", "none,lowrank[rank=4]", "W4A8")
# Figures that depend on the run (time, how many cells shared the capture), not on the cell.
RUN_FIGURES = {"quantize_seconds", "fit_seconds", "eval_seconds", "shared_capture_seconds", "shared_stream_seconds",
               "cells_in_run"}


def _options(propagation="quantized", **kw):
    return CompareOptions(samples=2, eval_tokens=512, caption_nll=False, progress=False, propagation=propagation, **kw)


def _figures(path: Path) -> dict[str, dict]:
    """Every cell file of a grid directory by name (its key), less the run-dependent figures."""
    return {f.name: {k: v for k, v in json.loads(f.read_text()).items() if k not in RUN_FIGURES}
            for f in sorted((path / "cells").glob("*.json"))}


def test_without_ray_the_executor_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'qe-quant\[ray\]'"):
        run_compare(*GRID, out=tmp_path / "g", options=_options(executor="ray"))
    assert not (tmp_path / "g").exists()  # refused before any work


def test_unreachable_cluster_is_one_line(tmp_path, monkeypatch):
    assert not ray.is_initialized()  # runs before the module's cluster starts
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # nothing listens on port 1
    with pytest.raises(ConfigError, match=r"Ray cluster at 127\.0\.0\.1:1 .*RAY_ADDRESS.*ray start --head") as info:
        run_compare(*GRID, out=tmp_path / "g", options=_options(executor="ray"))
    assert "\n" not in str(info.value)
    assert not ray.is_initialized() and not (tmp_path / "g").exists()  # refused before any work
    monkeypatch.setenv("RAY_ADDRESS", "head-node")
    with pytest.raises(ConfigError, match=r"Ray cluster at head-node \(not host:port\)"):
        run_compare(*GRID, out=tmp_path / "g", options=_options(executor="ray"))


@pytest.fixture(scope="module")
def cluster():
    """One local two-CPU Ray instance for the module (start-up takes seconds)."""
    from ray import cloudpickle

    # The test's plugins travel by value: a worker cannot import this test module.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def serial_grids(tmp_path_factory):
    """The serial grids the Ray grids must reproduce, one per propagation mode."""
    root = tmp_path_factory.mktemp("serial")
    return {p: run_compare(*GRID, out=root / p, options=_options(p))[0] for p in ("quantized", "fp-inputs")}


@pytest.mark.parametrize("propagation", ["quantized", "fp-inputs"])
def test_ray_grid_equals_the_serial_grid(cluster, serial_grids, tmp_path, propagation):
    path, rows = run_compare(*GRID, out=tmp_path / "g", options=_options(propagation, executor="ray"))
    assert [r["status"] for r in rows] == ["ok"] * 3
    serial = _figures(serial_grids[propagation])
    assert _figures(path) == serial  # same keys, same figures to the last bit
    lowrank = next(r for r in rows if r["compensator"] == "lowrank[rank=4]")
    assert lowrank["mean_rel_error"] < lowrank["mean_rel_error_base"]  # a real fit ran in the task


class _DiesOnce:
    """Kills the process it runs in at the end of the first block it sees: once in all, the
    marker file remembers across processes."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    @qe.hookimpl
    def qe_block_end(self, block_index, num_blocks, figures):
        if not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)


def test_a_worker_killed_mid_cell_has_its_cell_rerun(cluster, serial_grids, tmp_path):
    marker = tmp_path / "died"
    manager = QEPluginManager(extra_plugins=[_DiesOnce(marker)])
    path, rows = run_compare(*GRID, out=tmp_path / "g", options=_options(executor="ray"), manager=manager)
    assert marker.exists()  # a worker did die mid-cell
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert _figures(path) == _figures(serial_grids["quantized"])


class _AlwaysDies:
    @qe.hookimpl
    def qe_block_end(self, block_index, num_blocks, figures):
        os._exit(1)


def test_a_cell_whose_worker_keeps_dying_is_recorded_as_failed(cluster, tmp_path, monkeypatch):
    import qe.commands.compare_ray as compare_ray

    monkeypatch.setattr(compare_ray, "MAX_RETRIES", 0)  # one death is the last
    manager = QEPluginManager(extra_plugins=[_AlwaysDies()])
    _, rows = run_compare("tiny:llava", "rtn", "none", "W4A8", out=tmp_path / "g", options=_options(executor="ray"),
                          manager=manager)
    assert rows[1]["status"] == "error" and "worker died 1 time;" in rows[1]["error"]  # and the next run retries it


def test_a_serial_grid_finishes_on_ray_and_a_rerun_redoes_nothing(cluster, serial_grids, tmp_path, monkeypatch,
                                                                  capsys):
    import qe.commands.compare_cells as compare_cells
    import qe.commands.compare_ray as compare_ray

    out = tmp_path / "g"
    run_compare("tiny:llava", "rtn", "none", "W4A8", out=out, options=_options())  # started serially
    started = {f.name: f.read_text() for f in (out / "cells").glob("*.json")}
    args = ["compare", "--model", "tiny:llava", "--quantizers", "rtn", "--compensators", "none,lowrank[rank=4]",
            "--settings", "W4A8", "--samples", "2", "--eval-tokens", "512", "--no-caption-nll", "--quiet",
            "--out", str(out), "--executor", "ray", "--cell-cpus", "1"]
    assert cli.main(args) == 0
    assert "2 cells (0 failed)" in capsys.readouterr().out
    cells = {f.name: f.read_text() for f in (out / "cells").glob("*.json")}
    assert {k: cells[k] for k in started} == started  # the serial cells were not recomputed
    assert _figures(out) == _figures(serial_grids["quantized"])

    def boom(*a, **k):
        raise AssertionError("a finished grid must not run a cell again")

    for module, name in ((compare_ray, "run_on_ray"), (compare_cells, "_run_quantized"),
                         (compare_cells, "_run_fp_inputs")):
        monkeypatch.setattr(module, name, boom)
    assert cli.main(args) == 0  # on Ray again
    assert cli.main(args[:-4]) == 0  # and serially
    assert {f.name: f.read_text() for f in (out / "cells").glob("*.json")} == cells


def test_cell_resources_need_the_ray_executor(tmp_path, capsys):
    assert cli.main(["compare", "--model", "tiny:llava", "--cell-gpus", "1", "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "--executor ray" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="--cell-cpus 0"):
        run_compare(*GRID, out=tmp_path / "g", options=_options(executor="ray", cell_cpus=0))


def test_a_cell_no_node_can_hold_is_refused(cluster, tmp_path):
    """Ray would keep a task asking for a GPU that no node has waiting for ever."""
    with pytest.raises(ConfigError, match=r"no node of the Ray cluster holds a cell of 1 CPUs and 1 GPUs \(its nodes: "
                                          r"2 CPUs and 0 GPUs\)"):
        run_compare(*GRID, out=tmp_path / "g", options=_options(executor="ray", cell_gpus=1))


class _Absent(Compensator):
    """Installed on the driver only (for the test)."""

    name = "driver-only"


class _DriverOnly:
    @qe.hookimpl
    def qe_compensators(self):
        return [_Absent]


def test_a_task_whose_worker_differs_from_the_driver_records_why():
    """A cell needing a plugin the worker lacks, or calibration data that differ from the
    driver's, is an error row naming the cause (the task run in process, as a worker would)."""
    from qe.commands.compare import grid_cells
    from qe.commands.compare_ray import cell_spec, run_cell_task

    driver = QEPluginManager(load_entry_points=False, extra_plugins=[_DriverOnly()])
    missing = grid_cells("rtn", "driver-only", "W4A8", manager=driver)[0]
    row = run_cell_task("tiny:llava", cell_spec(missing), _options(), "0" * 16)  # the worker's default plugins
    assert row["status"] == "error" and row["label"] == "rtn+driver-only@W4A8"
    assert "driver-only" in row["error"] and "install the same qe and plugins" in row["error"]
    cell = grid_cells("rtn", "none", "W4A8")[0]
    row = run_cell_task("tiny:llava", cell_spec(cell), _options(), "0" * 16)
    assert row["status"] == "error" and "differ from the driver's" in row["error"]
