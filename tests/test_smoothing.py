"""The smoothing transform (qe.transforms.smoothing) and the transform plugins built on it."""

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.gemma3n.modeling_gemma3n import Gemma3nRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from qe.errors import ConfigError
from qe.plugins import default_manager
from qe.quantized import fake_quantize_activations
from qe.quantizers.gptq import GPTQ
from qe.quantizers.grid import quantize_rtn
from qe.quantizers.rtn import RTN
from qe.settings import parse_setting
from qe.transforms.base import GroupContext
from qe.transforms.builtin import AWQ, AlphaSearch, AWQConfig, SmoothQuant
from qe.transforms.smoothing import (
    SCALE_RANGE,
    activation_scales,
    choose_alpha,
    fold_into_norm,
    relative_group_error,
    search_activation_scales,
    smooth_hessian,
    smooth_tokens,
    smooth_weight,
    smoothing_scales,
)

ALPHAS = st.one_of(st.none(), st.floats(0.0, 1.0))


@st.composite
def groups(draw, max_linears=3):
    """Tokens with outlier channels and a smoothing group of linears reading them."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    d_in, tokens = draw(st.integers(1, 24)), draw(st.integers(1, 12))
    x = torch.randn(tokens, d_in, generator=g) * torch.exp(2 * torch.randn(d_in, generator=g))
    weights = [torch.randn(draw(st.integers(1, 10)), d_in, generator=g) for _ in range(draw(st.integers(1, max_linears)))]
    if draw(st.booleans()) and d_in > 1:
        x[:, 0] = 0  # a channel that never fires
        weights[0][:, -1] = 0
        for w in weights:
            w[:, -1] = 0  # a channel no weight reads
    return x, weights


# --------------------------------------------------------------------------- the transform


@given(groups(), ALPHAS)
def test_smoothing_leaves_the_full_precision_output_unchanged(group, alpha):
    x, weights = group
    s = smoothing_scales(x.abs().amax(0), weights, alpha)
    for w in weights:
        y = x.double() @ w.double().T
        y_smoothed = smooth_tokens(x.double(), s) @ smooth_weight(w.double(), s).T  # (X/s)(W diag s)ᵀ
        torch.testing.assert_close(y_smoothed, y, rtol=1e-6, atol=1e-9 * float(y.abs().max().clamp_min(1)))


@given(groups(), ALPHAS)
def test_smoothing_scales_follow_the_formula(group, alpha):
    x, weights = group
    absmax = x.abs().amax(0)
    s = smoothing_scales(absmax, weights, alpha)
    assert s.shape == absmax.shape and s.dtype == torch.float32
    if alpha is None:
        assert (s == 1).all()
        return
    w_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
    live = (absmax > 0) & (w_max > 0)
    assert (s[~live] == 1).all()
    expected = (absmax.double() ** alpha / w_max.double() ** (1 - alpha)).clamp(*SCALE_RANGE).float()
    torch.testing.assert_close(s[live], expected[live], rtol=1e-5, atol=0)
    assert (s >= SCALE_RANGE[0]).all() and (s <= SCALE_RANGE[1]).all()


def test_alpha_zero_is_not_no_smoothing():
    w = torch.tensor([[2.0, 0.5], [-4.0, 0.25]])
    s = smoothing_scales(torch.tensor([3.0, 7.0]), [w], 0.0)
    torch.testing.assert_close(s, torch.tensor([0.25, 2.0]))  # 1 / max|W_:,j|
    with pytest.raises(ConfigError, match="alpha"):
        smoothing_scales(torch.ones(2), [w], 1.5)


@given(groups(), ALPHAS)
def test_smoothed_hessian_is_the_hessian_of_the_smoothed_tokens(group, alpha):
    x, weights = group
    s = smoothing_scales(x.abs().amax(0), weights, alpha)
    H = x.double().T @ x.double()
    xs = smooth_tokens(x.double(), s)
    smoothed = smooth_hessian(H, s)
    torch.testing.assert_close(smoothed, xs.T @ xs, rtol=1e-9, atol=1e-9 * float(H.abs().max().clamp_min(1)))
    assert torch.equal(smoothed, smoothed.T)  # exactly symmetric, as the Hessian it smooths


# --------------------------------------------------------------------------- folding into norms


def _layernorm(d):
    n = nn.LayerNorm(d)
    with torch.no_grad():
        n.weight.uniform_(0.5, 2.0)
        n.bias.normal_()
    return n


def _rms(cls, d, init=lambda w: w.uniform_(0.5, 2.0)):
    n = cls(d)
    with torch.no_grad():
        init(n.weight)
    return n


NORMS = {
    "layernorm": _layernorm,
    "torch-rmsnorm": lambda d: _rms(nn.RMSNorm, d),
    "llama": lambda d: _rms(LlamaRMSNorm, d),
    "qwen2": lambda d: _rms(Qwen2RMSNorm, d),
    "gemma (1 + w)": lambda d: _rms(GemmaRMSNorm, d, lambda w: w.uniform_(-0.5, 0.5)),
    "gemma3n (w)": lambda d: _rms(Gemma3nRMSNorm, d),
}


@pytest.mark.parametrize("kind", list(NORMS))
def test_folding_into_the_norm_gives_the_same_block_outputs(kind):
    d = 16
    g = torch.Generator().manual_seed(0)
    norm = NORMS[kind](d)
    x = torch.randn(10, d, generator=g) * 3
    weights = [torch.randn(8, d, generator=g), torch.randn(4, d, generator=g)]
    with torch.no_grad():
        before = [norm(x) @ w.T for w in weights]
        act_absmax = norm(x).abs().amax(0)
    s = smoothing_scales(act_absmax, weights, 0.5)
    assert fold_into_norm(norm, s)
    with torch.no_grad():
        after = [norm(x) @ smooth_weight(w, s).T for w in weights]
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


class ScaledTanh(nn.Module):
    """A norm-like module no fold applies to."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return torch.tanh(x) * self.weight


class OddRMSNorm(nn.Module):
    """Named like an RMSNorm but scaling by w², which neither fold matches."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight**2


@pytest.mark.parametrize("module", [ScaledTanh(6), OddRMSNorm(6), nn.LayerNorm(6, elementwise_affine=False)])
def test_unknown_norms_are_left_alone_with_one_warning(module):
    state = {k: v.clone() for k, v in module.state_dict().items()}
    s = torch.linspace(0.5, 2.0, 6)
    with pytest.warns(RuntimeWarning, match="explicit input scale"):
        assert not fold_into_norm(module, s)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time it is silent
        assert not fold_into_norm(module, s)
    for k, v in module.state_dict().items():
        assert torch.equal(v, state[k])


def test_folding_checks_the_scale_length():
    with pytest.raises(ConfigError, match="do not fit"):
        fold_into_norm(LlamaRMSNorm(8), torch.ones(6))


# --------------------------------------------------------------------------- choosing α


def rtn_fn(setting):
    def quantize_fn(w, h, exempt):
        return quantize_rtn(w, setting.w_bits, setting.group_size, setting.symmetric, exempt).dequantize()
    return quantize_fn


def outlier_group(seed=0, tokens=256, d_in=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=g)
    x[:, :3] *= 60  # activation outlier channels, as in real LLM inputs
    weights = [torch.randn(32, d_in, generator=g) * 0.05, torch.randn(16, d_in, generator=g) * 0.05]
    return x, weights


def test_choose_alpha_reports_every_candidate_and_picks_the_smallest_error():
    x, weights = outlier_group()
    setting = parse_setting("W8A4")
    candidates = (None, 0.25, 0.5, 0.75)
    best, errors, _ = choose_alpha(candidates, x.abs().amax(0), weights, x, rtn_fn(setting), setting.a_bits)
    assert list(errors) == list(candidates)
    assert errors[best] == min(errors.values())
    assert best is not None and errors[best] < 0.5 * errors[None]  # smoothing tames A4 outliers here
    # the reported figure is the group's relative output error, computed independently
    s = smoothing_scales(x.abs().amax(0), weights, best)
    num = den = 0.0
    for w in weights:
        y = x @ w.T
        w_hat = quantize_rtn(smooth_weight(w, s), 8, 0, True).dequantize()
        num += float((y - fake_quantize_activations(x / s, 4) @ w_hat.T).pow(2).sum())
        den += float(y.pow(2).sum())
    assert errors[best] == pytest.approx(num / den, rel=1e-4)


def test_choose_alpha_hands_the_smoothed_weight_and_hessian_to_the_quantizer():
    x, weights = outlier_group(tokens=32, d_in=12)
    H = (x.T @ x).double()
    exempt = torch.zeros(12, dtype=torch.bool)
    exempt[1] = True
    seen = []

    def quantize_fn(w, h, ex):
        seen.append((w, h, ex))
        return w  # no weight error
    _, errors, _ = choose_alpha((None, 0.5), x.abs().amax(0), weights, x, quantize_fn, 16, hessian=H, exempt=exempt)
    s = smoothing_scales(x.abs().amax(0), weights, 0.5)
    assert len(seen) == 4 and all(ex is exempt for _, _, ex in seen)
    torch.testing.assert_close(seen[2][0], smooth_weight(weights[0], s))
    torch.testing.assert_close(seen[3][1], smooth_hessian(H, s))
    assert max(errors.values()) < 1e-10  # A16 and exact weights: no error, exempt columns added back exactly


def test_exempt_channels_are_zeroed_before_the_activation_scale():
    x, weights = outlier_group()
    act_exempt = torch.zeros(64, dtype=torch.bool)
    act_exempt[:3] = True  # the outlier channels
    ident = lambda w, h, ex: w  # noqa: E731
    plain = relative_group_error(x, weights, weights, torch.ones(64), 4)
    exempted = relative_group_error(x, weights, weights, torch.ones(64), 4, act_exempt=act_exempt)
    assert exempted < 0.1 * plain  # the outliers no longer set each token's scale
    best, errors, _ = choose_alpha((None,), x.abs().amax(0), weights, x, ident, 4, act_exempt=act_exempt)
    assert best is None and errors[None] == pytest.approx(exempted)


def test_choose_alpha_returns_the_chosen_quantization_and_reads_only_max_tokens():
    x, weights = outlier_group()
    setting = parse_setting("W8A4")
    calls = []

    def quantize_fn(w, h, ex):
        q = quantize_rtn(w, 8, 0, True)
        calls.append(q)
        return q  # an object with .dequantize(), as the pipeline passes
    candidates = (None, 0.25, 0.5, 0.75)
    choice = choose_alpha(candidates, x.abs().amax(0), weights, x, quantize_fn, setting.a_bits)
    k = candidates.index(choice.alpha)
    assert all(a is b for a, b in zip(choice.quantized, calls[2 * k: 2 * k + 2], strict=True))  # its own quantizations
    s = smoothing_scales(x.abs().amax(0), weights, choice.alpha)
    for w, q in zip(weights, choice.quantized):
        torch.testing.assert_close(q.dequantize(), quantize_rtn(smooth_weight(w, s), 8, 0, True).dequantize())
    # max_tokens: the error is computed on the first rows only (rows past it are ignored)
    poisoned = torch.cat([x[:100], torch.full_like(x[100:], 1e6)])
    head = choose_alpha(candidates, x.abs().amax(0), weights, poisoned, quantize_fn, setting.a_bits, max_tokens=100)
    direct = choose_alpha(candidates, x.abs().amax(0), weights, x[:100], quantize_fn, setting.a_bits)
    assert head.errors == direct.errors


def test_choose_alpha_calls_each_weight_s_own_quantize_function():
    x, weights = outlier_group()
    seen = []

    def named(i, bits):
        return lambda w, h, ex: seen.append(i) or quantize_rtn(w, bits, 0, True)
    candidates = (None, 0.5)
    per_weight = choose_alpha(candidates, x.abs().amax(0), weights, x, [named(i, 8) for i in range(len(weights))], 8)
    assert seen == list(range(len(weights))) * len(candidates)
    shared = choose_alpha(candidates, x.abs().amax(0), weights, x, named(0, 8), 8)
    assert per_weight.errors == shared.errors
    # a coarser grid for one weight only changes the result: each function serves its own weight
    mixed = choose_alpha(candidates, x.abs().amax(0), weights, x, [named(0, 8), named(1, 3)], 8)
    assert mixed.errors != shared.errors
    with pytest.raises(ConfigError, match="one per weight"):
        choose_alpha(candidates, x.abs().amax(0), weights, x, [named(0, 8)], 8)

def test_group_error_with_one_mask_per_weight_pools_the_single_weight_errors():
    x, weights = outlier_group()
    g = torch.Generator().manual_seed(1)
    masks = [torch.rand(64, generator=g) < 0.2 for _ in weights]
    deq = [quantize_rtn(w, 3, 0, True).dequantize() for w in weights]
    s = smoothing_scales(x.abs().amax(0), weights, 0.5)
    pooled = relative_group_error(x, weights, deq, s, 6, exempt=masks, act_exempt=masks)
    dens = [float((x @ w.T).double().pow(2).sum()) for w in weights]
    nums = [relative_group_error(x, [w], [d], s, 6, exempt=m, act_exempt=m) * den
            for w, d, m, den in zip(weights, deq, masks, dens)]
    assert pooled == pytest.approx(sum(nums) / sum(dens), rel=1e-9)
    with pytest.raises(ConfigError, match="one per weight"):
        relative_group_error(x, weights, deq, s, 6, exempt=masks[:1])


def test_choose_alpha_refuses_empty_input():
    x, weights = outlier_group(tokens=4, d_in=8)
    with pytest.raises(ConfigError):
        choose_alpha((), x.abs().amax(0), weights, x, lambda w, h, e: w, 8)
    with pytest.raises(ConfigError):
        choose_alpha((None,), x.abs().amax(0), weights, x[:0], lambda w, h, e: w, 8)


# --------------------------------------------------------------------------- transform plugins


def group_context(x, weights, setting, quantizer=None, modality=None, hessian=None):
    quantizer = quantizer or RTN()
    fn = lambda w, h, e: quantizer.quantize(w, setting, hessian=h, exempt=e)  # noqa: E731
    return GroupContext(names=[f"l{i}" for i in range(len(weights))], weights=weights, tokens=x,
                        token_modality=modality, act_absmax=x.abs().amax(0), hessian=hessian, setting=setting,
                        exempt=[None] * len(weights), act_exempt=[None] * len(weights), quantize=[fn] * len(weights))


def test_transforms_are_plugins_of_their_own_kind_and_compose_with_any_quantizer():
    manager = default_manager()
    assert {"none", "smoothquant", "awq", "alpha-search"} <= set(manager.names("transform"))
    assert "smoothquant" not in manager.names("quantizer") and "awq" not in manager.names("quantizer")
    sq = manager.create("transform", "smoothquant[alpha=0.75]")
    assert isinstance(sq, SmoothQuant) and sq.config.alpha == 0.75 and not sq.needs_hessian
    for bad in ("smoothquant[alpha=1.5]", "smoothquant[alpha=-0.1]", "smoothquant[beta=1]", "awq[grid=0]",
                "awq[vision_weight=-1]", "alpha-search[candidates=2]"):
        with pytest.raises(ConfigError):
            manager.resolve("transform", bad)
    from qe.composition import resolve_composition

    with pytest.raises(ConfigError, match="--transform smoothquant"):
        resolve_composition("smoothquant", "none", "W4A8")
    c = resolve_composition("gptq", "qe", "W4A6", transform="awq[grid=4]")
    assert c.label == "awq[grid=4]+gptq+qe@W4A6" and c.fingerprint()["transform"][0] == "awq"
    assert "transform" not in resolve_composition("gptq", "qe", "W4A6").fingerprint()  # keys without a transform kept


def test_smoothquant_transform_gives_the_smoothing_scales_of_its_alpha():
    x, weights = outlier_group(tokens=64, d_in=32)
    setting = parse_setting("W4A8")
    out = SmoothQuant(SmoothQuant.Config(alpha=0.5)).group_scales(group_context(x, weights, setting))
    assert out.alpha == 0.5
    torch.testing.assert_close(out.scale, smoothing_scales(x.abs().amax(0), weights, 0.5))


def test_awq_and_alpha_search_search_with_the_compositions_quantizer():
    """The search quantizes with whatever quantizer the composition has (here GPTQ, with the
    Hessian), not an inner quantizer of its own."""
    x, weights = outlier_group(tokens=64, d_in=32)
    setting = parse_setting("W4A8")
    H = (x.T @ x).double()
    calls = []

    class Counting(GPTQ):
        def quantize(self, w, setting, **k):
            calls.append(k["hessian"] is not None)
            return super().quantize(w, setting, **k)

    ctx = group_context(x, weights, setting, Counting(), hessian=H)
    AWQ(AWQConfig(grid=3)).group_scales(ctx)
    assert calls == [True] * 3 * len(weights)
    calls.clear()
    out = AlphaSearch(AlphaSearch.Config(candidates=(None, 0.5))).group_scales(ctx)
    assert calls == [True] * 2 * len(weights) and len(out.quantized) == len(weights)
    assert out.alpha in (None, 0.5) and "alpha_error" in out.figures


# --------------------------------------------------------------------------- AWQ-style search (MBQ weighting)


@given(st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_awq_scales_are_normalised_powers_of_the_mean_magnitude(seed, ratio):
    g = torch.Generator().manual_seed(seed)
    meanabs = torch.rand(12, generator=g) * 10 + 0.01
    s = activation_scales(meanabs, ratio)
    assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-5)
    order = torch.argsort(meanabs)
    assert (s[order].diff() >= -1e-6).all()  # larger mean magnitude, larger scale
    torch.testing.assert_close(s / s[0], (meanabs / meanabs[0]).double().pow(ratio).float(), rtol=1e-5, atol=0)
    assert (activation_scales(meanabs, 0.0) == 1).all()


def test_awq_search_reports_its_grid_and_beats_no_scaling_on_salient_channels():
    x, weights = outlier_group(tokens=128, d_in=64)
    setting = parse_setting("W3A16ch")
    s, ratio, errors = search_activation_scales(weights, x, rtn_fn(setting), 16, grid=10)
    assert list(errors) == [k / 10 for k in range(10)]
    assert errors[ratio] == min(errors.values()) and ratio > 0
    assert errors[ratio] < 0.7 * errors[0.0]
    torch.testing.assert_close(s, activation_scales(x.abs().mean(0), ratio))


def test_mbq_token_weights_restrict_the_loss_to_the_weighted_tokens():
    x, weights = outlier_group(tokens=96, d_in=32)
    modality = torch.tensor([0, 1, 2], dtype=torch.int8).repeat(32)
    x[modality == 1] *= torch.linspace(0.1, 30, 32)  # vision tokens with their own outliers
    setting = parse_setting("W3A16ch")
    awq = AWQ(AWQConfig(grid=5, vision_weight=0.0))
    weights_by_token = awq.token_weights(modality, 96)
    assert weights_by_token.tolist() == [1.0, 0.0, 1.0] * 32
    s, ratio, errors = search_activation_scales(weights, x, rtn_fn(setting), 16, grid=5, token_weights=weights_by_token)
    keep = modality != 1
    for r, err in errors.items():
        s = activation_scales(x.abs().mean(0), r)
        deq = [rtn_fn(setting)(smooth_weight(w, s), None, None) for w in weights]
        assert err == pytest.approx(relative_group_error(x[keep], weights, deq, s, 16), rel=1e-6)
    out = awq.group_scales(group_context(x, weights, setting, modality=modality))
    assert out.figures["awq_ratio"] == ratio


def test_smoothing_a_hessian_allocates_one_matrix(matrices_held):
    """The smoothed Hessian is the one new d × d matrix (an outer product of the scales made it
    two: 0.5 GB more at an MLP width of 8,192, inside every α candidate's search)."""
    setup = ("import torch\nfrom qe.transforms.smoothing import smooth_hessian\n"
             "run = lambda W, H: smooth_hessian(H, torch.rand(H.shape[0]) + 0.5)")
    assert matrices_held(setup, 2000) < 1.5


@given(d=st.integers(1, 40), seed=st.integers(0, 10**6))
def test_smoothing_in_place_gives_the_same_matrix(d, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d + 3, d, generator=g, dtype=torch.float64)
    H = X.T @ X
    H = (H + H.T) / 2
    s = torch.rand(d, generator=g) * 4 + 0.05
    expected = smooth_hessian(H, s)
    own = H.clone()
    out = smooth_hessian(own, s, in_place=True)
    assert out.data_ptr() == own.data_ptr()
    assert torch.equal(out, expected)  # bit for bit: the pipeline smooths either way


def test_smoothing_in_place_allocates_no_matrix(matrices_held):
    """Only slices of rows (the mirroring's; a quarter of the matrix at d = 2,000, less wider)."""
    setup = ("import torch\nfrom qe.transforms.smoothing import smooth_hessian\n"
             "run = lambda W, H: smooth_hessian(H, torch.rand(H.shape[0]) + 0.5, in_place=True)")
    assert matrices_held(setup, 2000) < 0.4


def test_a_hessian_taken_from_its_statistics_cannot_be_read_again():
    from qe.analysis.statistics import InputStats

    stats = InputStats(6, where="blk.0.mlp.down_proj")
    stats.update(torch.randn(10, 6), torch.zeros(10, dtype=torch.int8), 0)
    expected = stats.xtx.clone()
    assert torch.equal(stats.take_xtx(), expected)
    with pytest.raises(RuntimeError, match="blk.0.mlp.down_proj.*take_xtx"):
        _ = stats.xtx
    with pytest.raises(RuntimeError, match="take_xtx"):  # nor grow without it
        stats.update(torch.randn(4, 6), torch.zeros(4, dtype=torch.int8), 10)


def test_a_pipeline_that_owns_its_statistics_quantizes_as_one_that_shares_them(monkeypatch):
    """``qe quantize`` smooths each group's Hessian where it lies; ``qe compare`` shares the
    statistics across cells and smooths a copy. Both must give the same model, bit for bit."""
    from qe.composition import resolve_composition
    from qe.data.calibration import calibration_set
    from qe.models.loading import load_model
    from qe.pipeline import PipelineOptions, QuantizationPipeline

    def quantized_state(owned):
        loaded = load_model("tiny:llava")
        _, encoded = calibration_set(loaded, None, 2)
        pipeline = QuantizationPipeline(loaded, resolve_composition("gptq", "qe[k=4;num_experts=2;shared_rank=4;expert_rank=2]", "W4A6"),
                                        PipelineOptions(progress=False))
        shared = pipeline.quantize_block_with_stats

        def with_ownership(block, stats, result, names=None, *, owned=True):
            shared(block, stats, result, names, owned=owned and owned_run)

        owned_run = owned
        monkeypatch.setattr(pipeline, "quantize_block_with_stats", with_ownership)
        result = pipeline.run(encoded)
        assert any(layer.alpha is not None for layer in result.layers)  # some group was smoothed
        return {k: v.clone() for k, v in loaded.model.state_dict().items()}

    owned, shared = quantized_state(True), quantized_state(False)
    assert owned.keys() == shared.keys()
    assert all(torch.equal(owned[k], shared[k]) for k in owned)


def test_a_search_spends_only_its_own_candidate_hessians():
    """The last linear's quantization may overwrite each candidate's smoothed Hessian; the
    group's Hessian (the statistics') stays as it was, and the choice and codes are those of
    the search without spending."""
    x, weights = outlier_group(tokens=96, d_in=16)
    H = (x.T @ x).double()
    before = H.clone()
    setting = parse_setting("W4A6")
    plain = lambda w, h, ex: GPTQ().quantize(w, setting, hessian=h, exempt=ex)  # noqa: E731
    spending = lambda w, h, ex: GPTQ().quantize_spending_hessian(w, setting, hessian=h, exempt=ex)  # noqa: E731
    amax = x.abs().amax(0)
    expected = choose_alpha((None, 0.5, 0.75), amax, weights, x, plain, 6, hessian=H)
    got = choose_alpha((None, 0.5, 0.75), amax, weights, x, plain, 6, hessian=H, last_spending=spending)
    assert torch.equal(H, before)
    assert got.alpha == expected.alpha and got.errors == expected.errors
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(got.quantized, expected.quantized))
