"""The command line: shared options, one-line errors, qe info."""

import json

import pytest

from qe import cli


def test_unknown_setting_is_one_line_error(capsys):
    from qe.errors import QEError
    from qe.settings import parse_setting

    with pytest.raises(QEError):
        parse_setting("W4B8")


def test_help_lists_shared_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["info", "--help"])
    out = capsys.readouterr().out
    for opt in ["--model", "--calib", "--samples", "--device", "--dtype", "--seed", "--quiet", "--out"]:
        assert opt in out


def test_bad_model_path_is_one_line_error(tmp_path, capsys):
    code = cli.main(["info", "--model", str(tmp_path / "missing"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("qe info: error:") and err.count("\n") == 1 and "Traceback" not in err


def test_info_on_default_model(default_model, tmp_path, capsys):
    out_file = tmp_path / "info.json"
    assert cli.main(["info", "--quiet", "--out", str(out_file)]) == 0
    text = capsys.readouterr().out
    assert "adapter   llava" in text and "blocks 0-29" in text and "SYNTHETIC" in text
    info = json.loads(out_file.read_text())
    counts = info["calibration_sample"]["modality_tokens"]
    assert counts["vision"] == 196 and counts["text"] > 0 and counts["answer"] > 0
    assert info["blocks"][0]["linears"]["mlp.down_proj"] == [1536, 576]


def test_quantize_cli_prints_where_and_refuses_existing_output(tmp_path, capsys):
    out = tmp_path / "ckpt"
    args = ["quantize", "--model", "tiny:llava", "--setting", "W4A8", "--samples", "2", "--out", str(out), "--quiet"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "no calibration figures" in text and f"checkpoint written to {out}" in text
    assert cli.main(args) == 2
    assert "exists" in capsys.readouterr().err
    assert cli.main(args + ["--compensator", "lowrank[rank=4]", "--force"]) == 0
    assert "before compensation" in capsys.readouterr().out


def test_seed_zero_on_the_command_line_overrides_a_recipe(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('quantizer = "rtn"\nseed = 5\ntransform = "smoothquant[alpha=0.25]"\n')
    parser = cli.build_parser()
    given = cli.recipe_from_args(parser.parse_args(["quantize", "--recipe", str(recipe), "--seed", "0"]))
    assert given.seed == 0
    kept = cli.recipe_from_args(parser.parse_args(["quantize", "--recipe", str(recipe)]))
    assert kept.seed == 5 and kept.transform == "smoothquant[alpha=0.25]"
    flagged = cli.recipe_from_args(parser.parse_args(["quantize", "--recipe", str(recipe), "--transform", "awq"]))
    assert flagged.transform == "awq" and flagged.validate().label == "awq+rtn+none@W4A8"
