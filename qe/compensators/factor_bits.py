"""Fits that account for the factors' own storage precision (``adapter_bits``).

A low-rank term ``A B`` stored in fewer bits is not the term that was fitted. The fit writes
``B`` first, reads back what was stored (``B_q``), and refits ``A`` to the stored ``B_q`` on the
same damped calibration objective; only then is ``A`` stored:

    A = argmin tr((E − A B_q) H_d (E − A B_q)ᵀ) = E H_d B_qᵀ (B_q H_d B_qᵀ)⁻¹.

So ``A`` absorbs ``B``'s rounding, and only ``A``'s own rounding is left. For the routed
experts ``H_d`` is each expert's damped token Gram; the router is refitted afterwards to the
residuals of the stored experts (qe.compensators.quant_experts).
"""

from __future__ import annotations

import torch

from qe.compensators.modules import FactorModule
from qe.gram import damped_times

# Ridge (relative to the mean diagonal) that keeps B_q H B_qᵀ invertible when B_q has zero
# rows (directions the fit dropped); far below any damping the fits use.
_RIDGE = 1e-9


def _solve_left(rhs: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``rhs · gram⁻¹`` for symmetric PSD ``gram`` (float64, a tiny ridge)."""
    g = gram.double().clone()
    n = g.shape[-1]
    if n == 0:
        return rhs.double()
    scale = g.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)
    g.diagonal(dim1=-2, dim2=-1).add_((_RIDGE * scale)[..., None] if g.dim() == 3 else _RIDGE * scale)
    return torch.linalg.solve(g, rhs.double().transpose(-1, -2)).transpose(-1, -2)


def refit_left(E: torch.Tensor, H: torch.Tensor | None, B_q: torch.Tensor, damp: float) -> torch.Tensor:
    """``A`` minimising ``tr((E − A B_q) H_d (E − A B_q)ᵀ)`` for fixed ``B_q`` (float32);
    ``H_d`` is ``H`` damped, or the identity without ``H``."""
    Bt = B_q.double().T
    HB = damped_times(H.to(E.device), Bt, damp) if H is not None else Bt  # (d_in, r)
    return _solve_left(E.double() @ HB, B_q.double() @ HB).float()


def store_pair(module: FactorModule, names: tuple[str, str], E: torch.Tensor, H: torch.Tensor | None,
               A: torch.Tensor, B: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Store the pair ``(A, B)`` under ``names`` in ``module``'s precision, ``A`` refitted to the
    stored ``B`` on ``H`` damped (plain least squares on ``E`` without ``H``); return what is stored."""
    name_a, name_b = names
    if module.adapter_bits == 32 or B.numel() == 0:
        return module.set_factor(name_a, A), module.set_factor(name_b, B)
    B_q = module.set_factor(name_b, B)
    A_q = module.set_factor(name_a, refit_left(E, H, B_q, damp))
    return A_q, B_q


def store_experts(module: FactorModule, E_S: torch.Tensor, X: torch.Tensor, assignment: torch.Tensor,
                  A: torch.Tensor, B: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Store routed experts ``A (N, d_out, r)``, ``B (N, r, d_in)``; each ``A_i`` refitted to the
    stored ``B_i`` on its tokens' damped Gram ``H_i = X_iᵀX_i + δ_i I`` (δ_i as in
    :func:`qe.compensators.quant_experts.fit_experts`), without forming ``H_i``."""
    if module.adapter_bits == 32 or B.numel() == 0:
        return module.set_factor("A", A), module.set_factor("B", B)
    B_q = module.set_factor("B", B)
    d_in = E_S.shape[1]
    A_new = A.clone()
    assignment = assignment.to(X.device)
    for i in range(A.shape[0]):
        Xi = X[assignment == i]
        if Xi.shape[0] == 0:
            continue
        delta = damp * float(Xi.double().pow(2).sum()) / d_in
        Bi = B_q[i].double()
        Z = Xi.double() @ Bi.T  # (T_i, r)
        gram = Z.T @ Z + delta * (Bi @ Bi.T)
        rhs = (Xi.double() @ E_S.double().T).T @ Z + delta * (E_S.double() @ Bi.T)  # E_S H_i B_iᵀ
        A_new[i] = _solve_left(rhs, gram).to(A.dtype)
    return module.set_factor("A", A_new), B_q
