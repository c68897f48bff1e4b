"""Quantization grids: weights (per tensor / channel / group) and activations."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qe.errors import ConfigError, NumericalError
from qe.quantized import fake_quantize_activations, quantize_activations_per_token
from qe.quantizers.grid import (
    check_group_size,
    grid_params,
    group_params,
    mse_clip_ratio,
    num_groups,
    quantize_rtn,
    quantize_rtn_per_tensor,
    quantize_to_codes,
    static_activation_scale,
)
from qe.settings import QuantSetting

CLIP_GRID = (1.0, 0.9, 0.8, 0.7)


@st.composite
def weight_problems(draw, max_rows=6, max_cols=40):
    """A seeded weight with a random magnitude, optional outliers, and a group size that may not
    divide its width (0 = per channel)."""
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(1, max_cols))
    seed = draw(st.integers(0, 2**31 - 1))
    magnitude = draw(st.sampled_from([1e-3, 0.02, 1.0, 50.0]))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * magnitude
    if draw(st.booleans()):  # a few outliers
        mask = torch.rand(rows, cols, generator=g) < 0.05
        w = torch.where(mask, w * 20, w)
    if draw(st.booleans()):  # an all-positive or all-negative matrix (asymmetric range holds 0)
        w = w.abs() * draw(st.sampled_from([1.0, -1.0]))
    group_size = draw(st.sampled_from([0, 1, 2, 3, 5, 8, 16, 32]).filter(lambda gs: gs <= cols))
    bits = draw(st.integers(2, 8))
    symmetric = draw(st.booleans())
    return w, bits, group_size, symmetric


def per_column(t: torch.Tensor, d_in: int, group_size: int) -> torch.Tensor:
    g = d_in if group_size == 0 else group_size
    return t[:, torch.arange(d_in) // g]


def representable_range(scale, zero, bits):
    return (0 - zero) * scale, (2**bits - 1 - zero) * scale


# --------------------------------------------------------------------------- weights


@given(weight_problems(), st.booleans())
def test_dequantized_within_half_a_step_inside_the_clip_range(problem, clip):
    w, bits, group_size, symmetric = problem
    q = quantize_rtn(w, bits, group_size, symmetric, clip_grid=CLIP_GRID if clip else None)
    d_in = w.shape[1]
    assert q.scales.shape == (w.shape[0], num_groups(d_in, group_size))
    scale, zero = per_column(q.scales, d_in, group_size), per_column(q.zeros, d_in, group_size)
    lo, hi = representable_range(scale, zero, bits)
    slack = 1e-5 * scale  # float rounding of the range ends
    inside = (w >= lo - slack) & (w <= hi + slack)
    if not clip:
        # The whole range [min, max] is the clip range. (An asymmetric zero point is rounded, so
        # the grid may end up to half a step short of min or max; the error stays within half a step.)
        inside = torch.ones_like(w, dtype=torch.bool)
    err = (q.dequantize() - w).abs()
    # The symmetric grid's top weight sits exactly half a step above the top level; float32
    # rounding of w / scale (about 2^bits ulps of 1.0) can add a hair to that half step.
    bound = scale / 2 * (1 + 2**bits * 4e-7) + 1e-30
    assert (err[inside] <= bound[inside]).all()
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) < 2**bits


@given(weight_problems())
def test_quantizing_the_dequantized_weight_again_gives_the_same_codes(problem):
    w, bits, group_size, symmetric = problem
    q = quantize_rtn(w, bits, group_size, symmetric)
    again = quantize_rtn(q.dequantize(), bits, group_size, symmetric)
    assert torch.equal(again.codes, q.codes)
    torch.testing.assert_close(again.scales, q.scales, rtol=1e-5, atol=0)
    assert torch.equal(again.zeros, q.zeros)


@given(weight_problems(), st.booleans())
def test_group_parameters_equal_a_plain_loop_over_groups(problem, clip):
    w, bits, group_size, symmetric = problem
    grid = CLIP_GRID if clip else None
    scales, zeros = group_params(w, bits, symmetric, group_size, grid)
    d_in = w.shape[1]
    g = d_in if group_size == 0 else group_size
    for gi, start in enumerate(range(0, d_in, g)):
        part = w[:, start : start + g]
        ratio = mse_clip_ratio(part, bits, symmetric, grid) if clip else 1.0
        s, z = grid_params(part, bits, symmetric, ratio)
        torch.testing.assert_close(scales[:, gi], s, rtol=1e-6, atol=0)
        assert torch.equal(zeros[:, gi], z)


@given(weight_problems())
def test_clip_search_never_raises_the_rounding_error(problem):
    w, bits, group_size, symmetric = problem
    plain = quantize_rtn(w, bits, group_size, symmetric)
    clipped = quantize_rtn(w, bits, group_size, symmetric, clip_grid=CLIP_GRID)
    err = lambda q: float((q.dequantize() - w).pow(2).sum())  # noqa: E731
    assert err(clipped) <= err(plain) * (1 + 1e-5) + 1e-30


def test_a_shorter_last_group_gets_its_own_parameters():
    w = torch.cat([torch.full((2, 4 * 128), 0.01), torch.full((2, 576 - 4 * 128), 5.0)], 1)
    w[:, ::7] *= -1
    q = quantize_rtn(w, 4, 128, True)
    assert q.scales.shape == (2, 5)  # ceil(576 / 128): 4 full groups and one of 64 columns
    torch.testing.assert_close(q.scales[:, 4], torch.full((2,), 5.0 / 7))
    torch.testing.assert_close(q.scales[:, 0], torch.full((2,), 0.01 / 7))
    torch.testing.assert_close(q.dequantize(), w)


def test_symmetric_grid_conventions():
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.25, 1.0]])
    q = quantize_rtn(w, 3, 0, True)
    assert q.zeros.item() == 4  # 2^(b-1)
    torch.testing.assert_close(q.scales, torch.tensor([[1.0 / 3]]))  # max|w| / (2^(b-1) - 1)
    assert q.codes.tolist() == [[1, 2, 4, 5, 7]]  # q + 4 with q = round(w / scale)


def test_asymmetric_grid_conventions():
    w = torch.tensor([[-1.0, 0.0, 2.0]])
    q = quantize_rtn(w, 2, 0, False)
    torch.testing.assert_close(q.scales, torch.tensor([[1.0]]))  # (max - min) / (2^b - 1)
    assert q.zeros.item() == 1 and q.codes.tolist() == [[0, 1, 3]]


@given(weight_problems())
def test_per_tensor_helper_uses_one_scale(problem):
    w, bits, _, symmetric = problem
    q = quantize_rtn_per_tensor(w, bits, symmetric)
    assert q.group_size == 0 and q.scales.shape == (w.shape[0], 1)
    assert (q.scales == q.scales[0, 0]).all() and (q.zeros == q.zeros[0, 0]).all()
    assert ((q.dequantize() - w).abs() <= q.scales[0, 0] / 2 * (1 + 1e-5)).all()
    # the same as per channel on the matrix seen as one long row
    flat = quantize_rtn(w.reshape(1, -1), bits, 0, symmetric)
    assert torch.equal(flat.codes.reshape(w.shape), q.codes)


@given(weight_problems(), st.data())
def test_exempt_columns_come_out_zero_and_set_no_range(problem, data):
    w, bits, group_size, symmetric = problem
    exempt = torch.tensor(data.draw(st.lists(st.booleans(), min_size=w.shape[1], max_size=w.shape[1])))
    q = quantize_rtn(w, bits, group_size, symmetric, exempt)
    assert (q.dequantize()[:, exempt] == 0).all()
    g = per_column(q.zeros, w.shape[1], group_size)
    assert torch.equal(q.codes[:, exempt].float(), g[:, exempt])  # codes are the zero point
    w0 = w.clone()
    w0[:, exempt] = 0
    assert torch.equal(quantize_rtn(w0, bits, group_size, symmetric).codes[:, ~exempt], q.codes[:, ~exempt])
    if group_size == 0 and symmetric and (~exempt).any():
        live, half = w[:, ~exempt], 2 ** (bits - 1)
        lo, hi = live.amin(1).clamp(max=0), live.amax(1).clamp(min=0)  # exempt zeros are in the row
        torch.testing.assert_close(q.scales[:, 0], torch.maximum(-lo / half, hi / (half - 1)).clamp_min(1e-12))


@pytest.mark.parametrize("group_size", [-1, 17])
def test_group_size_outside_the_input_width_is_refused(group_size):
    with pytest.raises(ConfigError, match="group size"):
        quantize_rtn(torch.randn(3, 16), 4, group_size, True)
    with pytest.raises(ConfigError, match="down_proj"):
        check_group_size(16, group_size, "layers.0.mlp.down_proj")


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_weight_bits_outside_2_to_8_are_refused(bits):
    with pytest.raises(ConfigError, match="2 to 8"):
        quantize_rtn(torch.randn(3, 16), bits, 0, True)


@pytest.mark.parametrize("w_bits,a_bits", [(1, 8), (9, 8), (4, 3), (4, 9), (4, 12), (4, 32)])
def test_settings_outside_the_supported_bits_are_refused(w_bits, a_bits):
    with pytest.raises(ConfigError):
        QuantSetting(w_bits=w_bits, a_bits=a_bits)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_name_the_layer(bad):
    w = torch.randn(4, 8)
    w[1, 2] = bad
    with pytest.raises(NumericalError, match="layers.3.self_attn.q_proj"):
        quantize_rtn(w, 4, 0, True, layer_name="layers.3.self_attn.q_proj")
    with pytest.raises(NumericalError):
        quantize_rtn_per_tensor(w, 4, True)


# --------------------------------------------------------------------------- activations


@st.composite
def token_batches(draw):
    tokens, width = draw(st.integers(1, 6)), draw(st.integers(1, 48))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(tokens, width, generator=g) * draw(st.sampled_from([1e-2, 1.0, 30.0]))
    if draw(st.booleans()):
        x[:, 0] *= 100  # an outlier channel
    return x


@given(token_batches(), st.sampled_from([4, 5, 6, 7, 8]))
def test_per_token_activations_within_half_a_step(x, bits):
    q, scale = quantize_activations_per_token(x, bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.abs().max() <= qmax and torch.equal(q, q.round())
    torch.testing.assert_close(scale[:, 0], (x.abs().amax(1) / qmax).clamp_min(1e-12))
    xq = fake_quantize_activations(x, bits)
    assert ((xq - x).abs() <= scale / 2 * (1 + 1e-5)).all()
    torch.testing.assert_close(fake_quantize_activations(xq, bits), xq)  # already on the grid


def test_a16_is_the_identity_and_zero_tokens_stay_zero():
    x = torch.randn(3, 8)
    assert fake_quantize_activations(x, 16) is x
    z = torch.zeros(2, 8)
    assert torch.equal(fake_quantize_activations(z, 4), z)


def test_fake_quantized_activations_keep_the_input_dtype():
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    assert fake_quantize_activations(x, 8).dtype == torch.bfloat16


@given(token_batches(), st.sampled_from([4, 6, 8]))
def test_static_per_tensor_scale_from_streamed_absmax(x, bits):
    absmax = x.abs().amax(0)
    scale = static_activation_scale(absmax, bits)
    qmax = 2 ** (bits - 1) - 1
    torch.testing.assert_close(scale, (x.abs().max() / qmax).clamp_min(1e-12))
    xq = fake_quantize_activations(x, bits, scale)
    assert ((xq - x).abs() <= scale / 2 * (1 + 1e-5)).all()  # calibrated on these tokens: nothing clips
    assert len(torch.unique(torch.round(xq / scale))) <= 2 * qmax + 1


def test_static_scale_ignores_exempt_channels_and_refuses_a16():
    absmax = torch.tensor([1.0, 100.0, 2.0])
    exempt = torch.tensor([False, True, False])
    torch.testing.assert_close(static_activation_scale(absmax, 8, exempt), torch.tensor(2.0 / 127))
    with pytest.raises(ConfigError):
        static_activation_scale(absmax, 16)


def test_codes_round_to_nearest_and_clamp():
    scale, zero = torch.tensor([1.0]), torch.tensor([8.0])
    codes = quantize_to_codes(torch.tensor([-100.0, -0.4, 0.6, 100.0]), scale, zero, 4)
    assert codes.tolist() == [0.0, 8.0, 9.0, 15.0]
