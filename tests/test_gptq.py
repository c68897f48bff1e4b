"""GPTQ: reference equations, relation to RTN, exempt and dead columns, bad input."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qe.errors import ConfigError, DataError, NumericalError
from qe.plugins import default_manager
from qe.quantizers.gptq import GPTQ, GPTQConfig, gptq_quantize
from qe.quantizers.grid import dequantize_codes, grid_params, group_params, quantize_rtn, quantize_to_codes
from qe.settings import parse_setting


def reference_gptq(W, H, bits, group_size, symmetric, *, damp=0.01, act_order=False, static_groups=True):
    """GPTQ written plainly in float64, column by column with eager updates:
    q = quant(w_c); err = (w_c − q) / U_cc; W[:, c+1:] −= err ⊗ U[c, c+1:], U = chol_upper(H⁻¹)."""
    W, H = W.double().clone(), H.double().clone()
    d_out, d_in = W.shape
    dead = torch.diag(H) == 0
    mean_diag = torch.diag(H)[~dead].mean()
    H[dead, :], H[:, dead] = 0, 0
    H[dead, dead] = 1
    W[:, dead] = 0
    gs = d_in if group_size == 0 else group_size
    scales, zeros = group_params(W.float(), bits, symmetric, group_size)
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(d_in)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * mean_diag * torch.eye(d_in, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    Q = torch.zeros_like(W)
    for c in range(d_in):
        g = int(perm[c]) // gs
        if not static_groups and c % gs == 0:  # dynamic groups: parameters from the updated columns
            scales[:, g], zeros[:, g] = grid_params(W[:, c : c + gs].float(), bits, symmetric)
        s, z = scales[:, g], zeros[:, g]
        q = dequantize_codes(quantize_to_codes(W[:, c].float(), s, z, bits), s, z).double()
        Q[:, c] = q
        err = (W[:, c] - q) / U[c, c]
        W[:, c + 1 :] -= err[:, None] * U[c, c + 1 :][None, :]
    return Q[:, torch.argsort(perm)]


def correlated_problem(seed, d_out, d_in, tokens=None, spread=1.0):
    """A weight and a non-diagonal Hessian XᵀX of correlated tokens with uneven channel scales."""
    g = torch.Generator().manual_seed(seed)
    tokens = tokens or 4 * d_in
    mix = torch.eye(d_in) + 0.5 * torch.randn(d_in, d_in, generator=g)
    X = torch.randn(tokens, d_in, generator=g) @ mix * torch.exp(spread * torch.randn(d_in, generator=g))
    return torch.randn(d_out, d_in, generator=g), (X.T @ X).double()


def objective(W, W_hat, H):
    E = (W - W_hat).double()
    return float(torch.einsum("oi,ij,oj->", E, H, E))


# --------------------------------------------------------------------------- reference equations


@pytest.mark.parametrize("bits,group_size,symmetric,act_order,static_groups", [
    (4, 0, True, False, True), (4, 0, True, True, True), (3, 0, False, True, True), (3, 5, False, False, True),
    (3, 5, False, True, True), (2, 4, True, True, True), (4, 6, True, False, False),
])
def test_gptq_equals_the_plain_float64_equations(bits, group_size, symmetric, act_order, static_groups):
    for seed in range(4):
        W, H = correlated_problem(seed, 8, 16)
        if seed == 3:
            H[5, :], H[:, 5] = 0, 0  # a dead input channel
        ref = reference_gptq(W, H, bits, group_size, symmetric, act_order=act_order, static_groups=static_groups)
        for block_size in (128, 3):  # one block, and lazy batch updates across blocks
            q = gptq_quantize(W, H, bits, group_size, symmetric, act_order=act_order,
                              static_groups=static_groups, block_size=block_size)
            torch.testing.assert_close(q.dequantize().double(), ref, rtol=0, atol=1e-6)


@settings(max_examples=15)
@given(st.integers(0, 2**31 - 1), st.integers(2, 8), st.sampled_from([0, 3, 7, 16]), st.booleans(), st.booleans(),
       st.sampled_from([1, 5, 128]))
def test_block_size_does_not_change_the_result(seed, bits, group_size, symmetric, act_order, block_size):
    W, H = correlated_problem(seed, 6, 20)
    a = gptq_quantize(W, H, bits, group_size, symmetric, act_order=act_order, block_size=block_size)
    b = gptq_quantize(W, H, bits, group_size, symmetric, act_order=act_order, block_size=20)
    torch.testing.assert_close(a.dequantize(), b.dequantize(), rtol=0, atol=1e-5)
    assert torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)


# --------------------------------------------------------------------------- against RTN


@given(st.integers(0, 2**31 - 1), st.integers(2, 8), st.sampled_from([0, 1, 3, 7, 16]), st.booleans(),
       st.booleans(), st.booleans(), st.integers(1, 6), st.integers(1, 20))
def test_on_a_diagonal_hessian_gptq_is_rtn_exactly(seed, bits, group_size, symmetric, act_order, static, d_out, d_in):
    if act_order and not static:
        static = True
    group_size = min(group_size, d_in)
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g) * 3
    H = torch.diag(torch.rand(d_in, generator=g) * 10).double()  # no updates can flow between columns
    q = gptq_quantize(W, H, bits, group_size, symmetric, act_order=act_order, static_groups=static)
    r = quantize_rtn(W, bits, group_size, symmetric)
    assert torch.equal(q.codes, r.codes) and torch.equal(q.scales, r.scales) and torch.equal(q.zeros, r.zeros)


@pytest.mark.parametrize("setting", ["W4A8", "W3A16g32", "W4A16g16sym", "W2A16g48", "W8A8"])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn_on_correlated_inputs(setting, act_order):
    """Strictly below RTN's Hessian-weighted error on seeded layers with a non-diagonal Hessian.

    (GPTQ is greedy: on tiny problems, e.g. a single 33-wide row at 2 bits, it can land above
    RTN; these are layers of realistic shape, 40×80 with 4× as many tokens as inputs.)
    """
    s = parse_setting(setting)
    gptq = GPTQ(GPTQConfig(act_order=act_order))
    for seed in range(4):
        W, H = correlated_problem(seed, 40, 80)
        ours = objective(W, gptq.quantize(W, s, hessian=H).dequantize(), H)
        rtn = objective(W, quantize_rtn(W, s.w_bits, s.group_size, s.symmetric).dequantize(), H)
        assert ours < 0.98 * rtn, (seed, ours / rtn)


# --------------------------------------------------------------------------- exempt and dead columns


@settings(max_examples=15)
@given(st.integers(0, 2**31 - 1), st.integers(2, 8), st.booleans(), st.booleans(), st.sampled_from([4, 128]))
def test_exempt_columns_are_zero_and_the_rest_is_gptq_without_them(seed, bits, symmetric, act_order, block_size):
    W, H = correlated_problem(seed, 6, 24)
    exempt = torch.rand(24, generator=torch.Generator().manual_seed(seed + 1)) < 0.3
    exempt[3] = True
    exempt[4] = False
    W[:, exempt] *= 50  # outliers in exempt columns must neither set a scale nor leak into updates
    q = gptq_quantize(W, H, bits, 0, symmetric, exempt=exempt, act_order=act_order, block_size=block_size)
    deq = q.dequantize()
    assert (deq[:, exempt] == 0).all()
    assert torch.equal(q.codes[:, exempt].float(), q.zeros[:, :1].expand(-1, int(exempt.sum())))
    keep = ~exempt
    removed = gptq_quantize(W[:, keep], H[keep][:, keep], bits, 0, symmetric, act_order=act_order, block_size=block_size)
    torch.testing.assert_close(deq[:, keep], removed.dequantize(), rtol=0, atol=1e-5)
    assert torch.equal(q.scales, removed.scales)


def test_exempt_columns_in_groups_take_no_part_in_the_grid():
    W, H = correlated_problem(7, 4, 32)
    exempt = torch.zeros(32, dtype=torch.bool)
    exempt[[0, 9, 31]] = True
    W[:, exempt] = 1e3
    q = gptq_quantize(W, H, 4, 8, False, exempt=exempt)
    W0 = W.clone()
    W0[:, exempt] = 0
    ref_scales, _ = group_params(W0, 4, False, 8)
    assert torch.equal(q.scales, ref_scales)
    assert (q.dequantize()[:, exempt] == 0).all()


def test_dead_channels_come_out_zero():
    W, H = correlated_problem(2, 5, 12)
    H[[2, 7], :] = 0
    H[:, [2, 7]] = 0
    q = gptq_quantize(W, H, 4, 0, True)
    assert (q.dequantize()[:, [2, 7]] == 0).all() and q.exempt is None
    with pytest.warns(RuntimeWarning, match="o_proj: no input channel is live"):
        q = gptq_quantize(W, torch.zeros_like(H), 4, 0, True, layer_name="o_proj")
    assert (q.dequantize() == 0).all()


# --------------------------------------------------------------------------- plugin and bad input


def test_gptq_plugin_and_config():
    resolved = default_manager().resolve("quantizer", "gptq[damp=0.05;act_order=false;block_size=64;clip=true]")
    assert resolved.entry.cls is GPTQ and GPTQ.needs_hessian
    assert resolved.config == GPTQConfig(damp=0.05, block_size=64, act_order=False, clip=True)
    assert GPTQConfig() == GPTQConfig(damp=0.01, block_size=128, act_order=True, clip=True, static_groups=True)
    for bad in ("gptq[damp=0]", "gptq[block_size=0]", "gptq[static_groups=false]"):
        with pytest.raises(ConfigError):
            default_manager().resolve("quantizer", bad)
    default_manager().resolve("quantizer", "gptq[static_groups=false;act_order=false]")


def test_clip_search_in_gptq_keeps_the_hessian_error_down():
    torch.manual_seed(0)
    W = torch.distributions.StudentT(2.0).sample((32, 64))
    _, H = correlated_problem(0, 1, 64)
    s = parse_setting("W3A16ch")
    plain = objective(W, GPTQ(GPTQConfig(clip=False)).quantize(W, s, hessian=H).dequantize(), H)
    clipped = objective(W, GPTQ(GPTQConfig(clip=True)).quantize(W, s, hessian=H).dequantize(), H)
    assert clipped < plain


def test_gptq_without_a_hessian_asks_for_calibration_data():
    with pytest.raises(ConfigError, match="calibration data.*q_proj"):
        GPTQ().quantize(torch.randn(4, 8), parse_setting("W4A8"), layer_name="layers.0.self_attn.q_proj")


@pytest.mark.parametrize("where", ["weight", "Hessian"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_names_the_layer(where, bad):
    W, H = correlated_problem(0, 4, 8)
    (W if where == "weight" else H)[1, 2] = bad
    with pytest.raises(NumericalError, match=f"{where}.*mlp.gate_proj"):
        GPTQ().quantize(W, parse_setting("W4A8"), hessian=H, layer_name="mlp.gate_proj")


def test_bad_shapes_and_group_sizes_are_refused():
    W, H = correlated_problem(0, 4, 8)
    with pytest.raises(DataError, match="Hessian"):
        gptq_quantize(W, H[:4, :4], 4, 0, True)
    with pytest.raises(ConfigError, match="group size"):
        gptq_quantize(W, H, 4, 9, True)
    with pytest.raises(ConfigError, match="2 to 8"):
        gptq_quantize(W, H, 1, 0, True)
    with pytest.raises(ConfigError, match="16-bit"):
        GPTQ().quantize(W, parse_setting("W16A8"), hessian=H)


def test_an_indefinite_hessian_raises_the_damping_and_warns_with_the_layer_name():
    W = torch.randn(3, 2)
    H = torch.tensor([[1.0, 3.0], [3.0, 1.0]], dtype=torch.float64)  # eigenvalues 4 and −2
    with pytest.warns(RuntimeWarning, match="layers.5.mlp.up_proj") as record:
        q = gptq_quantize(W, H, 4, 0, True, layer_name="layers.5.mlp.up_proj")
    assert len(record) == 3  # damping 0.01, 0.1 and 1 fail; 10 works
    assert torch.isfinite(q.dequantize()).all()
    hopeless = torch.tensor([[1.0, 1e4], [1e4, 1.0]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NumericalError, match="up_proj"):
            gptq_quantize(W, hopeless, 4, 0, True, layer_name="layers.5.mlp.up_proj")


def test_gptq_working_set_is_a_few_hessians_at_most(matrices_held):
    """GPTQ's working set on a wide layer is dominated by the factor of the damped Hessian,
    inverted in place (0.5 GB in float64 at an MLP width of 8,192). Measured at d = 2,000 by
    the process's high-water mark: 1.5 d × d float64 matrices beyond the Hessian it is given
    (the factor, and the reordering's index), where it was 8.0 when the factorization, the
    permutation and the finiteness checks made whole-matrix copies."""
    setup = "from qe.quantizers.gptq import gptq_quantize\nrun = lambda W, H: gptq_quantize(W, H, 4, 0, True)"
    assert matrices_held(setup, 2000) < 2.0


def _same_quantization(a, b):
    return (torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), d_in=st.sampled_from([8, 16, 48]), group=st.sampled_from([0, 8]),
       act_order=st.booleans(), dead=st.integers(0, 3), exempt=st.integers(0, 3))
def test_gptq_in_the_hessians_own_memory_gives_the_same_codes(seed, d_in, group, act_order, dead, exempt):
    """Overwriting the Hessian it is given (reordered, factored and inverted where it lies) must
    not change a code: dead and exempt channels, act order or not, groups or not."""
    W, H = correlated_problem(seed, 6, d_in)
    H[:dead, :] = 0
    H[:, :dead] = 0
    mask = torch.zeros(d_in, dtype=torch.bool)
    mask[d_in - exempt :] = True
    kwargs = dict(exempt=mask if exempt else None, act_order=act_order)
    copied = gptq_quantize(W, H, 4, group, True, **kwargs)
    spent = H.clone()
    in_place = gptq_quantize(W, spent, 4, group, True, overwrite_hessian=True, **kwargs)
    assert _same_quantization(copied, in_place)
    assert not torch.equal(spent, H)  # it did work in that memory


def test_gptq_in_the_hessians_own_memory_retries_as_the_copy_does():
    """A failed factorization of the caller's own matrix is undone from its untouched triangle:
    the same warnings and the same codes as GPTQ working on a copy."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(5, 12, generator=g)
    X = torch.randn(4, 12, generator=g, dtype=torch.float64)
    H = X.T @ X
    H = (H + H.T) / 2  # exactly symmetric, as GPTQ's Hessians are
    H.diagonal().sub_(0.05 * float(H.diagonal().mean()))  # indefinite: the first dampings fail
    with pytest.warns(RuntimeWarning) as copied_warnings:
        copied = gptq_quantize(W, H, 4, 0, True)
    with pytest.warns(RuntimeWarning) as own_warnings:
        own = gptq_quantize(W, H.clone(), 4, 0, True, overwrite_hessian=True)
    assert len(copied_warnings) == len(own_warnings) >= 1
    assert _same_quantization(copied, own)


def test_a_wide_hessian_factored_where_it_lies_retries_on_several_threads():
    """LAPACK's factorization must leave the untouched triangle alone on its multi-threaded
    path too, or a retry would start from garbage: d = 700 on two threads, two failures."""
    from qe.gram import factor_damped, factor_damped_over

    g = torch.Generator().manual_seed(5)
    X = torch.randn(300, 700, generator=g, dtype=torch.float64)
    H = X.T @ X
    H = (H + H.T) / 2  # exactly symmetric, as GPTQ's Hessians are
    H.diagonal().sub_(0.05 * float(H.diagonal().mean()))  # indefinite until damped enough
    scale = float(H.diagonal().mean())
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        copied, lam = factor_damped(lambda: H.clone(), 1e-3, scale)
        own, own_lam = factor_damped_over(H.clone(), 1e-3, scale)
    finally:
        torch.set_num_threads(threads)
    assert lam == own_lam > 1e-3  # it did retry
    assert torch.equal(copied, own)


def test_gptq_spending_its_hessian_adds_no_matrix(matrices_held):
    """Told the Hessian is spent (the last use of a smoothing search's candidate), GPTQ works
    in its memory: 0.5 d × d matrices of slices at d = 2,000 where the copying GPTQ takes 1.5."""
    setup = ("from qe.quantizers.gptq import GPTQ\nfrom qe.settings import parse_setting\n"
             "run = lambda W, H: GPTQ().quantize_spending_hessian(W, parse_setting('W4A8'), hessian=H)")
    assert matrices_held(setup, 2000) < 0.8


def test_a_quantizer_that_cannot_spend_its_hessian_quantizes_as_usual():
    """The contract's default: ``quantize_spending_hessian`` is ``quantize`` (a third-party
    quantizer need not know about it)."""
    from qe.quantizers.rtn import RTN

    W, H = correlated_problem(1, 4, 16)
    setting = parse_setting("W4A8")
    assert _same_quantization(RTN().quantize_spending_hessian(W, setting, hessian=H), RTN().quantize(W, setting))
