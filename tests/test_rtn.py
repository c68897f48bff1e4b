"""The RTN quantizer plugin."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qe.errors import ConfigError
from qe.plugins import default_manager
from qe.quantizers.grid import quantize_rtn
from qe.quantizers.rtn import RTN, RTNConfig
from qe.settings import parse_setting


def test_rtn_is_registered_with_its_clip_parameter():
    resolved = default_manager().resolve("quantizer", "rtn[clip=true]")
    assert resolved.entry.cls is RTN and resolved.config == RTNConfig(clip=True)
    assert not RTN.needs_hessian
    with pytest.raises(ConfigError, match="clip"):
        default_manager().resolve("quantizer", "rtn[clips=true]")


@pytest.mark.parametrize("setting", ["W4A8", "W3A16", "W4A16g32sym", "W8A8", "W2A16g7asym"])
def test_rtn_follows_the_setting(setting):
    s = parse_setting(setting)
    w = torch.randn(12, 160, generator=torch.Generator().manual_seed(0))
    q = RTN().quantize(w, s)
    assert (q.bits, q.group_size, q.symmetric) == (s.w_bits, s.group_size, s.symmetric)
    ref = quantize_rtn(w, s.w_bits, s.group_size, s.symmetric)
    assert torch.equal(q.codes, ref.codes) and torch.equal(q.scales, ref.scales)


@given(st.integers(0, 2**31 - 1), st.integers(2, 8), st.booleans())
def test_exempt_columns_are_as_if_removed_per_channel(seed, bits, symmetric):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 24, generator=g)
    exempt = torch.rand(24, generator=g) < 0.3
    exempt[0] = False
    w[:, exempt] *= 100  # outliers in exempt columns must not set the scale
    s = parse_setting(f"W{bits}A16ch{'sym' if symmetric else 'asym'}")
    q = RTN().quantize(w, s, exempt=exempt)
    removed = RTN().quantize(w[:, ~exempt], s)
    assert torch.equal(q.codes[:, ~exempt], removed.codes)
    assert torch.equal(q.scales, removed.scales)
    assert (q.dequantize()[:, exempt] == 0).all()


def test_clip_search_lowers_the_error_on_heavy_tails():
    torch.manual_seed(1)
    w = torch.distributions.StudentT(2.0).sample((64, 256))
    s = parse_setting("W3A16ch")
    err = lambda q: float((q.dequantize() - w).pow(2).sum())  # noqa: E731
    assert err(RTN(RTNConfig(clip=True)).quantize(w, s)) < err(RTN().quantize(w, s))


def test_sixteen_bit_weights_are_refused_with_the_layer_name():
    with pytest.raises(ConfigError, match="mlp.up_proj"):
        RTN().quantize(torch.randn(4, 8), parse_setting("W16A8"), layer_name="mlp.up_proj")
