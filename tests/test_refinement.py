"""Layer-wise refinement of Quant Experts (docs/method.md, refinement): gradients, residuals, the fit."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_quant_experts import calibration_objective, fit, make_layer

from qe.compensators.quant_experts import _Residuals
from qe.compensators.refinement import (
    RefineSchedule,
    _loss_and_grads,
    layer_temperature,
    refine_experts,
)


def _random_problem(seed, T, N, d_in, d_out, r):
    """Tokens ``X``, a weight error ``E``, ``Y = X Eᵀ`` and random experts and router."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, d_in, generator=g, dtype=torch.float64)
    E = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) * 0.1
    A = torch.randn(N, d_out, r, generator=g, dtype=torch.float64) * 0.1
    B = torch.randn(N, r, d_in, generator=g, dtype=torch.float64) * 0.1
    R = torch.randn(N, d_in, generator=g, dtype=torch.float64)
    return X, E, X @ E.T, A, B, R


def _direct_norms(X, Y, A, B):
    return torch.stack([(Y - X @ B[i].T @ A[i].T).norm(dim=1) for i in range(A.shape[0])], dim=1)


def _routed_sq(X, E):
    """QE's residual expansion with no shared expert, as the fit hands it to the refinement."""
    return _Residuals(X, E, E.new_zeros(E.shape[0], 0), E.new_zeros(0, E.shape[1])).routed_sq


def _reference_loss(x, y, f, target, tau, A, B, R, kl_weight):
    """The same loss token by token, for autograd."""
    logits = -(f @ R.T) / tau
    log_p = torch.log_softmax(logits, dim=1)
    kl = (target * (target.clamp_min(1e-300).log() - log_p)).sum() / x.shape[0]
    choice = logits.detach().argmax(dim=1)
    residual = torch.stack([y[t] - A[c] @ (B[c] @ x[t]) for t, c in enumerate(choice.tolist())])
    return residual.pow(2).sum() / y.pow(2).sum() + kl_weight * kl


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 12), N=st.integers(1, 5), r=st.integers(1, 3),
       kl_weight=st.sampled_from([0.0, 0.5, 1.0]))
def test_written_out_gradients_equal_autograd(seed, b, N, r, kl_weight):
    # Batches smaller than N leave experts without tokens: their gradient must be zero.
    x, _, y, A, B, R = _random_problem(seed, b, N, 7, 5, r)
    f = x.abs()
    e = _direct_norms(x, y, A, B)
    tau = layer_temperature(e, 0.7)
    target = torch.softmax(-e / tau, dim=1)
    loss, (gA, gB, gR) = _loss_and_grads(x, y, f, target, tau, A, B, R, kl_weight)
    leaves = [t.clone().requires_grad_(True) for t in (A, B, R)]
    ref = _reference_loss(x, y, f, target, tau, *leaves, kl_weight)
    ref.backward()
    assert loss == pytest.approx(float(ref.detach()), rel=1e-9, abs=1e-12)
    for mine, leaf in zip((gA, gB, gR), leaves):
        torch.testing.assert_close(mine, leaf.grad, rtol=1e-8, atol=1e-11)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), T=st.integers(1, 30), N=st.integers(1, 4), r=st.integers(1, 4))
def test_residual_expansion_equals_the_direct_computation(seed, T, N, r):
    # The refinement's per-epoch targets come from QE's _Residuals.routed_sq.
    for d_in, d_out in ((9, 6), (5, 11)):  # both ways of projecting E_S x̃ onto A_i
        X, E, Y, A, B, _ = _random_problem(seed, T, N, d_in, d_out, r)
        torch.testing.assert_close(_routed_sq(X, E)(A, B).sqrt(), _direct_norms(X, Y, A, B), rtol=1e-7, atol=1e-9)


def test_refinement_lowers_the_routed_objective_and_leaves_the_shared_expert():
    layer = make_layer(T=1500, seed=3)
    base = fit(layer)[3]
    _, _, q, refined = fit(layer, refine=True, refine_epochs=6, refine_iterations=20, refine_lr=3e-2)
    figs = refined.fit_figures
    assert figs["refine_kept"] and figs["refine_residual_after"] < figs["refine_residual_before"]
    assert figs["refine_residual_before"] == pytest.approx(base.fit_figures["residual_router"], rel=1e-12)
    assert figs["residual_router"] == pytest.approx(figs["refine_residual_after"], rel=1e-12)
    # The deployed module (router's choice) has the lower calibration error, as the figures say.
    assert calibration_objective(layer, q, refined) < calibration_objective(layer, q, base)
    torch.testing.assert_close(refined.A_s, base.A_s, rtol=0, atol=0)
    torch.testing.assert_close(refined.B_s, base.B_s, rtol=0, atol=0)
    assert not torch.equal(refined.R, base.R) and not torch.equal(refined.A, base.A)
    # Seeded batch order: a second run gives the same tensors.
    again = fit(layer, refine=True, refine_epochs=6, refine_iterations=20, refine_lr=3e-2)[3]
    for name in ("A", "B", "R"):
        assert torch.equal(getattr(again, name), getattr(refined, name))


def test_a_refinement_that_does_not_help_is_not_kept():
    layer = make_layer(T=600, seed=5)
    base = fit(layer)[3]
    # A huge step size wrecks the experts: the closed-form ones must stay.
    refined = fit(layer, refine=True, refine_epochs=2, refine_iterations=5, refine_lr=10.0)[3]
    assert refined.fit_figures["refine_kept"] is False
    assert refined.fit_figures["refine_residual_after"] >= refined.fit_figures["refine_residual_before"]
    for name in ("A", "B", "R"):
        assert torch.equal(getattr(refined, name), getattr(base, name))


def test_refine_schedule_runs_the_requested_steps():
    X, E, Y, A, B, R = (t.float() for t in _random_problem(0, 50, 3, 8, 4, 2))
    out = refine_experts(X, Y, A, B, R, RefineSchedule(epochs=3, iterations=7, lr=1e-2), _routed_sq(X, E))
    assert out.A.shape == A.shape and out.B.shape == B.shape and out.R.shape == R.shape
    assert out.last_loss < out.first_loss  # the loss falls over the epochs on a learnable problem
    # Inputs untouched.
    assert torch.equal(A, _random_problem(0, 50, 3, 8, 4, 2)[3].float())
