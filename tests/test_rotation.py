"""The rotate transform: Hadamard matrices, rotations that leave every tiny family's outputs
unchanged, online rotations in QuantLinear, composition with smoothing, quantizers and
compensators at W4A4, checkpoints that reload to the same logits, resume, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qe
from qe.commands.quantize import partial_dir, run_quantize
from qe.data.images import builtin_image_captions, default_prompt
from qe.errors import ConfigError
from qe.kernels import ops
from qe.kernels import reference as twin
from qe.models import tiny
from qe.models.loading import load_model, load_quantized
from qe.plugins import QEPluginManager, default_manager
from qe.quantized import fake_quantize_activations
from qe.quantizers.grid import quantize_rtn
from qe.quantizers.qlinear import QuantLinear
from qe.recipe import Recipe
from qe.settings import parse_setting
from qe.transforms import hadamard
from qe.transforms.base import ModelContext
from qe.transforms.rotation import ResidualRotation, RotatedLinear, rotate_model

FAST = settings(max_examples=10, deadline=None)
KNOWN_ORDERS = [1, 2, 4, 12, 20, 28, 36, 64, 96, 128, 576, 1536]

# ----------------------------------------------------------------------------- Hadamard matrices


@pytest.mark.parametrize("m,kind", [(12, "paley-i"), (20, "paley-i"), (28, "paley-ii"), (36, "paley-ii"), (44, "paley-i")])
def test_paley_matrices_are_hadamard(m, kind):
    h = hadamard.small_hadamard(m)
    assert h.shape == (m, m)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64))
    assert hadamard._small_orders()[m][0] == kind


def test_factor_orders_of_the_default_model_widths():
    assert hadamard.factor_order(576) == (16, 36)
    assert hadamard.factor_order(1536) == (128, 12)
    assert hadamard.factor_order(64) == (64, 1)
    assert hadamard.factor_order(100) is None  # 100 = 4 · 25: no Hadamard order 25, 50 or 100 known here
    with pytest.raises(ConfigError, match="kind=random"):
        hadamard.hadamard_matrix(100)


@given(n=st.sampled_from(KNOWN_ORDERS))
@FAST
def test_hadamard_matrices_are_orthogonal(n):
    h = hadamard.hadamard_matrix(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, n ** -0.5))  # every entry ±1/√n: outliers spread evenly


@given(n=st.integers(1, 96), seed=st.integers(0, 1000))
@FAST
def test_random_rotations_are_orthogonal_and_seeded(n, seed):
    q = hadamard.random_orthogonal(n, seed)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    assert torch.equal(q, hadamard.random_orthogonal(n, seed))
    s = hadamard.random_signs(n, seed)
    assert set(s.unique().tolist()) <= {-1.0, 1.0}


@given(n=st.sampled_from([12, 36, 64, 576]), seed=st.integers(0, 99), kind=st.sampled_from(["hadamard", "random"]))
@FAST
def test_residual_rotations_are_orthogonal_and_applied_by_rows(n, seed, kind):
    rot = ResidualRotation(n, kind, seed)
    q = rot.matrix()
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    w = torch.randn(3, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert torch.allclose(rot.right(w), w @ q, atol=1e-10)
    signs = hadamard.random_signs(n, seed)
    assert torch.allclose(hadamard.hadamard_rows(w, signs), (w * signs.double()) @ hadamard.hadamard_matrix(n), atol=1e-10)


# ----------------------------------------------------------------------------- the online rotation (twins)


@given(n=st.sampled_from([12, 36, 64, 96, 576]), t=st.integers(1, 5), seed=st.integers(0, 99))
@FAST
def test_hadamard_twin_equals_the_dense_definition(n, t, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, t, n, generator=g) * 3
    signs = hadamard.random_signs(n, seed)
    expected = (x.double() * signs.double()) @ hadamard.hadamard_matrix(n)
    got = ops.hadamard_transform(x, signs)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert torch.allclose(got.double(), expected, atol=1e-5 * float(expected.abs().max()) + 1e-6)
    # orthogonal: the transform keeps every token's norm
    assert torch.allclose(got.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)


def test_hadamard_refuses_a_width_without_a_matrix():
    with pytest.raises(ops.KernelError, match="no Hadamard matrix of order 100"):
        ops.hadamard_transform(torch.zeros(2, 100))


triton_kernels = pytest.importorskip("qe.kernels.triton_kernels", reason="triton is not installed")


@pytest.mark.skipif(not triton_kernels.INTERPRET and not torch.cuda.is_available(),
                    reason="Triton kernels need CUDA or TRITON_INTERPRET=1 (set by conftest)")
@pytest.mark.parametrize("n", [64, 12, 576, 1536])
def test_fwht_kernel_equals_the_twin(n):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p, m = hadamard.factor_order(n)
    small = hadamard.small_hadamard(m).float().to(device) if m > 1 else None
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(n)).to(device)
    signs = hadamard.random_signs(n, 7).to(torch.int8).to(device)
    y_kernel = triton_kernels.hadamard_transform(x, signs, p, small)
    y_twin = twin.hadamard_transform(x, signs, p, small)
    # fp32 butterflies in another order: within a few ulps of the row norm
    assert torch.allclose(y_kernel, y_twin, atol=1e-5 * float(x.norm(dim=1).max()))
    y16 = triton_kernels.hadamard_transform(x.half(), signs, p, small)
    assert y16.dtype == torch.float16
    assert torch.allclose(y16.float(), y_twin, atol=2e-3 * float(y_twin.abs().max()))


# ----------------------------------------------------------------------------- rotated models


def _rotate(loaded, **kwargs):
    blocks = loaded.adapter.decoder_blocks(loaded.model)
    prefix = loaded.adapter.blocks_prefix(loaded.model)
    linears = {f"{prefix}.{i}.{n}": m for i, b in enumerate(blocks) for n, m in loaded.adapter.block_linears(b).items()}
    return rotate_model(ModelContext(loaded.model, loaded.adapter, linears, parse_setting("W4A4")), **kwargs)


@pytest.fixture(scope="module")
def image_sample():
    return builtin_image_captions("calib")[0]


@pytest.mark.parametrize("family", tiny.FAMILIES)
@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_a_rotated_model_equals_the_original(family, kind, image_sample):
    loaded = load_model(f"tiny:{family}")
    image = loaded.adapter.encode(loaded.processor, image_sample, default_prompt(), loaded.model)
    text = {"input_ids": torch.tensor([[5, 17, 300, 42, 7, 99, 250]])}
    emb_before = loaded.model.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        ref = [loaded.model(**image.inputs).logits, loaded.model(**text).logits]
    warnings = _rotate(loaded, kind=kind, seed=3)
    with torch.no_grad():
        out = [loaded.model(**image.inputs).logits, loaded.model(**text).logits]
    for a, b in zip(ref, out):
        assert torch.allclose(a, b, atol=2e-5 * float(a.abs().max())), float((a - b).abs().max())
    blocks = loaded.adapter.decoder_blocks(loaded.model)
    moe = family.endswith("_moe")  # routed experts: neither rotation covers them yet, said so
    assert all(isinstance(b.get_submodule(n), RotatedLinear) for b in blocks
               for n in (("self_attn.o_proj",) if moe else ("self_attn.o_proj", "mlp.down_proj")))
    rotated_residual = not torch.allclose(loaded.model.get_input_embeddings().weight, emb_before)
    if moe:
        assert not rotated_residual and "routes tokens to experts" in warnings[0]
    elif family == "gemma3":  # norms after the attention and MLP outputs: online rotations only, said so
        assert not rotated_residual and "not rotated" in warnings[0]
    else:
        assert rotated_residual and warnings == []
        assert loaded.model.get_output_embeddings().weight is not loaded.model.get_input_embeddings().weight
        norm = loaded.adapter.final_norm(loaded.model)
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))  # its gain went into the LM head


def test_the_vision_projector_must_be_rotated(image_sample, monkeypatch):
    """Image tokens enter the residual stream through the projector: leaving it out breaks the
    equality on image inputs only (so the family test above would catch it), and an adapter
    that names no projector gets no residual rotation."""
    loaded = load_model("tiny:llava")
    image = loaded.adapter.encode(loaded.processor, image_sample, default_prompt(), loaded.model)
    text = {"input_ids": torch.tensor([[5, 17, 300, 42]])}
    with torch.no_grad():
        ref = [loaded.model(**image.inputs).logits, loaded.model(**text).logits]
    monkeypatch.setattr(type(loaded.adapter), "vision_output_linears", ())
    assert "vision_output_linears" in loaded.adapter.residual_rotation_issue(loaded.model)
    monkeypatch.setattr(type(loaded.adapter), "residual_rotation_issue", lambda self, model: None)
    _rotate(loaded)
    with torch.no_grad():
        out = [loaded.model(**image.inputs).logits, loaded.model(**text).logits]
    assert not torch.allclose(ref[0], out[0], atol=1e-3)
    assert torch.allclose(ref[1], out[1], atol=1e-5)


@given(seed=st.integers(0, 10_000), d_in=st.sampled_from([12, 64, 96]), d_out=st.integers(1, 9), bias=st.booleans())
@FAST
def test_online_and_offline_rotations_cancel(seed, d_in, d_out, bias):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(d_in, d_out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=g))
    rotated = RotatedLinear.from_linear(lin, hadamard.random_signs(d_in, seed))
    x = torch.randn(4, 3, d_in, generator=g)
    with torch.no_grad():
        assert torch.allclose(rotated(x), lin(x), atol=1e-5 * float(lin(x).abs().max()) + 1e-6)


def test_rotation_spreads_an_outlier_channel_and_lowers_the_a4_error():
    """What the rotation is for: a token with one huge channel loses every other channel to
    the per-token 4-bit grid; rotated, the outlier is spread over all channels."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=g)
    x[:, 5] *= 40.0
    w = torch.randn(32, 128, generator=g)
    signs = hadamard.random_signs(128, 0)
    plain = fake_quantize_activations(x, 4) @ w.T
    rotated_x = ops.hadamard_transform(x, signs)
    w_rot = (w.double() @ torch.diag(signs.double()) @ hadamard.hadamard_matrix(128)).float()
    rotated = fake_quantize_activations(rotated_x, 4) @ w_rot.T
    ref = x @ w.T
    err_plain = float((plain - ref).pow(2).sum() / ref.pow(2).sum())
    err_rot = float((rotated - ref).pow(2).sum() / ref.pow(2).sum())
    assert err_rot < 0.5 * err_plain


def test_quant_linear_rotates_its_input_first():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 64, generator=g)
    signs = hadamard.random_signs(64, 2)
    q = quantize_rtn(w, 4, 0, True)
    ql = QuantLinear.from_quantized(q, a_bits=4, input_rotation=signs)
    assert ql.input_rotation.dtype == torch.int8 and ql.layout()["input_rotation"] is True
    x = torch.randn(5, 64, generator=g)
    expected = fake_quantize_activations(ops.hadamard_transform(x, signs), 4) @ q.dequantize().T
    assert torch.allclose(ql(x), expected, atol=1e-5)
    plain = QuantLinear.from_quantized(q, a_bits=4)
    assert "input_rotation" not in plain.layout()  # layouts without a rotation are unchanged


# ----------------------------------------------------------------------------- the plugin and the pipeline


def test_rotate_plugin_parameters_are_checked_before_a_model_loads():
    pm = default_manager()
    assert pm.resolve("transform", "rotate[kind=random;seed=4;smooth=awq]").config.smooth == "awq"
    with pytest.raises(ConfigError, match="not a transform"):
        pm.resolve("transform", "rotate[smooth=awqq]")
    with pytest.raises(ConfigError, match="rotate twice"):
        pm.resolve("transform", "rotate[smooth=rotate]")
    with pytest.raises(ConfigError):
        pm.resolve("transform", "rotate[kind=givens]")
    t = pm.create("transform", "rotate")
    assert t.changes_model() and not t.smooths() and not t.needs_calibration()
    assert pm.create("transform", "rotate[smooth=smoothquant]").smooths()


def _encoded(loaded, n=3):
    from qe.data.calibration import calibration_set

    return calibration_set(loaded, None, n, False)[1]


@pytest.mark.parametrize("recipe", [
    dict(quantizer="rtn", compensator="none", transform="rotate"),  # data-free
    dict(quantizer="gptq", compensator="lowrank[rank=4]", transform="rotate[smooth=smoothquant]"),
    dict(quantizer="rtn", compensator="none", transform="rotate[smooth=awq]"),
    dict(quantizer="gptq", compensator="qe[k=4;num_experts=2;shared_rank=4;expert_rank=2]", transform="rotate[kind=random]"),
])
def test_rotated_w4a4_checkpoint_reloads_to_the_same_logits(tmp_path, recipe):
    loaded = load_model("tiny:llava")
    encoded = _encoded(loaded)
    path, manifest = run_quantize(Recipe(setting="W4A4", samples=3, **recipe), out=tmp_path / "ckpt", loaded=loaded,
                                  progress=False, check_heldout=False)
    rotated = [n for n, lay in manifest["layouts"].items() if lay["linear"].get("input_rotation")]
    assert sorted({n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in rotated}) == [
        "mlp.down_proj", "self_attn.o_proj"]
    assert manifest["tied"] == {}  # the LM head holds the final norm's gain: untied
    back = load_quantized(path)
    assert not back.model.config.get_text_config().tie_word_embeddings
    with torch.no_grad():
        for e in encoded:
            assert torch.equal(loaded.model(**e.inputs).logits, back.model(**e.inputs).logits)
    qls = [m for m in back.model.modules() if isinstance(m, QuantLinear)]
    assert sum(m.input_rotation is not None for m in qls) == 4 and all(m.a_bits == 4 for m in qls)
    if "smooth=awq" in recipe["transform"]:  # the smoothing ran per group, after the rotation
        assert all("awq_ratio" in r["figures"] for r in manifest["layers"])


def test_rotate_with_qe_runs_its_alpha_search_in_the_rotated_basis(tmp_path):
    loaded = load_model("tiny:qwen2_vl")
    recipe = Recipe(quantizer="rtn", compensator="qe[k=4;num_experts=2;shared_rank=4;expert_rank=2]",
                    transform="rotate", setting="W4A4", samples=3)
    _, manifest = run_quantize(recipe, out=tmp_path / "ckpt", loaded=loaded, progress=False, check_heldout=False)
    assert all("alpha_error" in r["figures"] for r in manifest["layers"])  # the per-group α search ran
    assert manifest["composition"]["transform"] == "rotate"


class _Interrupt:
    @qe.hookimpl
    def qe_block_end(self, block_index, num_blocks, figures):
        if block_index == 0:
            raise KeyboardInterrupt


def test_resume_of_a_rotated_run_equals_the_uninterrupted_run(tmp_path, same_checkpoint_tensors):

    recipe = Recipe(quantizer="gptq", compensator="lowrank[rank=4]", transform="rotate", setting="W4A4", samples=3)
    full, _ = run_quantize(recipe, "tiny:llava", out=tmp_path / "full", progress=False, check_heldout=False)
    out = tmp_path / "resumed"
    manager = QEPluginManager(load_entry_points=False, extra_plugins=[_Interrupt()])
    with pytest.raises(KeyboardInterrupt):
        run_quantize(recipe, "tiny:llava", out=out, progress=False, manager=manager, check_heldout=False)
    assert json.loads((partial_dir(out) / "progress.json").read_text())["finished"] == 1
    run_quantize(recipe, "tiny:llava", out=out, resume=True, progress=False, check_heldout=False)
    same_checkpoint_tensors(full, out)


def test_export_refuses_an_online_rotation(tmp_path):
    from qe.export.plan import check_base

    q = quantize_rtn(torch.randn(4, 64), 4, 0, True)
    ql = QuantLinear.from_quantized(q, a_bits=8, input_rotation=hadamard.random_signs(64, 0))
    with pytest.raises(ConfigError, match="rotated online") as e:
        check_base("layers.0.mlp.down_proj", ql)
    assert "\n" not in str(e.value)


def test_compare_refuses_rotate_in_fp_inputs_mode(tmp_path):
    from qe.commands.compare import CompareOptions, run_compare

    with pytest.raises(ConfigError, match="propagation quantized"):
        run_compare("tiny:llava", "rtn", "none", "W4A4", out=tmp_path / "c", transforms="none,rotate",
                    options=CompareOptions(propagation="fp-inputs", progress=False))


def test_compare_runs_a_rotated_cell_beside_an_unrotated_one(tmp_path):
    from qe.commands.compare import CompareOptions, run_compare

    _, rows = run_compare("tiny:llava", "rtn", "none", "W8A8", out=tmp_path / "c", transforms="none,rotate",
                          options=CompareOptions(samples=2, eval_tokens=1024, caption_nll=False, progress=False))
    by_label = {r["label"]: r for r in rows}
    assert by_label["rotate+rtn+none@W8A8"]["status"] == "ok"
    # W8A8 on a model whose outputs the rotation does not change: both near FP32
    fp = by_label["FP32"]["ppl"]
    for label in ("rtn+none@W8A8", "rotate+rtn+none@W8A8"):
        assert abs(by_label[label]["ppl"] - fp) < 0.05 * fp
