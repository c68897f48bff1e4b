"""qe compare and qe eval on a tiny VLM: every file, reruns do no work, failures are recorded."""

import json
from dataclasses import dataclass

import pytest

import qe
from qe import cli
from qe.commands.compare import CompareOptions, run_compare
from qe.compensators.base import Compensator
from qe.errors import ConfigError, QEError
from qe.plugins import QEPluginManager

OPTS = CompareOptions(samples=3, eval_tokens=1024, progress=False)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "grid"
    path, rows = run_compare("tiny:llava", "rtn,gptq", "none,lowrank[rank=4]", "W4A8", out=out, options=OPTS)
    return path, rows


def test_grid_writes_every_file(grid):
    path, rows = grid
    names = {p.name for p in path.iterdir()}
    assert {"results.csv", "results.md", "index.html", "grid.json", "ppl_by_setting.png", "pareto_params.png",
            "pareto_flops.png", "cells"} <= names
    assert [r["label"] for r in rows][0] == "FP32" and len(rows) == 5
    assert all(r["status"] == "ok" for r in rows)
    lowrank = [r for r in rows if r["compensator"] == "lowrank[rank=4]"]
    assert all(r["added_params"] > 0 and r["mean_rel_error"] < r["mean_rel_error_base"] for r in lowrank)
    csv_lines = (path / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 6
    assert "| W4A8 | gptq | lowrank[rank=4] |" in (path / "results.md").read_text()  # no transform column: none ran
    assert csv_lines[0].startswith("setting,transform,quantizer,")
    counts = json.loads((path / "grid.json").read_text())["calibration_tokens"]
    assert counts["vision"] > 0 and counts["text"] + counts["answer"] > 0
    assert f"{counts['vision']} vision" in (path / "results.md").read_text()


def test_rerun_does_no_work(grid, monkeypatch):
    path, rows = grid
    import qe.commands.compare_cells as cells

    def boom(*a, **k):
        raise AssertionError("a finished grid must not quantize again")

    monkeypatch.setattr(cells, "_run_quantized", boom)
    monkeypatch.setattr(cells, "_run_fp_inputs", boom)
    _, again = run_compare("tiny:llava", "rtn,gptq", "none,lowrank[rank=4]", "W4A8", out=path, options=OPTS)
    assert [r["ppl"] for r in again] == [r["ppl"] for r in rows]


def test_different_grid_in_same_directory_is_refused(grid):
    path, _ = grid
    other = CompareOptions(samples=2, eval_tokens=1024, progress=False)
    with pytest.raises(QEError, match="different grid"):
        run_compare("tiny:llava", "rtn", "none", "W4A8", out=path, options=other)


@dataclass(frozen=True)
class _NoConfig:
    pass


class _Failing(Compensator):
    """Always fails (for the test)."""

    name = "failing"

    def fit(self, layer, quantized, plan):
        raise RuntimeError("deliberate failure")


class _Plugin:
    @qe.hookimpl
    def qe_compensators(self):
        return [_Failing]


@pytest.mark.parametrize("propagation", ["quantized", "fp-inputs"])
def test_failing_cell_is_recorded_and_grid_goes_on(tmp_path, propagation):
    manager = QEPluginManager(load_entry_points=False, extra_plugins=[_Plugin()])
    opts = CompareOptions(samples=2, eval_tokens=1024, progress=False, propagation=propagation, caption_nll=False)
    _, rows = run_compare("tiny:llava", "rtn", "failing,none", "W4A8", out=tmp_path / "g", options=opts,
                          manager=manager)
    status = {r["compensator"]: r for r in rows if r["label"] != "FP32"}
    assert status["failing"]["status"] == "error" and "deliberate failure" in status["failing"]["error"]
    assert status["none"]["status"] == "ok" and status["none"]["ppl"] > 0


def test_fp_inputs_grid_shares_statistics_and_matches_quantize(tmp_path):
    """In fp-inputs mode a cell equals the same composition quantized alone in fp-inputs mode."""
    from qe.composition import resolve_composition
    from qe.data.calibration import calibration_set
    from qe.models.loading import load_model
    from qe.pipeline import PipelineOptions, QuantizationPipeline

    opts = CompareOptions(samples=2, eval_tokens=1024, progress=False, propagation="fp-inputs", caption_nll=False)
    _, rows = run_compare("tiny:llava", "gptq", "none,lowrank[rank=4]", "W4A6", out=tmp_path / "g", options=opts)
    loaded = load_model("tiny:llava")
    _, encoded = calibration_set(loaded, None, 2)
    QuantizationPipeline(loaded, resolve_composition("gptq", "lowrank[rank=4]", "W4A6"),
                         PipelineOptions(propagation="fp-inputs", progress=False)).run(encoded)
    from qe.evaluation.perplexity import perplexity

    alone = perplexity(loaded, max_tokens=1024, progress=False).ppl
    in_grid = next(r for r in rows if r["compensator"] == "lowrank[rank=4]")["ppl"]
    assert in_grid == pytest.approx(alone, rel=1e-6)


def test_a_grid_with_a_transform_names_it_in_every_table(tmp_path):
    """rotate+rtn and rtn cells differ only by their transform: the tables must say which is which."""
    opts = CompareOptions(samples=2, eval_tokens=1024, progress=False, caption_nll=False)
    path, rows = run_compare("tiny:llava", "rtn", "none", "W4A8", out=tmp_path / "g", options=opts,
                             transforms=["none", "rotate"])
    md = (path / "results.md").read_text()
    assert "| W4A8 | none | rtn | none |" in md and "| W4A8 | rotate | rtn | none |" in md
    import csv

    with (path / "results.csv").open() as fh:
        assert sorted(r["transform"] for r in csv.DictReader(fh) if r["setting"] != "FP32") == ["none", "rotate"]


def test_bad_grid_input_fails_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="W<bits>A<bits>"):
        run_compare("no/such/model", "rtn", "none", "W4Q8", out=tmp_path / "x", options=OPTS)
    with pytest.raises(ConfigError, match="unknown compensator"):
        run_compare("no/such/model", "rtn", "nonsense", "W4A8", out=tmp_path / "x", options=OPTS)


def test_eval_cli_metrics(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The cat sat on the mat. " * 200)
    out = tmp_path / "ppl.json"
    assert cli.main(["eval", "--model", "tiny:llava", "--text-file", str(text), "--window", "64", "--stride", "32",
                     "--out", str(out), "--quiet"]) == 0
    data = json.loads(out.read_text())
    assert data["ppl"] > 1 and data["window"] == 64
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert cli.main(["eval", "--model", "tiny:llava", "--text-file", str(short), "--quiet"]) == 2
    assert "fewer than one window" in capsys.readouterr().err
    out2 = tmp_path / "cap.json"
    assert cli.main(["eval", "--model", "tiny:llava", "--metric", "caption-nll", "--out", str(out2), "--quiet"]) == 0
    assert json.loads(out2.read_text())["tokens"] > 0


def test_layer_error_is_zero_against_itself_and_positive_when_quantized(tmp_path):
    from qe.commands.quantize import run_quantize
    from qe.data.calibration import calibration_set
    from qe.evaluation.metrics import layer_errors
    from qe.models.loading import load_model
    from qe.recipe import Recipe

    ref = load_model("tiny:llava")
    _, encoded = calibration_set(ref, None, 2, split="eval")
    rows = layer_errors(ref, load_model("tiny:llava"), encoded)
    assert all(r["rel_error"] == 0 for r in rows)
    path, _ = run_quantize(Recipe(samples=2), "tiny:llava", out=tmp_path / "q", progress=False)
    rows = layer_errors(ref, qe.load_quantized(path), encoded)
    assert all(r["rel_error"] > 0 for r in rows) and rows[0]["rel_error_vision"] is not None


def test_grid_accepts_setting_strings_and_objects():
    from qe.commands.compare import grid_cells
    from qe.settings import parse_setting

    cells = grid_cells(["rtn"], ["none"], ["W4A16chsym", parse_setting("W4A8")])
    assert [c.setting.short_name for c in cells] == ["W4A16chsym", "W4A8"]


@pytest.mark.parametrize("propagation", ["quantized", "fp-inputs"])
def test_a_transform_axis_in_the_grid(tmp_path, propagation):
    opts = CompareOptions(samples=2, eval_tokens=512, caption_nll=False, progress=False, propagation=propagation)
    _, rows = run_compare("tiny:llava", "rtn", "none", "W4A8", out=tmp_path / "g", options=opts,
                          transforms="none,smoothquant[alpha=0.5]")
    by_label = {r["label"]: r for r in rows}
    assert set(by_label) == {"FP32", "rtn+none@W4A8", "smoothquant[alpha=0.5]+rtn+none@W4A8"}
    smoothed = by_label["smoothquant[alpha=0.5]+rtn+none@W4A8"]
    assert smoothed["status"] == "ok" and smoothed["transform"] == "smoothquant[alpha=0.5]"
    assert smoothed["ppl"] != by_label["rtn+none@W4A8"]["ppl"]  # the transform changed the model
    assert smoothed["mean_rel_error_base"] is not None  # a transform reads calibration data
