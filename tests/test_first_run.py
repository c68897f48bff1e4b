"""What a first ``qe quantize`` shows: which calibration and why, a before/after line a person
understands (held-out perplexity, calibration vs held-out error), and a warning when the
samples are too few for the compensator."""

from __future__ import annotations

import math

import torch

from qe import cli
from qe.commands.quantize import run_quantize
from qe.evaluation import before_after
from qe.models.loading import load_model
from qe.recipe import Recipe

QE_SMALL = "qe[k=4;num_experts=2;shared_rank=4;expert_rank=4]"


def test_the_before_after_check_measures_both_models(tmp_path):
    loaded = load_model("tiny:llava")
    fp = before_after.measure_reference(loaded, [])
    _, manifest = run_quantize(Recipe(quantizer="rtn", compensator=QE_SMALL, setting="W3A8", samples=3),
                               out=tmp_path / "q", loaded=loaded, progress=False)
    check = manifest["heldout_check"]
    assert check["ppl_full_precision"] == fp.ppl  # measured before the model changed
    assert math.isfinite(check["ppl_quantized"]) and check["ppl_quantized"] != fp.ppl
    assert check["heldout_tokens"] == 2 * 511  # two windows of 512 tokens, each predicting 511
    assert check["hidden_rel_error_calibration"] > 0 and check["hidden_rel_error_heldout"] > 0
    # the figure is what it says: the quantized model's hidden-state error on held-out text
    again = before_after.compare_with(fp, loaded.model)
    assert again["hidden_rel_error_heldout"] == check["hidden_rel_error_heldout"]


def test_relative_error_is_zero_for_an_unchanged_model():
    loaded = load_model("tiny:llava")
    ref = before_after.measure_reference(loaded, [])
    same = before_after.compare_with(ref, loaded.model)
    assert same["hidden_rel_error_heldout"] == 0.0 and same["ppl_quantized"] == ref.ppl
    with torch.no_grad():
        loaded.model.get_input_embeddings().weight.mul_(1.5)
    assert before_after.compare_with(ref, loaded.model)["hidden_rel_error_heldout"] > 0


def test_quantize_prints_the_line_and_the_calibration_and_warns_on_few_tokens(tmp_path, capsys):
    code = cli.main(["quantize", "--model", "tiny:llava", "--compensator", QE_SMALL.replace("expert_rank=4", "expert_rank=64"),
                     "--samples", "2", "--out", str(tmp_path / "q"), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "held-out perplexity" in ln)
    assert "full precision → quantized" in line and "on calibration samples" in line and "on held-out text" in line
    assert "calibration: images" in out
    assert "warning: qe fits from" in out and "wants at least 2048" in out  # 16 · 2 experts · rank 64
    code = cli.main(["quantize", "--model", "tiny:llava", "--samples", "2", "--out", str(tmp_path / "r"),
                     "--quiet", "--no-eval"])
    assert code == 0 and "held-out perplexity" not in capsys.readouterr().out


def test_manifest_counts_calibration_tokens_by_source(tmp_path):
    loaded = load_model("tiny:llava")
    loaded.card = {**(loaded.card or {}), "synthetic_vision_tower": True}  # as the embedded default
    _, manifest = run_quantize(Recipe(samples=4), out=tmp_path / "q", loaded=loaded, progress=False, check_heldout=False)
    calib = manifest["calibration"]
    assert calib["source"].startswith("mixed") and "synthetic" in calib["source"]
    assert calib["tokens_by_source"]["pydoc"] == 2 * 512 and calib["tokens_by_source"]["builtin"] > 0
    assert sum(calib["tokens_by_source"].values()) == sum(calib["tokens"].values())
    assert manifest["heldout_check"] is None


def test_analyze_and_compare_say_which_calibration(tmp_path, capsys):
    assert cli.main(["analyze", "--model", "tiny:llava", "--samples", "2", "--k", "4", "--num-experts", "2",
                     "--plot-layers", "0", "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert "qe analyze: calibration: images" in capsys.readouterr().out
    assert cli.main(["compare", "--model", "tiny:llava", "--samples", "2", "--quantizers", "rtn", "--compensators",
                     "none", "--settings", "W4A8", "--eval-tokens", "512", "--no-caption-nll",
                     "--out", str(tmp_path / "c"), "--quiet"]) == 0
    assert "qe compare: calibration: images" in capsys.readouterr().out
