"""Low-rank numerics (qe.compensators.linalg), the adapter module and the ``lowrank`` plugin."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from qe.checkpoint import compensator_module
from qe.compensators.base import LayerContext, LayerPlan
from qe.compensators.linalg import (
    damped_objective,
    lqer_lowrank,
    svd_lowrank_plain,
    top_eigenpairs,
    whitened_lowrank,
)
from qe.compensators.lowrank import (
    LowRankCompensator,
    LowRankConfig,
    check_rank_override,
)
from qe.compensators.modules import LowRankAdapter
from qe.errors import ConfigError, NumericalError
from qe.gram import damped, damped_cholesky
from qe.plugins import QEPluginManager, default_manager
from qe.quantizers.grid import quantize_rtn
from qe.settings import parse_setting

DAMP = 0.01


def problem(d_out, d_in, seed, T=None, outliers=True):
    """A weight error and a Hessian of correlated inputs with a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    T = T or 3 * d_in
    scale = torch.ones(d_in)
    if outliers:
        scale[torch.randperm(d_in, generator=g)[: max(1, d_in // 10)]] = 10
    mix = torch.eye(d_in) + 0.3 * torch.randn(d_in, d_in, generator=g) / d_in**0.5
    X = (torch.randn(T, d_in, generator=g) @ mix) * scale
    W = torch.randn(d_out, d_in, generator=g) * 0.05
    E = W - quantize_rtn(W, 3, 0, True).dequantize()
    return E.double(), (X.double().T @ X.double()), X


def reference_whitened(E, H, rank, damp=DAMP):
    """docs/method.md, shared expert, verbatim: Cholesky, full SVD of E S, A = U Σ, B = Vᵀ S⁻¹."""
    S = torch.linalg.cholesky(damped(H, damp))
    U, sig, Vh = torch.linalg.svd(E @ S, full_matrices=False)
    A = U[:, :rank] * sig[:rank]
    B = torch.linalg.solve_triangular(S, Vh[:rank], upper=False, left=False)
    return A, B


shapes = st.tuples(st.integers(2, 24), st.integers(2, 24))


# --------------------------------------------------------------------------- optimality


@given(shape=shapes, rank=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_whitened_is_no_worse_than_any_other_pair(shape, rank, seed):
    d_out, d_in = shape
    E, H, X = problem(d_out, d_in, seed)
    rank = min(rank, d_out, d_in)
    A, B = whitened_lowrank(E, H, rank, DAMP)
    best = damped_objective(E, A, B, H, DAMP)
    tol = 1e-9 * damped_objective(E, E[:, :0], E[:0], H, DAMP) + 1e-12
    g = torch.Generator().manual_seed(seed + 1)
    others = [svd_lowrank_plain(E, rank), lqer_lowrank(E, X.abs().mean(0), rank), reference_whitened(E, H, rank)]
    others += [(torch.randn(d_out, rank, generator=g, dtype=torch.float64), torch.randn(rank, d_in, generator=g, dtype=torch.float64)) for _ in range(3)]
    # a random pair refined by least squares for B: a strong competitor
    A_r = torch.randn(d_out, rank, generator=g, dtype=torch.float64)
    others.append((A_r, torch.linalg.lstsq(A_r, E).solution))
    for A_o, B_o in others:
        assert best <= damped_objective(E, A_o, B_o, H, DAMP) + tol
    # and it reaches the reference optimum
    assert best == pytest.approx(damped_objective(E, *reference_whitened(E, H, rank), H, DAMP), rel=1e-9, abs=tol)


@given(shape=shapes, seed=st.integers(0, 10_000))
def test_objective_never_rises_with_rank(shape, seed):
    d_out, d_in = shape
    E, H, _ = problem(d_out, d_in, seed)
    values = [damped_objective(E, *whitened_lowrank(E, H, r, DAMP), H, DAMP) for r in range(min(shape) + 1)]
    scale = values[0] + 1e-30
    assert all(b <= a + 1e-10 * scale for a, b in itertools.pairwise(values))
    assert values[-1] <= 1e-9 * scale  # full rank leaves nothing


@pytest.mark.parametrize("shape", [(260, 700), (700, 260)])
def test_subspace_iteration_reaches_the_exact_optimum(shape):
    d_out, d_in = shape
    E, H, _ = problem(d_out, d_in, 3, T=1200)
    exact = damped_objective(E, *whitened_lowrank(E, H, 32, DAMP, exact=True), H, DAMP)
    fast = damped_objective(E, *whitened_lowrank(E, H, 32, DAMP, exact=False), H, DAMP)
    assert exact * (1 - 1e-12) <= fast <= exact * (1 + 1e-6)


def test_top_eigenpairs_batched_matches_eigh():
    g = torch.Generator().manual_seed(0)
    # decaying spectrum: eigenpairs themselves converge
    Q = torch.linalg.qr(torch.randn(2, 400, 400, generator=g, dtype=torch.float64)).Q
    lam = 0.9 ** torch.arange(400, dtype=torch.float64)
    G = (Q * lam) @ Q.transpose(1, 2)
    values, vectors = top_eigenpairs(G, 10, exact=False)
    assert torch.allclose(values, lam[:10].expand(2, 10), rtol=1e-10)
    assert torch.allclose((vectors.transpose(1, 2) @ Q[:, :, :10]).abs(), torch.eye(10, dtype=torch.float64).expand(2, 10, 10), atol=1e-8)
    # flat (Wishart) spectrum, the hard case: the residual energy, which is the fit's
    # objective, is within 1e-6 of the optimum even where single eigenpairs are not converged
    M = torch.randn(3, 300, 500, generator=g, dtype=torch.float64)
    G = M @ M.transpose(1, 2)
    values, vectors = top_eigenpairs(G, 10, exact=False)
    total = G.diagonal(dim1=1, dim2=2).sum(1)
    best_residual = total - torch.linalg.eigvalsh(G).flip(-1)[:, :10].sum(1)
    residual = total - torch.einsum("bdr,bde,ber->b", vectors, G, vectors)
    assert torch.all(residual <= best_residual * (1 + 1e-6))
    assert torch.allclose(vectors.transpose(1, 2) @ vectors, torch.eye(10, dtype=torch.float64).expand(3, 10, 10), atol=1e-10)


def test_lqer_and_plain_svd_match_their_definitions():
    E, _, X = problem(20, 30, 1)
    a = X.abs().mean(0).double()
    U, s, Vh = torch.linalg.svd(E * a, full_matrices=False)
    A, B = lqer_lowrank(E, a, 5)
    assert torch.allclose(A @ B, (U[:, :5] * s[:5]) @ Vh[:5] / a, atol=1e-10)
    U, s, Vh = torch.linalg.svd(E, full_matrices=False)
    A, B = svd_lowrank_plain(E.T.contiguous(), 5)  # tall case
    assert torch.allclose(A @ B, ((U[:, :5] * s[:5]) @ Vh[:5]).T, atol=1e-10)


def test_exempt_columns_are_absorbed_when_rank_covers_them():
    # E nonzero only on k columns: rank ≥ k leaves (numerically) nothing
    E, H, _ = problem(30, 40, 2)
    cols = torch.tensor([3, 7, 11, 20])
    E_cols = torch.zeros_like(E)
    E_cols[:, cols] = E[:, cols]
    A, B = whitened_lowrank(E_cols, H, 4, DAMP)
    assert damped_objective(E_cols, A, B, H, DAMP) <= 1e-20 * damped_objective(E_cols, A[:, :0], B[:0], H, DAMP)


# --------------------------------------------------------------------------- robustness


def test_indefinite_hessian_gets_more_damping():
    H = torch.diag(torch.tensor([1.0, 1.0, -0.05], dtype=torch.float64))
    L, lam = damped_cholesky(H, 0.01)
    assert lam > 0.01
    assert torch.allclose(L @ L.T, damped(H, lam))
    E = torch.randn(8, 3, dtype=torch.float64)  # d_out > d_in: the Cholesky (input-side) path
    A, B = whitened_lowrank(E, H, 2, 0.01)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()


def test_non_finite_inputs_are_reported():
    H = torch.eye(3, dtype=torch.float64)
    H[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="Hessian"):
        damped_cholesky(H, 0.01)
    with pytest.raises(NumericalError, match="weight error"):
        whitened_lowrank(torch.full((2, 3), float("inf")), torch.eye(3, dtype=torch.float64), 1)


def test_zero_error_and_zero_hessian():
    A, B = whitened_lowrank(torch.zeros(4, 6), torch.zeros(6, 6, dtype=torch.float64), 2)
    assert torch.equal(A @ B, torch.zeros(4, 6))
    A, B = whitened_lowrank(torch.zeros(8, 3), torch.zeros(3, 3, dtype=torch.float64), 2)
    assert torch.equal(A @ B, torch.zeros(8, 3))


# --------------------------------------------------------------------------- module


@given(T=st.integers(0, 9), bits=st.sampled_from([8, 16]), seed=st.integers(0, 999))
@settings(max_examples=10)
def test_adapter_forward_and_round_trip(tmp_path_factory, T, bits, seed):
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(6, 3, generator=g), torch.randn(3, 5, generator=g)
    m = LowRankAdapter.from_factors(A, B, input_bits=bits)
    x = torch.randn(2, T, 5, generator=g)
    if bits == 16:
        assert torch.allclose(m(x), x @ B.T @ A.T, atol=1e-5)
    path = tmp_path_factory.mktemp("adapter") / "a.safetensors"
    save_file(m.state_dict(), str(path))
    fresh = compensator_module("layer", {"module": m.module_type, "layout": m.layout()}, default_manager().compensator_modules())
    fresh.load_state_dict(load_file(str(path)))
    assert torch.equal(fresh(x), m(x))


# --------------------------------------------------------------------------- plugin


def layer_context(d_out, d_in, seed=0, name="blk.0.q_proj"):
    _, H, X = problem(d_out, d_in, seed)
    W = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed)) * 0.05
    return LayerContext(name, 0, W, None, parse_setting("W4A8"), None, hessian=H, tokens=X.float())


@pytest.mark.parametrize("method", ["whitened", "lqer", "svd"])
def test_plugin_fit_reduces_the_calibration_objective(method):
    layer = layer_context(16, 24)
    comp = LowRankCompensator(LowRankConfig(rank=6, method=method))
    q = quantize_rtn(layer.weight, 3, 0, True)
    m = comp.fit(layer, q, comp.plan(layer))
    E = (layer.weight - q.dequantize()).double()
    before = damped_objective(E, E[:, :0], E[:0], layer.hessian, DAMP)
    after = damped_objective(E, m.A.double(), m.B.double(), layer.hessian, DAMP)
    assert after < before
    assert m.fit_figures["rank"] == 6 and m.fit_figures["method"] == method
    if method == "whitened":
        ref = damped_objective(E, *reference_whitened(E, layer.hessian, 6), layer.hessian, DAMP)
        assert after == pytest.approx(ref, rel=1e-5)
    assert comp.added_parameters(24, 16) == 6 * 40 == comp.flops_per_token(24, 16)


def test_rank_is_capped_and_recorded_but_override_is_refused():
    comp = LowRankCompensator(LowRankConfig(rank=288))
    comp.validate_layer("blk.0.k_proj", 576, 192)
    comp.validate_layer("blk.0.q_proj", 576, 576)
    assert comp.capped_layers == {"blk.0.k_proj": (288, 192)}
    assert comp.added_parameters(576, 192) == 192 * (576 + 192)
    layer = layer_context(8, 12, name="tiny")
    m = comp.fit(layer, quantize_rtn(layer.weight, 4, 0, True), LayerPlan())
    assert m.rank == 8 and comp.capped_layers["tiny"] == (288, 8)
    with pytest.raises(ConfigError, match="at most 192"):
        check_rank_override(288, 576, 192, "blk.0.k_proj")
    with pytest.raises(ConfigError, match="k_proj"):
        comp.validate_override("blk.0.k_proj", 576, 192)
    check_rank_override(192, 576, 192, "blk.0.k_proj")


def test_plugin_parameters_are_checked():
    pm = QEPluginManager(load_entry_points=False)
    assert pm.resolve("compensator", "lowrank[rank=288;method=lqer]").config == LowRankConfig(rank=288, method="lqer")
    with pytest.raises(ConfigError, match="choose one of whitened, lqer, svd"):
        pm.resolve("compensator", "lowrank[method=qr]")
    with pytest.raises(ConfigError, match="rank=0"):
        pm.resolve("compensator", "lowrank[rank=0]")
    assert LowRankCompensator(LowRankConfig(on_qe_base=True)).smoothing_candidates() == (None, 0.25, 0.5, 0.75)
    assert LowRankCompensator().smoothing_candidates() is None
    assert LowRankCompensator().importance_k() is None
    assert LowRankCompensator(LowRankConfig(on_qe_base=True, k=16)).importance_k() == 16


def test_on_qe_base_needs_importance_statistics():
    comp = LowRankCompensator(LowRankConfig(on_qe_base=True, k=4))
    with pytest.raises(ConfigError, match="importance statistics"):
        comp.plan(layer_context(8, 12))
