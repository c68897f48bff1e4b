"""The families added for issue #21 end to end through the CLI: qe info, qe analyze, qe
quantize (RTN and QE), and checkpoints that reload to equal outputs; the generic fallback
still reads a model whose family no adapter names."""

from __future__ import annotations

import json

import pytest
import torch

import qe
from qe import cli
from qe.commands.quantize import run_quantize
from qe.data.calibration import calibration_set
from qe.models.builtin import GenericAdapter
from qe.models.loading import load_model, select_adapter
from qe.models.moe import RoutedExperts
from qe.quantizers.qlinear import QuantLinear
from qe.recipe import Recipe

QE_SMALL = "qe[k=4;num_experts=2;shared_rank=4;expert_rank=4]"
NEW_FAMILIES = ("qwen3_vl_moe", "mistral3")


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_info_analyze_quantize_reload(family, tmp_path, capsys):
    model = f"tiny:{family}"
    assert cli.main(["info", "--model", model, "--quiet", "--out", str(tmp_path / "info.json")]) == 0
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["num_blocks"] == 2
    assert [v["stack"] for v in info["vision_stacks"]] == ["vision", "projector"]
    assert info["vision_stacks"][0]["num_blocks"] == 2
    assert cli.main(["analyze", "--model", model, "--samples", "3", "--k", "4", "--num-experts", "2", "--quiet",
                     "--plot-layers", "", "--scope", "all", "--out", str(tmp_path / "a")]) == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert {s["stack"] for s in summary["layers"]} == {"vision", "projector", "language"}
    assert cli.main(["quantize", "--model", model, "--quantizer", "rtn", "--setting", "W4A16ch", "--quiet",
                     "--no-eval", "--out", str(tmp_path / "rtn")]) == 0
    rtn = json.loads((tmp_path / "rtn" / "qe_manifest.json").read_text())
    assert rtn["summary"]["layers"] == len(rtn["layouts"]) == 14 + (9 if family == "qwen3_vl_moe" else 0)
    reference = load_model(model)
    _, encoded = calibration_set(reference, "images", 2, False)
    with torch.no_grad():
        before = [reference.model(**e.inputs).logits for e in encoded]
    for name, recipe in (("rtn", Recipe(quantizer="rtn", setting="W4A16ch", samples=3)),
                         ("qe", Recipe(quantizer="rtn", compensator=QE_SMALL, setting="W4A8", samples=3, scope="all"))):
        loaded = load_model(model)
        out, manifest = run_quantize(recipe, out=tmp_path / f"{name}-api", loaded=loaded, progress=False,
                                     check_heldout=False)
        reloaded = qe.load_quantized(out)
        # every reloaded tensor 64-byte aligned, as in memory (else matmuls may round otherwise)
        assert all(t.data_ptr() % 64 == 0 for t in reloaded.model.state_dict().values() if t.numel())
        assert set(manifest["layouts"]) == {n for n, m in reloaded.model.named_modules()
                                             if isinstance(m, QuantLinear)}
        with torch.no_grad():
            for e, b in zip(encoded, before):
                a = loaded.model(**e.inputs).logits
                assert torch.equal(a, reloaded.model(**e.inputs).logits)
                assert not torch.equal(a, b)  # it was quantized
    printed = capsys.readouterr().out
    assert "qe quantize:" in printed


def test_generic_fallback_reads_an_unknown_family():
    """With no adapter naming its model type, the generic fallback finds the language model's
    blocks (not the vision tower's), routed experts included."""
    loaded = load_model("tiny:qwen3_vl_moe")
    loaded.model.config.model_type = "some_new_vlm"
    adapter = select_adapter(loaded.model)
    assert isinstance(adapter, GenericAdapter)
    assert adapter.blocks_prefix(loaded.model) == "model.language_model.layers"
    assert isinstance(loaded.model.get_submodule("model.language_model.layers.1.mlp.experts"), RoutedExperts)
    linears = adapter.block_linears(adapter.decoder_blocks(loaded.model)[1])
    assert {f"mlp.experts.{e}.down_proj" for e in range(4)} <= set(linears)
    assert "mlp.gate" not in linears  # the router holds a raw weight, not a linear: it stays as it is
