"""The quantized linear module: forward semantics, exempt columns, save/load, storage."""

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from qe.quantized import fake_quantize_activations
from qe.quantizers.grid import quantize_rtn, static_activation_scale
from qe.quantizers.qlinear import QuantLinear


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    monkeypatch.setenv("QE_KERNELS", "torch")  # these tests check the semantics, on the torch path
    yield


@st.composite
def layers(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    d_in, d_out = draw(st.integers(1, 40)), draw(st.integers(1, 12))
    bits = draw(st.integers(2, 8))
    group_size = draw(st.sampled_from([0, 1, 3, 8, 16, 32]).filter(lambda gs: gs <= d_in))
    symmetric = draw(st.booleans())
    a_bits = draw(st.sampled_from([4, 6, 8, 16]))
    w = torch.randn(d_out, d_in, generator=g)
    exempt = (torch.rand(d_in, generator=g) < 0.2) if draw(st.booleans()) else None
    q = quantize_rtn(w, bits, group_size, symmetric, exempt)
    parts = dict(
        bias=torch.randn(d_out, generator=g) if draw(st.booleans()) else None,
        input_scale=torch.rand(d_in, generator=g) + 0.5 if draw(st.booleans()) else None,
        act_exempt=exempt if draw(st.booleans()) else None,
    )
    x = torch.randn(3, 5, d_in, generator=g) * 4
    return q, a_bits, parts, x


def reference_forward(q, a_bits, parts, x, static_scale=None):
    """F.linear(Q_a(x / s ⊙ keep), dequantized W) + bias, written from the documented semantics."""
    xs = x / parts["input_scale"] if parts["input_scale"] is not None else x
    if parts["act_exempt"] is not None:
        xs = xs * (~parts["act_exempt"]).float()
    return F.linear(fake_quantize_activations(xs, a_bits, static_scale), q.dequantize(), parts["bias"])


@given(layers())
def test_forward_is_fake_quantized_activations_times_the_dequantized_weight(layer):
    q, a_bits, parts, x = layer
    m = QuantLinear.from_quantized(q, a_bits=a_bits, **parts)
    torch.testing.assert_close(m(x), reference_forward(q, a_bits, parts, x), rtol=1e-5, atol=1e-5)
    assert torch.equal(m.codes(), q.codes)
    torch.testing.assert_close(m.dequantized_weight(), q.dequantize(), rtol=0, atol=0)


@given(layers())
def test_exempt_columns_are_exactly_zero_whatever_their_codes(layer):
    q, a_bits, parts, x = layer
    d_in = q.shape[1]
    exempt = torch.arange(d_in) % 3 == 0
    q.codes[:, exempt] = 2**q.bits - 1  # codes that would not dequantize to zero
    q.exempt = exempt
    m = QuantLinear.from_quantized(q, a_bits=a_bits, **parts)
    assert (m.dequantized_weight()[:, exempt] == 0).all()
    assert torch.equal(m.dequantized_weight(), q.dequantize())


@given(layers())
def test_layout_and_state_dict_rebuild_an_identical_module(layer):
    q, a_bits, parts, x = layer
    m = QuantLinear.from_quantized(q, a_bits=a_bits, **parts)
    m(x)  # fill the dequantization cache, which the load must not keep
    rebuilt = QuantLinear.from_layout(m.layout())
    rebuilt.load_state_dict(m.state_dict())
    assert torch.equal(rebuilt(x), m(x))
    assert rebuilt.layout() == m.layout()


def test_loading_new_weights_drops_the_cached_dequantized_weight():
    a = QuantLinear.from_quantized(quantize_rtn(torch.randn(4, 16), 4, 0, True), a_bits=16)
    b = QuantLinear.from_quantized(quantize_rtn(torch.randn(4, 16), 4, 0, True), a_bits=16)
    x = torch.randn(2, 16)
    a(x)
    a.load_state_dict(b.state_dict())
    assert torch.equal(a(x), b(x))


def test_static_activation_scale_and_compensator():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(6, 16, generator=g), torch.randn(20, 16, generator=g)
    q = quantize_rtn(w, 4, 8, False)
    scale = static_activation_scale(x.abs().amax(0), 8)
    comp = nn.Linear(16, 6, bias=False)
    m = QuantLinear.from_quantized(q, a_bits=8, static_act_scale=scale.reshape(1), compensator=comp)
    parts = dict(bias=None, input_scale=None, act_exempt=None)
    with torch.no_grad():
        expected = reference_forward(q, 8, parts, x, scale) + comp(x)
        torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)


def test_half_precision_input_keeps_its_dtype():
    q = quantize_rtn(torch.randn(6, 16), 4, 0, True)
    m = QuantLinear.from_quantized(q, a_bits=8, bias=torch.zeros(6))
    x = torch.randn(3, 16)
    y = m(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), m(x), rtol=5e-2, atol=5e-2)


def _fp16_bytes(d_out, d_in):
    return d_out * d_in * 2


@pytest.mark.parametrize("d_out,d_in", [(1536, 576), (576, 1536)])
@pytest.mark.parametrize("setting", ["ch", "g128"])
def test_w4_storage_is_at_most_0_3_of_fp16(d_out, d_in, setting):
    group_size = 0 if setting == "ch" else 128
    q = quantize_rtn(torch.randn(d_out, d_in), 4, group_size, group_size == 0)
    m = QuantLinear.from_quantized(q, a_bits=8)
    ratio = m.storage_bytes(False) / _fp16_bytes(d_out, d_in)
    assert ratio <= 0.3, f"W4 {setting} {d_out}x{d_in}: {ratio:.3f} of fp16"
    if os.environ.get("QE_PRINT_STORAGE"):
        print(f"W4 {setting} {d_out}x{d_in}: {m.storage_bytes(False)} bytes = {ratio:.4f} x fp16")
