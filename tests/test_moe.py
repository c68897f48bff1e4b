"""Mixture-of-experts decoders: fused experts unfused with the same outputs, each expert
calibrated on the tokens routed to it, starved experts quantized data-free and named."""

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qe
from qe.commands.quantize import run_quantize
from qe.data.calibration import calibration_set
from qe.models.loading import load_model
from qe.models.moe import RoutedExperts, unfuse_experts
from qe.models.tiny import build_tiny_vlm
from qe.pipeline import PipelineOptions, QuantizationPipeline
from qe.quantizers.qlinear import QuantLinear
from qe.recipe import Recipe

QE_SMALL = "qe[k=4;num_experts=2;shared_rank=4;expert_rank=4]"
EXPERTS = "model.language_model.layers.1.mlp.experts"


@pytest.fixture(scope="module")
def fused():
    model, _ = build_tiny_vlm("qwen3_vl_moe")
    return model


def test_loading_unfuses_and_keeps_outputs(fused):
    loaded = load_model("tiny:qwen3_vl_moe")
    assert isinstance(loaded.model.get_submodule(EXPERTS), RoutedExperts)
    assert not isinstance(fused.get_submodule(EXPERTS), RoutedExperts)
    _, encoded = calibration_set(loaded, "images", 2, False)
    with torch.no_grad():
        for e in encoded:
            torch.testing.assert_close(loaded.model(**e.inputs).logits, fused(**e.inputs).logits, rtol=0, atol=1e-6)


@settings(max_examples=15)
@given(seed=st.integers(0, 2**16), tokens=st.integers(1, 40), k=st.integers(1, 4))
def test_routed_experts_equal_the_fused_module(fused, seed, tokens, k):
    module = fused.get_submodule(EXPERTS)
    model = copy.deepcopy(fused)
    assert unfuse_experts(model) == [EXPERTS]
    experts = model.get_submodule(EXPERTS)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 64, generator=g)
    idx = torch.stack([torch.randperm(4, generator=g)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(experts(x, idx, w), module(x, idx, w), rtol=1e-6, atol=1e-6)


def _pipeline(loaded, min_expert_tokens):
    recipe = Recipe(quantizer="rtn", compensator=QE_SMALL, setting="W4A8")
    options = PipelineOptions(progress=False, min_expert_tokens=min_expert_tokens)
    return QuantizationPipeline(loaded, recipe.composition(), options)


def test_each_expert_sees_its_routed_tokens():
    """Every token goes to exactly top-k experts: the experts' token counts, per modality,
    add up to top-k times the block's."""
    loaded = load_model("tiny:qwen3_vl_moe")
    _, encoded = calibration_set(loaded, "images", 4, False)
    result = _pipeline(loaded, 1).run(encoded)
    total = sum(e.num_tokens for e in encoded)
    gate = {r.name: r.figures["tokens"] for r in result.layers if r.name.endswith("gate_proj") and "experts" in r.name}
    assert len(gate) == 4
    assert sum(gate.values()) == 2 * total
    for r in result.layers:
        if "experts" in r.name:
            assert "rel_error" in r.figures  # compensated from its own tokens
    stats_check = loaded.model.get_submodule(f"{EXPERTS}.1.gate_proj")
    assert isinstance(stats_check, QuantLinear) and stats_check.compensator is not None


def test_modality_of_routed_tokens_adds_up():
    from qe.capture import BlockWalker, StreamContext, attach_stats

    loaded = load_model("tiny:qwen3_vl_moe")
    _, encoded = calibration_set(loaded, "images", 3, False)
    walker = BlockWalker(loaded, encoded, progress=False)
    steps = walker.walk()
    next(steps)
    step = next(steps)  # block 1, the sparse one
    context = StreamContext()
    with attach_stats(step.block.module, loaded.adapter, prefix=step.block.prefix, context=context,
                      sample_positions=torch.arange(10_000), hessian=False) as stats:
        step.run(context)
    block_counts = stats["self_attn.q_proj"].input.n_by_modality
    expert_counts = sum(stats[f"mlp.experts.{e}.gate_proj"].input.n_by_modality for e in range(4))
    assert torch.equal(expert_counts, 2 * block_counts)
    # the token sample holds each expert's tokens (all positions sampled here), tagged alike
    for e in range(4):
        inp = stats[f"mlp.experts.{e}.gate_proj"].input
        assert inp.sample.shape[0] == inp.n_tokens
        assert torch.equal(torch.bincount(inp.sample_modality.long(), minlength=3)[:3], inp.n_by_modality[:3])


def test_starved_experts_fall_back_and_are_named():
    loaded = load_model("tiny:qwen3_vl_moe")

    def never_three(module, args, out):  # the router's choice of expert 3 goes to an expert it did not pick
        logits, weights, idx = out
        idx = idx.clone()
        for row in range(idx.shape[0]):
            if 3 in idx[row]:
                idx[row][idx[row] == 3] = next(e for e in range(4) if e not in idx[row])
        return logits, weights, idx

    loaded.model.get_submodule("model.language_model.layers.1.mlp.gate").register_forward_hook(never_three)
    _, encoded = calibration_set(loaded, "images", 4, False)
    pipeline = _pipeline(loaded, 1)
    result = pipeline.run(encoded)
    warning = next(w for w in result.warnings if "routed expert" in w)
    assert f"{EXPERTS}.3 (0 of 1 tokens)" in warning and "experts.1 " not in warning
    starved = loaded.model.get_submodule(f"{EXPERTS}.3.up_proj")
    assert isinstance(starved, QuantLinear) and starved.compensator is None and starved.input_scale is None
    fed = loaded.model.get_submodule(f"{EXPERTS}.1.up_proj")
    assert fed.compensator is not None


def test_moe_checkpoint_reloads_equal(tmp_path):
    loaded = load_model("tiny:qwen3_vl_moe")
    recipe = Recipe(quantizer="gptq", compensator=QE_SMALL, setting="W4A8", calib="images", samples=4)
    path, manifest = run_quantize(recipe, out=tmp_path / "q", loaded=loaded, progress=False, check_heldout=False)
    names = {r["name"] for r in manifest["layers"]}
    assert {f"{EXPERTS}.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")} <= names
    m = json.loads((path / "qe_manifest.json").read_text())
    assert set(m["layouts"]) == names
    reloaded = qe.load_quantized(path)
    assert isinstance(reloaded.model.get_submodule(EXPERTS), RoutedExperts)
    _, encoded = calibration_set(loaded, "images", 2, False)
    with torch.no_grad():
        for e in encoded:
            assert torch.equal(loaded.model(**e.inputs).logits, reloaded.model(**e.inputs).logits)


def test_offloaded_experts_stay_fused(fused, caplog):
    """Experts accelerate offloaded hold no weights here: they are left fused, with a warning."""
    model = copy.deepcopy(fused)
    module = model.get_submodule(EXPERTS)
    module.gate_up_proj = torch.nn.Parameter(module.gate_up_proj.detach().to("meta"))
    module.down_proj = torch.nn.Parameter(module.down_proj.detach().to("meta"))
    module._hf_hook = object()  # what accelerate's dispatch attaches
    with caplog.at_level("WARNING"):
        assert unfuse_experts(model) == []
    assert model.get_submodule(EXPERTS) is module
    assert "left fused" in caplog.text
