"""Gram matrices ``MᵀM`` of token matrices (the calibration Hessian ``XᵀX`` and the fits' Grams)
and their damped Cholesky factorization, shared by GPTQ and the compensators' fits.

A Gram is symmetric, so only one triangle needs computing: BLAS ``syrk`` does half the
multiply-adds of ``M.T @ M``. torch does not expose it; SciPy's BLAS does, and on this
project's CPUs it ran 2.2× faster than torch's full product (4096 × 1536 float32, one thread).
It runs on as many threads as torch is allowed, so ``torch.set_num_threads`` keeps governing
the whole computation. Off the CPU, or for dtypes BLAS lacks, the plain product is used.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.linalg import blas, lapack

from qe.errors import NumericalError

_SYRK = {torch.float32: blas.ssyrk, torch.float64: blas.dsyrk}


def gram_upper(M: torch.Tensor) -> torch.Tensor:
    """``MᵀM`` of ``M`` ``(T, d)`` in M's dtype, exact in its upper triangle only (the lower one
    is unspecified)."""
    syrk = _SYRK.get(M.dtype)
    if M.device.type != "cpu" or syrk is None or M.requires_grad or 0 in M.shape:
        return M.T @ M
    a = np.ascontiguousarray(M.numpy())
    with _blas_threads().limit(limits=torch.get_num_threads(), user_api="blas"):
        # a is C-ordered (T, d), so a.T is a Fortran-ordered (d, T) matrix without a copy, and
        # syrk without transposition computes a.T · (a.T)ᵀ = MᵀM from it.
        c = syrk(1.0, a.T, trans=0, lower=0)
    return torch.from_numpy(c)


def mirror_upper(G: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle is ``G``'s."""
    upper = G.triu()
    return upper + upper.triu(1).T


def mirror_upper_in_place(G: torch.Tensor, block: int = 512) -> torch.Tensor:
    """Copy ``G``'s upper triangle onto its lower one, in place (``G`` returned); a block of
    rows at a time, so the only temporaries are ``block``-row slices."""
    d = G.shape[-1]
    for i0 in range(0, d, block):
        i1 = min(i0 + block, d)
        G[i0:i1, :i0] = G[:i0, i0:i1].T
        diag = G[i0:i1, i0:i1]
        diag.copy_(mirror_upper(diag))
    return G


def symmetric_gram(M: torch.Tensor) -> torch.Tensor:
    """``MᵀM`` as float64, exactly symmetric (products in M's dtype); mirrored in place, so the
    float64 result and, briefly, the product in M's dtype are all it allocates."""
    G = gram_upper(M)
    return mirror_upper_in_place(G if G.dtype == torch.float64 else G.double())


@functools.cache
def _blas_threads():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def all_finite(t: torch.Tensor, chunk: int = 1 << 20) -> bool:
    """Whether ``t`` holds no NaN or Inf, checked ``chunk`` elements at a time: ``isfinite`` of a
    whole float64 ``d × d`` matrix allocates more than the matrix itself (measured: 1.4×)."""
    if t.dim() == 0 or t.numel() <= chunk:
        return bool(torch.isfinite(t).all())
    rows = max(1, chunk // max(1, t[0].numel()))
    return all(bool(torch.isfinite(part).all()) for part in t.split(rows))


# --------------------------------------------------------------------------- damping and Cholesky

CHOLESKY_RETRIES = 4  # a failed factorization is retried with 10x, 100x, ... the damping


def damping_scale(mean_diag: float) -> float:
    """What damping is relative to: a matrix's mean diagonal, or 1 where it has no positive
    one (an all-zero Hessian), so the damped matrix is still positive definite."""
    return mean_diag if mean_diag > 0 and math.isfinite(mean_diag) else 1.0


def damping(H: torch.Tensor, damp: float) -> float:
    """``λ · mean(diag H)``; λ alone when H has no positive diagonal (an all-zero Hessian)."""
    return damp * damping_scale(float(H.diagonal(dim1=-2, dim2=-1).double().mean()))


def damped(H: torch.Tensor, damp: float, scale: float | None = None) -> torch.Tensor:
    """``H + λ·c·I`` in float64 (a new tensor), ``c`` = ``scale`` or ``mean(diag H)``."""
    Hd = H.to(torch.float64, copy=True)
    Hd.diagonal().add_(damping(H, damp) if scale is None else damp * scale)
    return Hd


def damped_times(H: torch.Tensor, M: torch.Tensor, damp: float) -> torch.Tensor:
    """``(H + λ·mean(diag H)·I) · M`` in float64, without forming the damped ``d × d`` copy."""
    Md = M.to(torch.float64)
    return torch.addmm(Md, H.to(torch.float64), Md, beta=damping(H, damp))


def _fortran_view(A: torch.Tensor) -> tuple[np.ndarray, bool] | None:
    """A Fortran-ordered NumPy view of ``A``'s memory, for LAPACK to work in place, and whether
    it holds ``Aᵀ`` (``A`` C-ordered) rather than ``A`` (``A`` Fortran-ordered, as the Grams
    from :func:`gram_upper` are); None off the CPU, for other dtypes, or a strided ``A``."""
    if A.device.type != "cpu" or A.dtype != torch.float64 or A.dim() != 2 or A.requires_grad:
        return None
    if A.mT.is_contiguous():
        return A.numpy(), False
    if A.is_contiguous():
        return A.numpy().T, True
    return None


def cholesky_in_place(A: torch.Tensor) -> bool:
    """Overwrite the symmetric float64 ``A`` with its lower Cholesky factor (``A = L Lᵀ``, upper
    triangle zeroed); False when ``A`` is not positive definite, and ``A`` then holds garbage.

    In place on the CPU, where a ``d × d`` float64 copy is 0.5 GB at d = 8,192: torch's own
    factorization allocates one such copy even when told to write into its input.
    """
    view = _fortran_view(A)
    if view is None:
        L, info = torch.linalg.cholesky_ex(A)
        A.copy_(L)
        return int(info) == 0
    a, transposed = view
    with _blas_threads().limit(limits=torch.get_num_threads(), user_api="blas"):
        # On Aᵀ (= A), the upper factor Uᵀ U lands where A's lower factor L = Uᵀ belongs.
        _, info = lapack.dpotrf(a, lower=0 if transposed else 1, clean=1, overwrite_a=1)
    return info == 0


def invert_lower_in_place(L: torch.Tensor) -> torch.Tensor:
    """``L⁻¹`` of a lower-triangular float64 ``L``, written into ``L`` (returned)."""
    view = _fortran_view(L)
    if view is None:
        eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
        return L.copy_(torch.linalg.solve_triangular(L, eye, upper=False))
    a, transposed = view
    with _blas_threads().limit(limits=torch.get_num_threads(), user_api="blas"):
        _, info = lapack.dtrtri(a, lower=0 if transposed else 1, overwrite_c=1)  # (Lᵀ)⁻¹ = (L⁻¹)ᵀ on Lᵀ
    if info != 0:
        raise NumericalError(f"a triangular factor is singular (LAPACK dtrtri info={info})")
    return L


def _require_finite(H: torch.Tensor, where: str) -> None:
    if not all_finite(H):
        raise NumericalError(f"NaN or Inf in the Hessian{' of ' + where if where else ''}: check the calibration inputs")


def damped_cholesky(H: torch.Tensor, damp: float, where: str = "", *, scale: float | None = None,
                    on_retry: Callable[[float, float], None] | None = None) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of ``H + λ·c·I`` (float64, ``c`` = ``scale`` or ``mean(diag H)``)
    and the λ that worked.

    A factorization that fails (H numerically indefinite) is retried with λ ×10, up to
    :data:`CHOLESKY_RETRIES` times; ``on_retry(λ, next λ)`` is told each time (GPTQ warns).
    Each attempt factors one copy of ``H`` in place: ``H`` and the factor are the only
    ``d × d`` matrices held.
    """
    _require_finite(H, where)
    c = damping(H, 1.0) if scale is None else scale
    return factor_damped(lambda: H.to(torch.float64, copy=True), damp, c, where, on_retry)


def factor_damped(fresh: Callable[[], torch.Tensor], damp: float, scale: float, where: str = "",
                  on_retry: Callable[[float, float], None] | None = None) -> tuple[torch.Tensor, float]:
    """:func:`damped_cholesky` of the matrix ``fresh()`` returns (a new float64 tensor each call,
    owned by the factorization), damped by ``λ·scale``: each attempt damps and factors it in
    place, so the factor is the only ``d × d`` matrix held (a caller that can rebuild a large
    matrix saves the copy a retry would need)."""

    def attempt(lam: float) -> torch.Tensor | None:
        L = fresh()
        L.diagonal().add_(lam * scale)
        return L if cholesky_in_place(L) else None  # a failed one is freed before the next is built

    return _with_rising_damping(attempt, damp, where, on_retry)


def _with_rising_damping(attempt: Callable[[float], torch.Tensor | None], damp: float, where: str,
                         on_retry: Callable[[float, float], None] | None) -> tuple[torch.Tensor, float]:
    """``attempt(λ)``'s factor and the λ that gave it: λ = ``damp``, then ×10 while an attempt
    returns None, :data:`CHOLESKY_RETRIES` times at most (``on_retry(λ, next λ)`` told each time)."""
    lam = damp
    for _ in range(CHOLESKY_RETRIES + 1):
        factor = attempt(lam)
        if factor is not None:
            return factor, lam
        following = lam * 10 if lam > 0 else 1e-6
        if on_retry is not None:
            on_retry(lam, following)
        lam = following
    of = f" of {where}" if where else ""
    raise NumericalError(f"the Hessian{of} is not positive definite even with damping {lam / 10:g}: "
                         "check the calibration inputs, or use rtn")


def permute_symmetric_in_place(H: torch.Tensor, order: torch.Tensor, block: int = 256) -> torch.Tensor:
    """``H[order][:, order]`` written over ``H`` (returned): columns a block of rows at a time,
    then rows along the permutation's cycles, so the only temporaries are a ``block``-row
    slice and one row, not a second ``d × d`` matrix."""
    d = H.shape[0]
    for i0 in range(0, d, block):
        H[i0 : i0 + block] = H[i0 : i0 + block].index_select(1, order)
    source = order.tolist()  # row i takes row source[i]
    moved = [False] * d
    for start in range(d):
        if moved[start] or source[start] == start:
            continue
        first = H[start].clone()
        i = start
        while source[i] != start:
            H[i] = H[source[i]]
            moved[i] = True
            i = source[i]
        H[i] = first
        moved[i] = True
    return H


def factor_damped_over(H: torch.Tensor, damp: float, scale: float, where: str = "",
                       on_retry: Callable[[float, float], None] | None = None) -> tuple[torch.Tensor, float]:
    """:func:`factor_damped` of the symmetric float64 ``H`` itself, overwritten by its lower
    factor (returned): no second ``d × d`` matrix, and still able to retry. LAPACK factors the
    lower triangle and leaves the strict upper one alone, so after a failure the lower
    triangle is restored from it (and the diagonal from a copy) and λ raised; the upper
    triangle is zeroed once a factorization succeeds. The same factor as :func:`factor_damped`
    of a copy, bit for bit, where :func:`overwritable` holds."""
    view = _fortran_view(H)
    if view is None:
        raise ValueError("factor_damped_over needs a contiguous float64 CPU matrix")
    a, transposed = view
    diagonal = H.diagonal().clone()

    def attempt(lam: float) -> torch.Tensor | None:
        H.diagonal().add_(lam * scale)
        with _blas_threads().limit(limits=torch.get_num_threads(), user_api="blas"):
            _, info = lapack.dpotrf(a, lower=0 if transposed else 1, clean=0, overwrite_a=1)
        if info == 0:
            return _zero_upper(H)
        mirror_upper_in_place(H)  # the lower triangle back from the untouched upper one
        H.diagonal().copy_(diagonal)
        return None

    return _with_rising_damping(attempt, damp, where, on_retry)


def overwritable(H: torch.Tensor) -> bool:
    """Whether :func:`factor_damped_over` can work in ``H``'s own memory and give what a
    factorization of a copy gives, bit for bit: a C-ordered float64 CPU matrix, laid out as
    the copy would be (LAPACK is then called on the same triangle)."""
    return H.is_contiguous() and _fortran_view(H) is not None


def _zero_upper(H: torch.Tensor, block: int = 512) -> torch.Tensor:
    """``H`` with its strict upper triangle zeroed, in place, a block of rows at a time."""
    for i0 in range(0, H.shape[0], block):
        H[i0 : i0 + block, i0 + 1 :].tril_(-1)  # in this slice, column c' is column i0 + 1 + c'
    return H


def damped_gram_cholesky(M: torch.Tensor, damp: float, where: str = "", *,
                         scale: float | None = None) -> tuple[torch.Tensor, float]:
    """:func:`damped_cholesky` of the Gram ``MᵀM`` (:func:`symmetric_gram`), damped by
    ``λ·scale`` (``scale`` by default the Gram's mean diagonal), factored in the Gram's own
    memory (rebuilt from ``M`` for a retry): the factor is the one ``d × d`` matrix held, not
    the Gram and a damped copy of it."""
    G = symmetric_gram(M)
    _require_finite(G, where)
    scale = damping(G, 1.0) if scale is None else scale
    first = [G]  # handed over to the factorization, which overwrites it
    del G
    return factor_damped(lambda: first.pop() if first else symmetric_gram(M), damp, scale, where)
