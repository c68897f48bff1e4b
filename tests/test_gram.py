"""Gram matrices: BLAS syrk's triangle equals the full product, on any thread count and layout,
the streamed Hessian is exactly symmetric, and the in-place factorizations (which keep GPTQ's
working set near one d × d matrix) equal torch's."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qe.analysis.statistics import InputStats
from qe.gram import (
    all_finite,
    cholesky_in_place,
    damped,
    damped_cholesky,
    damped_gram_cholesky,
    damped_times,
    factor_damped,
    gram_upper,
    invert_lower_in_place,
    mirror_upper,
    mirror_upper_in_place,
    symmetric_gram,
)


@given(seed=st.integers(0, 1000), tokens=st.integers(0, 200), d=st.integers(1, 40), threads=st.integers(1, 2),
       double=st.booleans())
@settings(max_examples=30, deadline=None)
def test_gram_upper_matches_the_full_product(seed, tokens, d, threads, double):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=g) * torch.rand(d, generator=g) * 4
    if double:
        x = x.double()
    exact = x.double().T @ x.double()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        upper = gram_upper(x)
    finally:
        torch.set_num_threads(before)
    assert upper.dtype == x.dtype
    tol = 1e-12 if double else 1e-5
    assert torch.allclose(upper.double().triu(), exact.triu(), rtol=tol, atol=tol * 10)
    # A non-contiguous view (a column slice) is read with its strides.
    if d > 1:
        view = gram_upper(x[:, 1:]).double().triu()
        assert torch.allclose(view, exact[1:, 1:].triu(), rtol=tol, atol=tol * 10)


@given(seed=st.integers(0, 1000), chunks=st.integers(1, 4))
@settings(max_examples=10, deadline=None)
def test_streamed_hessian_is_symmetric_and_exact(seed, chunks):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(120, 24, generator=g) * torch.rand(24, generator=g) * 3
    inp = InputStats(24, None, hessian=True, moments=False)
    for part in x.chunk(chunks):
        inp.update(part, torch.zeros(len(part), dtype=torch.int8), 0)
    exact = x.double().T @ x.double()
    assert torch.equal(inp.xtx, inp.xtx.T)
    assert torch.allclose(inp.xtx, exact, rtol=1e-5, atol=1e-4)


@given(seed=st.integers(0, 1000), chunks=st.integers(2, 4))
@settings(max_examples=10, deadline=None)
def test_streamed_hessian_read_between_updates_stays_exact(seed, chunks):
    # xtx mirrors the accumulator in place; an update after a read must not keep stale halves.
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(90, 16, generator=g)
    inp = InputStats(16, None, hessian=True, moments=False)
    seen = torch.zeros(0, 16)
    for part in x.chunk(chunks):
        inp.update(part, torch.zeros(len(part), dtype=torch.int8), 0)
        seen = torch.cat([seen, part])
        exact = seen.double().T @ seen.double()
        assert torch.equal(inp.xtx, inp.xtx.T)
        assert torch.allclose(inp.xtx, exact, rtol=1e-5, atol=1e-4)


@given(seed=st.integers(0, 1000), d=st.integers(0, 40), block=st.integers(1, 9))
@settings(max_examples=30, deadline=None)
def test_mirror_in_place_equals_the_copying_mirror(seed, d, block):
    G = torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))  # any lower half
    expected = mirror_upper(G)
    ptr = G.data_ptr()
    assert torch.equal(mirror_upper_in_place(G, block), expected)
    assert G.data_ptr() == ptr and torch.equal(G, expected)


@given(seed=st.integers(0, 1000), d=st.integers(1, 48), fortran=st.booleans())
@settings(max_examples=30, deadline=None)
def test_cholesky_and_triangular_inverse_in_place(seed, d, fortran):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d + 3, d, dtype=torch.float64, generator=g) * torch.rand(d, dtype=torch.float64, generator=g)
    A = X.T @ X + 0.1 * torch.eye(d, dtype=torch.float64)
    if fortran:  # column-major memory, as the Grams BLAS returns
        A = A.T.contiguous().T
    A0 = A.clone()
    ptr = A.data_ptr()
    assert cholesky_in_place(A)
    assert A.data_ptr() == ptr and torch.equal(A, A.tril())
    assert torch.allclose(A, torch.linalg.cholesky(A0), rtol=1e-10, atol=1e-12)
    L = A.clone()
    assert invert_lower_in_place(A).data_ptr() == ptr
    assert torch.allclose(A @ L, torch.eye(d, dtype=torch.float64), atol=1e-8)


def test_cholesky_in_place_reports_an_indefinite_matrix():
    assert not cholesky_in_place(torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)))
    assert cholesky_in_place(torch.diag(torch.tensor([1.0, 4.0, 2.0], dtype=torch.float64)))


@pytest.mark.parametrize("d", [1, 5, 200, 577, 1000])
def test_symmetric_gram_equals_the_product(d):
    M = torch.randn(300, d, generator=torch.Generator().manual_seed(d))
    G = symmetric_gram(M)
    assert G.dtype == torch.float64 and torch.equal(G, G.T)
    assert torch.allclose(G, M.double().T @ M.double(), rtol=1e-5, atol=1e-3)


@given(seed=st.integers(0, 1000), d=st.integers(1, 30), cols=st.integers(1, 6), damp=st.floats(0.0, 1.0))
@settings(max_examples=30, deadline=None)
def test_damped_times_equals_the_product_with_the_damped_copy(seed, d, cols, damp):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d + 2, d, generator=g)
    H = X.double().T @ X.double()
    M = torch.randn(d, cols, generator=g)
    assert torch.allclose(damped_times(H, M, damp), damped(H, damp) @ M.double(), rtol=1e-10, atol=1e-10)


def test_factor_damped_rebuilds_the_matrix_for_each_retry():
    H = torch.diag(torch.tensor([1.0, 2.0, -0.05], dtype=torch.float64))
    built = []

    def fresh():
        built.append(1)
        return H.clone()

    retries = []
    L, lam = factor_damped(fresh, 0.01, 1.0, on_retry=lambda a, b: retries.append((a, b)))
    assert len(built) == len(retries) + 1 and lam > 0.01  # a failed attempt's matrix is garbage: rebuilt
    expected, lam_expected = damped_cholesky(H, 0.01, scale=1.0)
    assert lam == lam_expected and torch.allclose(L, expected)
    assert torch.equal(H, torch.diag(torch.tensor([1.0, 2.0, -0.05], dtype=torch.float64)))


@given(seed=st.integers(0, 1000), rows=st.integers(0, 30), cols=st.integers(1, 30), chunk=st.integers(1, 50),
       bad=st.sampled_from([None, float("nan"), float("inf"), float("-inf")]), transpose=st.booleans())
@settings(max_examples=40, deadline=None)
def test_all_finite_by_chunks_equals_the_whole_check(seed, rows, cols, chunk, bad, transpose):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, cols, dtype=torch.float64, generator=g)
    if bad is not None and t.numel():
        t.view(-1)[int(torch.randint(t.numel(), (1,), generator=g))] = bad
    t = t.T if transpose else t  # a non-contiguous view is checked in place
    assert all_finite(t, chunk) == bool(torch.isfinite(t).all())


@given(seed=st.integers(0, 1000), tokens=st.integers(1, 60), d=st.integers(1, 30), damp=st.floats(1e-4, 1.0))
@settings(max_examples=30, deadline=None)
def test_gram_cholesky_equals_the_cholesky_of_the_damped_gram(seed, tokens, d, damp):
    M = torch.randn(tokens, d, generator=torch.Generator().manual_seed(seed))
    L, lam = damped_gram_cholesky(M, damp)
    expected, lam_expected = damped_cholesky(symmetric_gram(M), damp)
    assert lam == lam_expected
    assert torch.allclose(L, expected, rtol=1e-9, atol=1e-12)


def test_a_gram_and_its_factor_hold_few_matrices(matrices_held):
    """The router's and the experts' Grams are factored in their own memory. Measured at
    d = 2,000 with a 1,024-token float32 input: 2.4 d × d float64 matrices at the peak (the
    input, the float32 product and its float64 copy, the factor written over it), where
    mirroring by copies and factoring a damped copy (through torch, which copies again) took 4.8."""
    setup = "from qe.gram import damped_gram_cholesky\nrun = lambda W, H: damped_gram_cholesky(H[:1024].float(), 0.01)"
    assert matrices_held(setup, 2000) < 3.2


def test_gram_cholesky_retries_on_a_fresh_gram():
    # A zero Gram with no damping fails; the retry rebuilds it (the failed one is garbage).
    L, lam = damped_gram_cholesky(torch.zeros(3, 4), 0.0)
    assert lam == 1e-6 and torch.allclose(L, 1e-3 * torch.eye(4, dtype=torch.float64))


def test_strided_and_gradient_inputs_factor_through_torch():
    X = torch.randn(12, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    big = X.T @ X + torch.eye(9, dtype=torch.float64)
    view = big[:6, :6]  # neither C- nor Fortran-contiguous: LAPACK cannot work in place on it
    expected = torch.linalg.cholesky(view.clone())
    assert cholesky_in_place(view) and torch.allclose(view, expected)
    assert torch.allclose(invert_lower_in_place(view) @ expected, torch.eye(6, dtype=torch.float64), atol=1e-10)
    H = (X.T @ X).requires_grad_()
    L, _ = damped_cholesky(H, 0.01)
    assert torch.allclose(L, torch.linalg.cholesky(damped(H.detach(), 0.01)))
