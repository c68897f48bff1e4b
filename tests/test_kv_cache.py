"""The quantized KV cache (``KV<bits>`` in a setting): the grid's invariants, an attention
wrapper that is transparent until marked on every tiny family, a cache consistent between one
forward and token-by-token decoding, checkpoints that reload it, and the export refusal."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qe.commands.quantize import run_quantize
from qe.errors import ConfigError
from qe.export.plan import check_kv_cache
from qe.models import tiny
from qe.models.loading import load_model, load_quantized
from qe.quantizers import kv_cache
from qe.recipe import Recipe

FAST = settings(max_examples=25, deadline=None)
TEXT = torch.tensor([[5, 17, 300, 42, 7, 99, 250, 12, 64, 3]])


@st.composite
def vectors(draw):
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.sampled_from([2, 8, 16, 64])))
    seed = draw(st.integers(0, 10_000))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@given(x=vectors(), bits=st.integers(2, 8))
@FAST
def test_the_grid_keeps_each_vectors_range_and_errs_at_most_half_a_step(x, bits):
    q = kv_cache.fake_quantize_kv(x, bits)
    assert q.shape == x.shape and q.dtype == x.dtype
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    step = (hi - lo) / (2 ** bits - 1)
    assert torch.equal(q.amin(-1, keepdim=True), lo)  # the minimum is a grid point
    assert torch.allclose(q.amax(-1, keepdim=True), hi, atol=1e-5 * float(hi.abs().max()) + 1e-12)
    assert bool(((q - x).abs() <= step / 2 * (1 + 1e-4) + 1e-6 * float(x.abs().max())).all())
    assert all(v.unique().numel() <= 2 ** bits for v in q.reshape(-1, x.shape[-1]))


@given(x=vectors(), bits=st.integers(2, 8))
@FAST
def test_quantizing_a_quantized_vector_returns_it(x, bits):
    """Why a cache can hold quantized tokens and be quantized again as a whole."""
    q = kv_cache.fake_quantize_kv(x, bits)
    assert torch.allclose(kv_cache.fake_quantize_kv(q, bits), q, atol=1e-5 * float(q.abs().max()) + 1e-12)


@pytest.mark.parametrize("head_dim", [8, 10, 16, 64, 80, 96, 128])
def test_head_rotations_are_orthogonal(head_dim):
    r = kv_cache.head_rotation(head_dim).double()
    assert torch.allclose(r @ r.T, torch.eye(head_dim, dtype=torch.float64), atol=1e-6)


def _attention(module, q, k, v, mask=None, **kwargs):
    """Plain attention in transformers' signature: (batch, heads, tokens, dim) in, (batch, tokens, heads, dim) out."""
    p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return (p @ v).transpose(1, 2), None


def test_the_wrapper_attends_the_rotated_quantized_cache_and_rotates_back():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 12, 64, generator=g) for _ in range(3))
    k[..., 5] *= 30  # a large key channel, as rotary keys have
    module = torch.nn.Module()
    wrapped = kv_cache.quantized_attention(_attention)
    ref = _attention(module, q, k, v)[0]
    assert torch.equal(wrapped(module, q, k, v)[0], ref)  # unmarked: the base, untouched
    kv_cache.mark_attention(module, 4)
    out = wrapped(module, q, k, v)[0]
    r = kv_cache.head_rotation(64)
    expected = _attention(module, q @ r, kv_cache.fake_quantize_kv(k @ r, 4), kv_cache.fake_quantize_kv(v @ r, 4))[0] @ r.T
    assert torch.allclose(out, expected, atol=1e-6)
    unrotated = _attention(module, q, kv_cache.fake_quantize_kv(k, 4), kv_cache.fake_quantize_kv(v, 4))[0]
    err, err_unrotated = float((out - ref).norm() / ref.norm()), float((unrotated - ref).norm() / ref.norm())
    assert err < 0.5 * err_unrotated, (err, err_unrotated)  # the rotation spreads the large channel


def _logits(model, ids=TEXT):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _attentions(loaded):
    return [b.get_submodule(loaded.adapter.attention_name) for b in loaded.adapter.decoder_blocks(loaded.model)]


def _enable(loaded):
    kv_cache.enable(loaded.adapter.language_model(loaded.model), _attentions(loaded)[0])


def _mark_all(loaded, bits):
    _enable(loaded)
    for attention in _attentions(loaded):
        kv_cache.mark_attention(attention, bits)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_the_wrapper_is_transparent_until_marked_and_quantizes_once_marked(family):
    loaded = load_model(f"tiny:{family}")
    ref = _logits(loaded.model)
    _enable(loaded)
    assert loaded.adapter.language_model(loaded.model).config._attn_implementation.startswith("qe_kv_")
    assert torch.equal(_logits(loaded.model), ref)
    _mark_all(loaded, 8)
    kv8 = _logits(loaded.model)
    _mark_all(loaded, 2)
    kv2 = _logits(loaded.model)
    err8, err2 = float((kv8 - ref).norm() / ref.norm()), float((kv2 - ref).norm() / ref.norm())
    assert 0 < err8 < 0.05, err8  # 8 bits: close, and not identical (the marks act)
    assert err2 > 4 * err8, (err2, err8)  # fewer bits, more error


def test_a_copy_of_a_model_with_a_quantized_cache_keeps_it():
    import copy

    loaded = load_model("tiny:llava")
    _mark_all(loaded, 3)
    want = _logits(loaded.model)
    twin = copy.deepcopy(loaded.model)
    del loaded
    assert torch.equal(_logits(twin), want)
    assert all(kv_cache.marked_bits(b.self_attn) == 3 for b in twin.model.language_model.layers)


def test_one_forward_equals_token_by_token_decoding_through_the_cache():
    """The cache stores each token as quantized when written; attending the whole sequence
    at once quantizes each token the same way, so both give the same logits."""
    loaded = load_model("tiny:llava")
    unmarked = _logits(loaded.model)
    _mark_all(loaded, 4)
    lm = loaded.model
    full = _logits(lm)
    assert not torch.allclose(full, unmarked, atol=1e-3 * float(unmarked.abs().max()))
    with torch.no_grad():
        out = lm(input_ids=TEXT[:, :4], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(4, TEXT.shape[1]):
            out = lm(input_ids=TEXT[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
    decoded = torch.cat(steps, dim=1)
    assert torch.allclose(decoded, full, atol=1e-4 * float(full.abs().max())), float((decoded - full).abs().max())


def test_a_kv4_checkpoint_reloads_its_cache_quantization(tmp_path):
    recipe = dict(quantizer="gptq", compensator="lowrank[rank=4]", samples=3)
    loaded = load_model("tiny:llava")
    path, manifest = run_quantize(Recipe(setting="W4A8KV4", **recipe), out=tmp_path / "kv4", loaded=loaded,
                                  progress=False, check_heldout=False)
    assert manifest["composition"]["setting"] == "W4A8KV4chsym"
    back = load_quantized(path)
    assert torch.equal(_logits(back.model), _logits(loaded.model))
    blocks = back.adapter.decoder_blocks(back.model)
    assert all(kv_cache.marked_bits(b.get_submodule("self_attn")) == 4 for b in blocks)
    plain, _ = run_quantize(Recipe(setting="W4A8", **recipe), "tiny:llava", out=tmp_path / "plain", progress=False,
                            check_heldout=False)
    assert not torch.allclose(_logits(load_quantized(plain).model), _logits(back.model))
    with pytest.raises(ConfigError, match="quantizes the KV cache") as e:
        check_kv_cache(manifest)
    assert "\n" not in str(e.value)


def test_a_data_free_kv_run_marks_every_block(tmp_path):
    loaded = load_model("tiny:qwen2_vl")
    run_quantize(Recipe(quantizer="rtn", compensator="none", setting="W8A8KV4", samples=2), out=tmp_path / "c",
                 loaded=loaded, progress=False, check_heldout=False)
    blocks = loaded.adapter.decoder_blocks(loaded.model)
    assert [kv_cache.marked_bits(b.get_submodule("self_attn")) for b in blocks] == [4] * len(blocks)


def test_an_attention_qe_cannot_wrap_is_one_line():
    loaded = load_model("tiny:llava")
    lm = loaded.adapter.language_model(loaded.model)
    lm.config._attn_implementation = "flex_attention"
    with pytest.raises(Exception, match="wraps only sdpa or eager") as e:
        kv_cache.enable(lm, _attentions(loaded)[0])
    assert "\n" not in str(e.value)


def test_eager_attention_stays_the_familys_own():
    """Gemma's eager attention soft-caps its logits: the wrapper must call that function, not a
    generic one that would ignore the cap (the wrapped model is then no longer the model)."""
    loaded = load_model("tiny:gemma3")
    lm = loaded.adapter.language_model(loaded.model)
    lm.config._attn_implementation = "eager"
    for attention in _attentions(loaded):
        attention.attn_logit_softcapping = 1.0
    ref = _logits(loaded.model)
    _enable(loaded)
    assert lm.config._attn_implementation == "qe_kv_eager"
    assert torch.equal(_logits(loaded.model), ref)
    _mark_all(loaded, 8)
    err = float((_logits(loaded.model) - ref).norm() / ref.norm())
    assert 0 < err < 0.05, err


def test_the_vision_tower_keeps_its_attention_under_scope_all(tmp_path):
    loaded = load_model("tiny:llava")
    run_quantize(Recipe(quantizer="rtn", compensator="none", setting="W8A8KV4", samples=2, scope="all"),
                 out=tmp_path / "all", loaded=loaded, progress=False, check_heldout=False)
    assert all(kv_cache.marked_bits(a) == 4 for a in _attentions(loaded))
    vision = loaded.model.model.vision_tower
    assert not any(kv_cache.marked_bits(m) for m in vision.modules())
    assert not vision.config._attn_implementation.startswith("qe_kv_")
    with pytest.raises(ConfigError, match="--scope vision") as e:
        run_quantize(Recipe(quantizer="rtn", compensator="none", setting="W8A8KV4", samples=2, scope="vision"),
                     "tiny:llava", out=tmp_path / "vision", progress=False, check_heldout=False)
    assert "\n" not in str(e.value)


def test_a_resume_with_every_block_done_quantizes_the_cache(tmp_path):
    import qe
    from qe.commands.quantize import partial_dir
    from qe.plugins import QEPluginManager

    blocks = len(load_model("tiny:llava").blocks)

    class StopAfterLastBlock:
        @qe.hookimpl
        def qe_block_end(self, block_index, num_blocks, figures):
            if block_index == blocks - 1:  # its block file is written: only the manifest is missing
                raise KeyboardInterrupt

    recipe = Recipe(quantizer="gptq", compensator="none", setting="W4A8KV4", samples=2)
    out = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        run_quantize(recipe, "tiny:llava", out=out, progress=False, check_heldout=False,
                     manager=QEPluginManager(load_entry_points=False, extra_plugins=[StopAfterLastBlock()]))
    assert partial_dir(out).is_dir()
    loaded = load_model("tiny:llava")
    run_quantize(recipe, out=out, loaded=loaded, resume=True, progress=False, check_heldout=False)
    assert [kv_cache.marked_bits(a) for a in _attentions(loaded)] == [4] * blocks


@pytest.mark.parametrize("propagation", ["quantized", "fp-inputs"])
def test_a_compare_cell_with_a_quantized_cache_equals_the_composition_run_alone(tmp_path, propagation):
    from qe.commands.compare import CompareOptions, run_compare
    from qe.composition import resolve_composition
    from qe.data.calibration import calibration_set
    from qe.evaluation.perplexity import perplexity
    from qe.pipeline import PipelineOptions, QuantizationPipeline

    opts = CompareOptions(samples=2, eval_tokens=1024, progress=False, propagation=propagation, caption_nll=False)
    _, rows = run_compare("tiny:llava", "gptq", "lowrank[rank=4]", "W4A8,W4A8KV2", out=tmp_path / "g", options=opts)
    ppl = {r["setting"]: r["ppl"] for r in rows if r.get("compensator") == "lowrank[rank=4]"}
    loaded = load_model("tiny:llava")
    _, encoded = calibration_set(loaded, None, 2)
    QuantizationPipeline(loaded, resolve_composition("gptq", "lowrank[rank=4]", "W4A8KV2"),
                         PipelineOptions(propagation=propagation, progress=False)).run(encoded)
    alone = perplexity(loaded, max_tokens=1024, progress=False).ppl
    assert ppl["W4A8KV2"] == pytest.approx(alone, rel=1e-6)
    assert ppl["W4A8KV2"] != pytest.approx(ppl["W4A8"], rel=1e-4)  # the cache's quantization reached the grid
