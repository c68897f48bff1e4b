"""The block walker: blocks replayed one at a time from captured inputs give the whole-model
forward, for every tiny family (Qwen3-VL's deepstack features added between blocks included)."""

from __future__ import annotations

import pytest
import torch

from qe.capture import BlockWalker
from qe.commands.quantize import run_quantize
from qe.data.calibration import calibration_set
from qe.models import tiny
from qe.models.loading import load_model
from qe.recipe import Recipe


def _final_norm_input(loaded, encoded) -> list[torch.Tensor]:
    """What the language model's final norm receives in an ordinary forward: the last block's
    output, after anything the model adds between blocks."""
    norm = loaded.adapter.language_model(loaded.model).norm
    seen: list[torch.Tensor] = []
    handle = norm.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            for e in encoded:
                loaded.model(**e.inputs, use_cache=False)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_walking_every_block_equals_the_whole_model_forward(family):
    loaded = load_model(f"tiny:{family}")
    _, encoded = calibration_set(loaded, "images", 3)
    walker = BlockWalker(loaded, encoded, batch_size=1, progress=False)
    outputs = None
    for step in walker.walk():
        outputs = step.run()
    # the last block's outputs, plus what the model adds after it (nothing for these families)
    last = walker.num_blocks - 1
    walked = [loaded.adapter.after_block(last, h, b.between) for h, b in zip(outputs, step.inputs.batches)]
    reference = _final_norm_input(loaded, encoded)
    assert len(walked) == len(reference)
    for a, b in zip(walked, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_qwen3_vl_deepstack_is_replayed_between_blocks():
    loaded = load_model("tiny:qwen3_vl")
    _, encoded = calibration_set(loaded, "images", 2)
    walker = BlockWalker(loaded, encoded, batch_size=1, progress=False)
    between = walker.inputs().batches[0].between
    assert between["deepstack_visual_embeds"] and between["visual_pos_masks"].any()
    # without the deepstack addition the walk would differ from the model's own forward
    hidden = torch.randn(1, 4, 3)
    assert torch.equal(loaded.adapter.after_block(5, hidden, between), hidden)  # past the deepstack layers


def test_quantize_a_tiny_qwen3_vl_block_wise(tmp_path):
    recipe = Recipe(quantizer="gptq", compensator="qe[k=4;num_experts=2;shared_rank=4;expert_rank=4]",
                    setting="W4A8", samples=2)
    path, manifest = run_quantize(recipe, "tiny:qwen3_vl", out=tmp_path / "q3", progress=False)
    assert len(manifest["layers"]) == 14
    assert all(r["figures"]["rel_error"] < r["figures"]["rel_error_base"] for r in manifest["layers"])


def test_analyze_and_compare_a_tiny_qwen3_vl(tmp_path):
    from qe.commands.analyze import analyze
    from qe.commands.compare import CompareOptions, run_compare

    _, summary = analyze("tiny:qwen3_vl", samples=3, out=tmp_path / "a", k=4, num_experts=2, progress=False,
                         plot_blocks=())
    assert len(summary["layers"]) == 14
    opts = CompareOptions(samples=2, eval_tokens=512, caption_nll=False, progress=False, propagation="fp-inputs")
    _, rows = run_compare("tiny:qwen3_vl", "rtn", "lowrank[rank=4]", "W4A8", out=tmp_path / "c", options=opts)
    assert [r["status"] for r in rows] == ["ok", "ok"]


def test_quantize_and_reload_a_tiny_gemma3(tmp_path):
    import qe

    loaded = load_model("tiny:gemma3")
    recipe = Recipe(transform="smoothquant", quantizer="gptq", compensator="qe[k=4;num_experts=2;shared_rank=4;expert_rank=4]",
                    setting="W4A8", samples=2)
    path, manifest = run_quantize(recipe, out=tmp_path / "g3", loaded=loaded, progress=False)
    modes = {r["name"].rsplit(".", 1)[-1]: r["smoothing"] for r in manifest["layers"]}
    assert modes["gate_proj"] == "folded" and modes["q_proj"] == "folded"  # Gemma's (1 + w) norms
    assert all(r["figures"]["rel_error"] < r["figures"]["rel_error_base"] for r in manifest["layers"])
    reloaded = qe.load_quantized(path)
    ids = torch.arange(5, 40).reshape(1, -1)
    with torch.no_grad():
        assert torch.equal(reloaded.model(input_ids=ids).logits, loaded.model(input_ids=ids).logits)
