"""What a new user sees: progress estimates, help texts, checkpoint size, the per-layer table,
leftovers after errors."""

import argparse
import json
import logging
from pathlib import Path

import pytest
import torch

import qe
from qe import cli
from qe.commands.quantize import partial_dir, run_quantize
from qe.errors import ConfigError
from qe.models.loading import load_model
from qe.plugins import QEPluginManager
from qe.progress import PLUGIN_NAME, ProgressReporter, format_duration
from qe.recipe import LayerOverride, Recipe

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- progress


class _Clock:
    def __init__(self, step: float):
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def _drive(reporter, command, num_blocks, blocks=None, start=0, **info):
    reporter.qe_run_start(command=command, info={"progress": True, "blocks": blocks, **info})
    for i in range(start, blocks or num_blocks):
        reporter.qe_block_start(block_index=i, num_blocks=num_blocks)
        reporter.qe_block_end(block_index=i, num_blocks=num_blocks)
    reporter.qe_run_end()


def test_estimate_after_the_first_block_then_every_few_minutes():
    lines = []
    reporter = ProgressReporter(clock=_Clock(20.0), write=lines.append)  # each block takes 20 s
    _drive(reporter, "quantize", 30)
    assert lines[0] == "qe quantize: 1/30 blocks done, 20 s per block; about 9 min 40 s left (estimate)"
    # later estimates only after repeat_seconds (300 s = 7.5 blocks of 40 s clock steps)
    assert 3 <= len(lines) <= 5 and all("left (estimate)" in line for line in lines)


def test_estimate_counts_only_the_blocks_the_run_goes_through():
    lines = []
    reporter = ProgressReporter(clock=_Clock(10.0), write=lines.append)
    _drive(reporter, "analyze", 30, blocks=4)  # --layers selects blocks 0..3: four blocks to run
    assert lines == ["qe analyze: 1/4 blocks done, 10 s per block; about 30 s left (estimate)"]
    lines.clear()
    _drive(reporter, "quantize", 10, start=6)  # resumed after block 5
    assert lines[0].startswith("qe quantize: 7/10 blocks done, 10 s per block; about 30 s left")


def test_no_estimate_when_quiet_short_or_outside_a_command():
    lines = []
    reporter = ProgressReporter(clock=_Clock(20.0), write=lines.append)
    reporter.qe_run_start(command="quantize", info={"progress": False})
    reporter.qe_block_start(block_index=0, num_blocks=30)
    reporter.qe_block_end(block_index=0, num_blocks=30)
    fast = ProgressReporter(clock=_Clock(0.01), write=lines.append)
    _drive(fast, "quantize", 30)
    idle = ProgressReporter(clock=_Clock(20.0), write=lines.append)  # a pipeline run without qe_run_start
    idle.qe_block_start(block_index=0, num_blocks=30)
    idle.qe_block_end(block_index=0, num_blocks=30)
    assert lines == []


def test_compare_shows_the_blocks_of_the_current_cell(capsys):
    lines = []
    reporter = ProgressReporter(clock=_Clock(30.0), write=lines.append)
    reporter.qe_run_start(command="compare", info={"progress": True, "cells": ["a", "b", "c"]})
    bars = []
    for cell in range(3):
        reporter.clock = _Clock(0.001 if cell == 0 else 30.0)  # a data-free cell, then two slow ones
        for i in range(4):
            reporter.qe_block_start(block_index=i, num_blocks=4)
            bars.append((reporter._cell_bar.n, reporter._cell_bar.total))
            reporter.qe_block_end(block_index=i, num_blocks=4)
        assert reporter._cell_bar is None  # closed after the cell's last block
    reporter.qe_run_end()
    assert bars[:4] == [(0, 4), (1, 4), (2, 4), (3, 4)] and bars[4] == (0, 4)
    # each slow cell is estimated from its own first block; the fast one says nothing
    assert lines == ["qe compare: the cell's first block took 30 s; about 1 min 30 s left in this cell (estimate)"] * 2
    assert "this cell" in capsys.readouterr().err


def test_compare_runs_with_the_reporter(tmp_path, monkeypatch, capsys):
    from qe.commands.compare import CompareOptions, run_compare

    monkeypatch.setattr(ProgressReporter, "min_seconds_left", 0.0)
    options = CompareOptions(samples=2, eval_tokens=512, caption_nll=False, progress=True)
    _, rows = run_compare("tiny:llava", "rtn", "lowrank[rank=4]", "W4A8", out=tmp_path / "c", options=options)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    err = capsys.readouterr().err
    assert "this cell" in err and "left in this cell (estimate)" in err


def test_every_manager_registers_a_reporter():
    manager = QEPluginManager(load_entry_points=False)
    assert isinstance(manager.pm.get_plugin(PLUGIN_NAME), ProgressReporter)
    assert format_duration(4.25) == "4.2 s" and format_duration(7322) == "2 h 02 min"


def test_quantize_prints_an_estimate_unless_quiet(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ProgressReporter, "min_seconds_left", 0.0)
    args = ["quantize", "--model", "tiny:llava", "--samples", "2", "--compensator", "lowrank[rank=4]"]
    assert cli.main(args + ["--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "qe quantize: 1/2 blocks done" in err and "per block; about" in err
    assert cli.main(args + ["--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert "blocks done" not in capsys.readouterr().err


# --------------------------------------------------------------------------- help texts


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_option_has_help():
    for name, sub in _subparsers(cli.build_parser()).items():
        for action in sub._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                assert action.help, f"qe {name} {action.option_strings[0]} has no help text"


def test_samples_help_names_the_default_and_recipe_help_points_at_the_format():
    subs = _subparsers(cli.build_parser())

    def help_of(command, option):
        return next(a.help for a in subs[command]._actions if option in a.option_strings)

    for command in ("analyze", "quantize", "compare"):
        assert "32" in help_of(command, "--samples")
    assert "8 for layer-error" in help_of("eval", "--samples")
    assert "docs/recipes.md" in help_of("quantize", "--recipe")
    assert (REPO / "docs" / "recipes.md").is_file()


def test_documented_recipe_example_loads(tmp_path):
    """The example recipe in docs/recipes.md is valid."""
    from qe.recipe import load_recipe

    text = (REPO / "docs" / "recipes.md").read_text()
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "r.toml"
    path.write_text(example)
    recipe = load_recipe(path)
    recipe.validate()
    assert recipe.overrides and recipe.skip


def test_samples_above_the_source_say_how_many_were_used(caplog):
    from qe.data.samples import Sample
    from qe.data.sources import take_samples

    samples = [Sample(text=f"t{i}") for i in range(5)]
    with caplog.at_level(logging.WARNING):
        assert take_samples(samples, 100, "images") == samples
    assert "--samples 100 asked, but images has 5: using all 5" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        take_samples(samples, 5, "images")
    assert caplog.text == ""


# --------------------------------------------------------------------------- checkpoint size


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny:llava")


def _logits(model, encoded):
    with torch.no_grad():
        return [model(**e.inputs).logits for e in encoded]


def test_adapters_are_stored_in_the_requested_dtype_and_reload(tiny, tmp_path):
    import copy

    from safetensors.torch import load_file

    from qe.data.calibration import calibration_set

    loaded = copy.copy(tiny)
    loaded.model = copy.deepcopy(tiny.model)
    recipe = Recipe(compensator="lowrank[rank=8]", samples=2)
    path, manifest = run_quantize(recipe, out=tmp_path / "c", loaded=loaded, progress=False, adapter_dtype="float16")
    tensors = load_file(str(path / manifest["shards"][0]))
    adapters = {k: v for k, v in tensors.items() if ".compensator." in k}
    assert adapters and all(v.dtype == torch.float16 for v in adapters.values())
    assert all(v.dtype != torch.float16 for k, v in tensors.items() if k not in adapters)
    assert manifest["adapter_dtype"] == "float16"
    size = manifest["size"]
    assert size["model_dtype"] == "float32" and size["model_bytes"] > 0
    assert size["checkpoint_bytes"] == sum(f.stat().st_size for f in path.iterdir() if f.name != "qe_manifest.json")
    # loading casts them back into float32 modules: the in-memory model with fp16-rounded adapters
    reloaded = qe.load_quantized(path)
    for name, buf in reloaded.model.named_buffers():
        if ".compensator." in name:
            assert buf.dtype == torch.float32
            assert torch.equal(buf, adapters[name].float())
    for name, module in loaded.model.named_modules():
        if name.endswith(".compensator"):
            for b in module.buffers():
                b.copy_(b.half().float())
    _, encoded = calibration_set(loaded, None, 2)
    for a, b in zip(_logits(loaded.model, encoded), _logits(reloaded.model, encoded)):
        assert torch.equal(a, b)
    # the fp16 adapters count half in the effective bits
    assert manifest["effective_bits"]["bits_per_weight_with_adapters"] < _fp32_bits(recipe, tiny, tmp_path)


def _fp32_bits(recipe, tiny, tmp_path):
    import copy

    loaded = copy.copy(tiny)
    loaded.model = copy.deepcopy(tiny.model)
    _, manifest = run_quantize(recipe, out=tmp_path / "fp32", loaded=loaded, progress=False)
    assert manifest["adapter_dtype"] == "float32"  # the model's dtype by default
    return manifest["effective_bits"]["bits_per_weight_with_adapters"]


def test_bfloat16_model_stores_bfloat16_adapters(tmp_path, capsys):
    out = tmp_path / "bf"
    assert cli.main(["quantize", "--model", "tiny:llava", "--dtype", "bfloat16", "--samples", "2",
                     "--compensator", "lowrank[rank=4]", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    manifest = json.loads((out / "qe_manifest.json").read_text())
    assert manifest["adapter_dtype"] == "bfloat16" and manifest["size"]["model_dtype"] == "bfloat16"
    assert "MB; the bfloat16 model is" in text


# --------------------------------------------------------------------------- per-layer table


def test_layer_table_only_when_it_has_figures(tmp_path, capsys):
    base = ["quantize", "--model", "tiny:llava", "--samples", "2"]
    assert cli.main(base + ["--out", str(tmp_path / "rtn")]) == 0
    out = capsys.readouterr().out
    assert "err base" not in out and "–" not in out and "no calibration figures" in out
    assert cli.main(base + ["--compensator", "lowrank[rank=4]", "--out", str(tmp_path / "lr")]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("layer"))
    assert "err base" in header and "router" not in header  # empty columns are left out
    assert f"{tmp_path / 'lr' / 'qe_manifest.json'}" in out
    assert "--adapter-dtype float16" in out  # rank-4 adapters on 64-wide layers are most of the checkpoint
    assert "MB; the float32 model is" in out


def test_render_layer_table_drops_empty_columns():
    manifest = {"layers": [{"name": "m.layers.0.q", "figures": {"quantize_seconds": 0.1}},
                           {"name": "m.layers.0.k", "figures": {"quantize_seconds": 0.1}}]}
    assert cli.render_layer_table(manifest) == ""
    manifest["layers"][0]["figures"]["rel_error"] = 0.5
    table = cli.render_layer_table(manifest).splitlines()
    assert table[0].split() == ["layer", "err"] and table[1].split() == ["q", "0.5000"] and table[2].split() == ["k", "–"]


# --------------------------------------------------------------------------- leftovers


def test_config_error_leaves_no_partial_directory(tmp_path):
    recipe = Recipe(compensator="lowrank[rank=8]", samples=2,
                    overrides=(LayerOverride("*.k_proj", compensator="lowrank[rank=100]"),))
    out = tmp_path / "x"
    with pytest.raises(ConfigError, match="per-layer rank 100"):
        run_quantize(recipe, "tiny:llava", out=out, progress=False)
    # only the (empty, hidden) lock file stays: an OS lock the next run reuses
    assert not partial_dir(out).exists() and [p.name for p in tmp_path.iterdir()] == [".x.lock"]


def test_default_output_folder_is_ignored_by_git():
    lines = (REPO / ".gitignore").read_text().splitlines()
    assert "/quantized/" in lines or "quantized/" in lines


# --------------------------------------------------------------------------- analysis report


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """k=4 with N_r=14 asks for more token-dependent channels than some tiny layers' tokens rank."""
    from qe.commands.analyze import analyze

    out = tmp_path_factory.mktemp("an") / "report"
    path, summary = analyze("tiny:llava", samples=6, out=out, k=4, num_experts=14, progress=False, plot_blocks=(0, 1))
    return path, summary


def test_report_overview_links_one_page_per_block(report):
    import re

    path, summary = report
    index = (path / "index.html").read_text()
    assert "<img" in index and index.count("<img") == 3  # the cross-layer plots only
    assert "href='block-000.html'" in index and "href='block-001.html'" in index
    for block in (0, 1):
        page = (path / f"block-{block:03d}.html").read_text()
        layers = [s for s in summary["layers"] if s["block"] == block]
        assert page.count("<details") == len(layers) and "href='index.html'" in page
        images = re.findall(r"<img src='([^']+)'", page)
        assert len(images) == 3 * len(layers)
        for img in images:
            assert (path / img).is_file()
            assert f"<a href='{img}'>{img}</a>" in page  # every file name is a link
        for s in layers:  # table rows on the overview point at the layer's section
            assert f"href='block-{block:03d}.html#{s['name']}'" in index and f"id='{s['name']}'" in page


def test_never_ranked_channels_are_reported(report):
    import csv

    path, summary = report
    rows = list(csv.DictReader((path / "channels.csv").open()))
    data = json.loads((path / "summary.json").read_text())
    import jsonschema

    from qe.analysis.report import load_schema

    jsonschema.validate(data, load_schema())
    flagged = 0
    for s in data["layers"]:
        expected = [int(r["channel"]) for r in rows if r["layer"] == s["name"]
                    and r["set"].startswith("token_dependent") and float(r["f_all"]) == 0]
        nr = s["never_ranked"]
        assert sorted(nr["channels"]) == sorted(expected) and nr["count"] == len(expected)
        assert nr["of"] == len(s["token_dependent"]) and set(nr["channels"]) <= set(s["token_dependent"])
        flagged += bool(expected)
    assert flagged > 0, "the fixture should produce layers with never-ranked C_r channels"
    index = (path / "index.html").read_text()
    assert "C_r channels no token ranked" in index and "C_r unranked" in index
    worst = max(data["layers"], key=lambda s: s["never_ranked"]["count"])
    page = (path / f"block-{worst['block']:03d}.html").read_text()
    assert f"{worst['never_ranked']['count']} of the {worst['never_ranked']['of']} C_r channels were never" in page


def test_analyze_cli_points_at_never_ranked_channels(tmp_path, capsys):
    out = tmp_path / "r"
    assert cli.main(["analyze", "--model", "tiny:llava", "--samples", "6", "--k", "4", "--num-experts", "14",
                     "--layers", r"layers\.0\.self_attn\.o_proj", "--plot-layers", "0", "--out", str(out),
                     "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "were never in any token's top-k (f_all = 0)" in text


def test_token_map_labels_every_modality_inside_the_figure(tmp_path):
    """The modality labels are y tick labels, inside the saved image, not behind the colorbar."""
    from qe.analysis.analyze import LayerPlotData
    from qe.analysis.report import plot_token_map

    mod = torch.tensor([0] * 5 + [1] * 196 + [0] * 9 + [2] * 3)  # text, vision, text, answer (3 tokens)
    data = LayerPlotData(frequencies={"all": torch.rand(32)}, sample_scores=torch.rand(mod.numel(), 32),
                         sample_modality=mod, npmi=torch.zeros(0, 0), labels=torch.zeros(0, dtype=torch.long))
    import matplotlib.pyplot as plt

    captured = {}
    real_savefig = plt.Figure.savefig

    def spy(fig, *args, **kwargs):
        fig.canvas.draw()
        ax = fig.axes[0]
        captured["labels"] = [(t.get_text(), t.get_window_extent()) for t in ax.get_yticklabels()]
        captured["fig"] = fig.bbox
        return real_savefig(fig, *args, **kwargs)

    plt.Figure.savefig = spy
    try:
        plot_token_map(tmp_path / "t.png", "model.layers.0.q_proj", {"token_independent": [0, 1]}, data)
    finally:
        plt.Figure.savefig = real_savefig
    labels = captured["labels"]
    assert [text for text, _ in labels] == ["text (5)", "vision (196)", "text (9)", "answer (3)"]
    boxes = [box for _, box in labels]
    for box in boxes:
        assert box.x0 >= 0 and box.y0 >= 0 and box.y1 <= captured["fig"].y1
    for upper, lower in zip(boxes, boxes[1:]):
        assert lower.y1 <= upper.y0 + 0.5  # no two labels overprint
