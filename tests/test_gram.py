"""Gram matrices: BLAS syrk's triangle equals the full product, on any thread count and layout,
and the streamed Hessian is exactly symmetric."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qe.analysis.statistics import InputStats
from qe.gram import gram_upper, symmetric_gram


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


@pytest.mark.parametrize("d", [1, 5, 200, 577, 1000])
def test_symmetric_gram_equals_the_product(d):
    M = torch.randn(300, d, generator=torch.Generator().manual_seed(d))
    G = symmetric_gram(M)
    assert G.dtype == torch.float64 and torch.equal(G, G.T)
    assert torch.allclose(G, M.double().T @ M.double(), rtol=1e-5, atol=1e-3)
