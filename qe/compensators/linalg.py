"""Low-rank factorizations of a weight error ``E`` (``d_out × d_in``).

The whitened fit (docs/method.md, shared expert) is the optimum of the damped calibration objective

    min_{A (d_out×r), B (r×d_in)}  tr((E − A B) H_d (E − A B)ᵀ),   H_d = H + λ·mean(diag H)·I,

with ``H = Σ_t x_t x_tᵀ``. With ``H_d = S Sᵀ`` (Cholesky) it is Eckart–Young on ``E S``:
``SVD(E S) = U Σ Vᵀ``, ``A = U_r Σ_r``, ``B = V_rᵀ S⁻¹``, and then ``A B = U_r U_rᵀ E``.

How it is computed (chosen by measuring on this project's 2-core CPU, where LAPACK
eigen/SVD routines of a few hundred columns cost 0.1–1 s but matrix products are cheap):
only the top-r singular triplets are needed, and they come from the *smaller* Gram matrix
of ``M = E S``:

* ``d_out ≤ d_in`` ("output side"): ``M Mᵀ = E H_d Eᵀ`` (no Cholesky at all); its top-r
  eigenvectors are ``U_r``, eigenvalues ``Σ_r²``; ``A = U_r Σ_r``, ``B = Σ_r⁻¹ U_rᵀ E``
  (which equals ``V_rᵀ S⁻¹``).
* ``d_in < d_out`` ("input side"): Cholesky ``H_d = L Lᵀ``, ``Mᵀ M = Lᵀ (EᵀE) L``; its top-r
  eigenvectors are ``V_r``; ``A = E L V_r`` (``= U_r Σ_r``), ``B = V_rᵀ L⁻¹`` by a triangular
  solve.

The Gram is formed in float64. Its top eigenpairs come from :func:`top_eigenpairs`: exact
``eigh`` for small matrices, else block subspace iteration with a Rayleigh–Ritz step (a
handful of ``d × d`` by ``d × (r+p)`` products), which the property tests hold to the exact
optimum within a relative 1e-6 of the objective.
"""

from __future__ import annotations

import torch

from qe.errors import NumericalError
from qe.gram import all_finite, damped_cholesky, damped_times

# Exact eigh below this size (cheap there) or when the rank is a large share of the size.
EXACT_EIGH_MAX = 192
# Subspace iteration: block = rank + max(OVERSAMPLE, rank), SUBSPACE_ITERATIONS products.
# Measured on a W4 error of a 576×1536 layer with outlier activations (a flat spectrum, the
# hard case): relative excess of the objective's residual over the exact optimum 1e-7 at
# rank 32 (0.04 s, against 0.08 s for eigh of the 576² Gram on one core, 0.3–1.5 s on two
# busy ones).
OVERSAMPLE = 32
SUBSPACE_ITERATIONS = 16
# Singular values below this fraction of the largest carry no signal: their directions are
# dropped (zero columns of A, zero rows of B) instead of being divided by ~0.
RELATIVE_SIGMA_FLOOR = 1e-10


# --------------------------------------------------------------------------- eigenpairs


def top_eigenpairs(
    G: torch.Tensor, rank: int, *, exact: bool | None = None, iterations: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest ``rank`` eigenpairs of symmetric PSD ``G`` (``d × d`` or a batch ``(b, d, d)``).

    Returns ``(values (..., rank), vectors (..., d, rank))``, values in decreasing order and
    clamped at 0. ``exact=None`` picks ``eigh`` for small ``d`` or ``rank`` close to ``d``,
    else block subspace iteration (block ``rank + max(OVERSAMPLE, rank)``) with Rayleigh–Ritz.
    Computed in G's dtype (float32 is fine where 1e-6 of the objective does not matter).
    """
    d = G.shape[-1]
    rank = min(rank, d)
    block = rank + max(OVERSAMPLE, rank)
    if exact is None:
        exact = d <= EXACT_EIGH_MAX or 2 * block >= d
    if exact:
        values, vectors = torch.linalg.eigh(G)
        values = values.flip(-1)[..., :rank]
        vectors = vectors.flip(-1)[..., :rank]
        return values.clamp_min(0), vectors
    iterations = SUBSPACE_ITERATIONS if iterations is None else iterations
    gen = torch.Generator(device=G.device).manual_seed(seed)
    Q = torch.randn(*G.shape[:-1], block, generator=gen, dtype=G.dtype, device=G.device)
    Q = torch.linalg.qr(G @ Q).Q
    for _ in range(iterations):
        Q = torch.linalg.qr(G @ Q).Q
    small = Q.transpose(-1, -2) @ G @ Q  # (block, block) Rayleigh quotient
    small = (small + small.transpose(-1, -2)) / 2
    values, W = torch.linalg.eigh(small)
    values = values.flip(-1)[..., :rank]
    vectors = Q @ W.flip(-1)[..., :rank]
    return values.clamp_min(0), vectors


def damped_objective(E: torch.Tensor, A: torch.Tensor, B: torch.Tensor, H: torch.Tensor, damp: float) -> float:
    """``tr((E − AB) H_d (E − AB)ᵀ)`` with ``H_d = H + λ·mean(diag H)·I`` (float64)."""
    R = E.double() - A.double() @ B.double()
    return float((damped_times(H, R.T, damp).T * R).sum())


# --------------------------------------------------------------------------- factor builders


def _drop_null_directions(sigma: torch.Tensor) -> torch.Tensor:
    """Mask ``(…, r)`` of directions whose singular value carries signal."""
    top = sigma[..., :1].clamp_min(torch.finfo(sigma.dtype).tiny)
    return sigma > RELATIVE_SIGMA_FLOOR * top


def lowrank_from_output_gram(
    E: torch.Tensor,
    G: torch.Tensor,
    rank: int,
    *,
    exact: bool | None = None,
    eig_dtype: torch.dtype = torch.float64,
    iterations: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors from the output-side Gram ``G = E H_d Eᵀ`` (``d_out × d_out``, PSD).

    ``A = U_r Σ_r``, ``B = Σ_r⁻¹ U_rᵀ E`` (``= V_rᵀ S⁻¹``); ``A B = U_r U_rᵀ E``. Batched over
    leading dimensions of ``G`` (one E, several Hessians). ``eig_dtype`` is the precision of
    the eigen step (float32 halves its time; the factors are still assembled in float64),
    ``iterations`` its subspace iterations (None: the module default). Returned in E's dtype.
    """
    values, U = top_eigenpairs(G.to(eig_dtype), rank, exact=exact, iterations=iterations)  # (…, r), (…, d_out, r)
    values, U = values.double(), U.double()
    sigma = values.sqrt()
    keep = _drop_null_directions(sigma)
    inv_sigma = torch.where(keep, 1.0 / sigma.clamp_min(torch.finfo(sigma.dtype).tiny), torch.zeros_like(sigma))
    A = U * (sigma * keep)[..., None, :]
    B = (U.transpose(-1, -2) @ E.double()) * inv_sigma[..., :, None]
    return A.to(E.dtype), B.to(E.dtype)


def lowrank_from_input_cholesky(
    E: torch.Tensor,
    L: torch.Tensor,
    rank: int,
    *,
    EtE: torch.Tensor | None = None,
    exact: bool | None = None,
    eig_dtype: torch.dtype = torch.float64,
    iterations: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors from ``H_d = L Lᵀ`` (``L`` lower, float64; batched over leading dims).

    ``Mᵀ M = Lᵀ (EᵀE) L`` gives ``V_r``; ``A = E L V_r``; ``B = V_rᵀ L⁻¹`` (triangular solve).
    ``EtE`` (``EᵀE``, float64) may be passed when several Hessians share one E;
    ``eig_dtype`` is the precision of ``Lᵀ K L`` and its eigen step.
    """
    Ed = E.double()
    K = (Ed.T @ Ed if EtE is None else EtE).to(eig_dtype)
    L_low = L.to(eig_dtype)
    G = L_low.transpose(-1, -2) @ K @ L_low  # the d_in³ products run in eig_dtype too
    G = (G + G.transpose(-1, -2)) / 2
    values, V = top_eigenpairs(G, rank, exact=exact, iterations=iterations)
    values, V = values.double(), V.double()
    keep = _drop_null_directions(values.sqrt())
    V = V * keep[..., None, :]
    A = Ed @ (L @ V)  # (…, d_out, r)
    # B = Vᵀ L⁻¹  ⇔  Lᵀ Bᵀ = V
    Bt = torch.linalg.solve_triangular(L.transpose(-1, -2), V, upper=True)
    return A.to(E.dtype), Bt.transpose(-1, -2).to(E.dtype)


def whitened_lowrank(
    E: torch.Tensor, H: torch.Tensor, rank: int, damp: float = 0.01, *, exact: bool | None = None, where: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal rank-``rank`` ``(A (d_out, r), B (r, d_in))`` of the damped objective.

    docs/method.md, shared expert: ``H_d = H + λ·mean(diag H)·I`` (float64), ``SVD(E S) = U Σ Vᵀ``,
    ``A = U_r Σ_r``, ``B = V_rᵀ S⁻¹``; computed through the smaller Gram of ``E S`` (module
    docs). ``rank`` above ``min(d_out, d_in)`` is capped (the caller records that).
    """
    d_out, d_in = E.shape
    rank = min(rank, d_out, d_in)
    if not all_finite(E):
        raise NumericalError(f"NaN or Inf in the weight error{' of ' + where if where else ''}")
    if rank == 0:
        return E.new_zeros(d_out, 0), E.new_zeros(0, d_in)
    if d_out <= d_in:
        Ed = E.double()
        G = Ed @ damped_times(H, Ed.T, damp)
        return lowrank_from_output_gram(E, (G + G.T) / 2, rank, exact=exact)
    L, _ = damped_cholesky(H, damp, where)
    return lowrank_from_input_cholesky(E, L, rank, exact=exact)


def _diagonal_scaled_lowrank(E: torch.Tensor, a: torch.Tensor, rank: int, exact: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of ``M = E · diag(a)`` through its smaller Gram: ``A = U_r Σ_r``, ``B = V_rᵀ diag(a)⁻¹``."""
    d_out, d_in = E.shape
    rank = min(rank, d_out, d_in)
    a = a.double()
    M = E.double() * a[None, :]
    if rank == 0:
        return E.new_zeros(d_out, 0), E.new_zeros(0, d_in)
    if d_out <= d_in:
        values, U = top_eigenpairs(M @ M.T, rank, exact=exact)
        sigma = values.sqrt()
        keep = _drop_null_directions(sigma)
        V_t = (U.T @ M) / torch.where(keep, sigma, torch.ones_like(sigma))[:, None] * keep[:, None]  # V_rᵀ
        return (U * (sigma * keep)).to(E.dtype), (V_t / a[None, :]).to(E.dtype)
    values, V = top_eigenpairs(M.T @ M, rank, exact=exact)
    V = V * _drop_null_directions(values.sqrt())[None, :]
    return (M @ V).to(E.dtype), (V.T / a[None, :]).to(E.dtype)


def lqer_lowrank(E: torch.Tensor, act_scale: torch.Tensor, rank: int, *, exact: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LQER: truncated SVD of ``E · diag(a)``, ``a`` a per-input-channel activation magnitude.

    ``A = U_r Σ_r``, ``B = V_rᵀ diag(a)⁻¹`` (the whitened fit with ``H = diag(a²)``, no
    damping). Channels with ``a = 0`` (never active) get the smallest positive magnitude so
    the scaling stays invertible.
    """
    a = act_scale.double().clone()
    positive = a[a > 0]
    a[a <= 0] = positive.min() if positive.numel() else 1.0
    return _diagonal_scaled_lowrank(E, a, rank, exact)


def svd_lowrank_plain(E: torch.Tensor, rank: int, *, exact: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ZeroQuant-V2 LoRC: truncated SVD of ``E`` itself, ``A = U_r Σ_r``, ``B = V_rᵀ``."""
    return _diagonal_scaled_lowrank(E, torch.ones(E.shape[1], dtype=torch.float64, device=E.device), rank, exact)
