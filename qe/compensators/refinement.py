"""Optional layer-wise refinement of QE's routed experts and router (docs/method.md, refinement).

Starting from the closed-form fit, AdamW trains only the routed experts ``A_i, B_i`` and the
router ``R`` on the layer's calibration token sample, with a cosine learning-rate schedule
over the paper's 16 epochs × 100 iterations. The loss has two terms:

* **regression**: ``Σ_t ‖E_S x̃_t − A_{i*} B_{i*} x̃_t‖²`` with ``i* = argmin_i (R|x̃_t|)_i``,
  the router's own top-1 choice as deployed, divided by ``Σ_t ‖E_S x̃_t‖²`` of the batch.
  The target is the weight-error part of the output (``E_S x̃``: the layer's output that the
  quantized base and the shared expert leave), the same objective as the closed-form fit;
  fitting the output residual with activation-quantization error in it did not help on
  held-out tokens (1–5% worse at one layer).
* **router**: ``KL(q_t ‖ p_t)`` between the distribution implied by the true residuals,
  ``q_t = softmax(−e_t / τ)`` with ``e_{t,i} = ‖(E_S − A_i B_i) x̃_t‖`` under the current
  experts (no gradient), and the router's, ``p_t = softmax(−R|x̃_t| / τ)``. One temperature per
  layer, ``τ = temperature · mean_t std_i(e_{t,i})``, in the residuals' own units. A per-token
  temperature (``std_i e_{t,i}`` of each token) was tried first and made the router worse on
  the residual objective in every trial (planted synthetic layers, two seeds, six settings):
  it gives tokens whose experts are nearly tied, where the choice costs nothing, the sharpest
  targets and the largest gradients.

Learning rates are relative: Adam moves every element by about ``lr`` per step whatever its
size, so each tensor's rate is ``lr`` times its root mean square, after the experts' factors
are balanced (:func:`balanced`). The paper's 1e-4 is absolute, in units not known here.
Measured on SmolLM2-135M block 12 (q, gate, down; W4, α = 0.5, 16k calibration and 4k held-out
tokens), held-out A6 error against the closed-form fit: relative lr 1e-4 → 0.996–0.999,
1e-3 → 0.98–0.99, 1e-2 → 0.93–0.98, 3e-2 → 0.91–0.97, 1e-1 → 0.91–0.97; the default is 3e-2.

The refined factors are kept only if they lower the calibration residual objective under
the router's choice (the figure ``residual_router`` of the fit); otherwise the closed-form
ones stay, and ``refine_kept`` says so. Everything runs in float32 on the sample's device,
with a seeded generator for the batch order, so a run repeats exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Floor of the temperature, relative to the mean residual norm, for a layer whose
# experts leave (almost) the same residual.
_MIN_RELATIVE_SPREAD = 1e-4


@dataclass(frozen=True)
class RefineSchedule:
    epochs: int = 16
    iterations: int = 100  # per epoch: the batch holds ceil(T / iterations) tokens
    lr: float = 3e-2  # relative (module doc)
    kl_weight: float = 1.0
    temperature: float = 1.0
    seed: int = 0


@dataclass
class Refined:
    A: torch.Tensor  # (N, d_out, r)
    B: torch.Tensor  # (N, r, d_in)
    R: torch.Tensor  # (N, d_in)
    first_loss: float
    last_loss: float


def refine_experts(
    X: torch.Tensor,
    Y: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    R: torch.Tensor,
    schedule: RefineSchedule,
    routed_sq: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Refined:
    """Train ``A (N, d_out, r)``, ``B (N, r, d_in)``, ``R (N, d_in)`` on tokens ``X (T, d_in)``
    whose targets are ``Y = X E_Sᵀ`` ``(T, d_out)``; returns new tensors (inputs untouched).
    ``routed_sq(A, B)`` gives every expert's squared residual ``e²`` ``(T, N)`` on these tokens
    (QE's ``_Residuals.routed_sq``).

    The router's target distributions are recomputed from the current experts at the start of
    every epoch (every expert's residual on every token, in large products), not per batch.
    The gradients are written out (a few products per expert, see :func:`_loss_and_grads`):
    for q's 16 epochs that ran in 9.8 s against autograd's 11.3 s (one ad-hoc timing). AdamW
    keeps torch's other defaults. ``first_loss`` / ``last_loss`` are the mean loss of the first
    and the last epoch.
    """
    T = X.shape[0]
    params = [*balanced(A.detach().float(), B.detach().float()), R.detach().float().clone()]
    steps = schedule.epochs * schedule.iterations
    batch = max(1, math.ceil(T / schedule.iterations))
    # Relative rates (module doc): the router's weights are ~1e-2, the experts' 1e-3 to 1.
    groups = [{"params": [p], "lr": schedule.lr * _rms(p)} for p in params]
    opt = torch.optim.AdamW(groups, lr=schedule.lr, foreach=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    gen = torch.Generator().manual_seed(schedule.seed)
    X, Y = X.float(), Y.float()
    F = X.abs()  # router features
    first = last = float("nan")
    for epoch in range(schedule.epochs):
        e = routed_sq(params[0], params[1]).sqrt().to(X.dtype)
        tau = layer_temperature(e, schedule.temperature)
        target = torch.softmax(-e / tau, dim=1)
        order = torch.randperm(T, generator=gen).to(X.device)
        # One gather per epoch, so that every batch is a contiguous slice.
        x_ep, y_ep, f_ep, q_ep = X[order], Y[order], F[order], target[order]
        total = 0.0
        for it in range(schedule.iterations):
            s = slice(it * batch, (it + 1) * batch)
            if s.start >= T:
                break
            loss, grads = _loss_and_grads(x_ep[s], y_ep[s], f_ep[s], q_ep[s], tau, *params, schedule.kl_weight)
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            sched.step()
            total += loss * x_ep[s].shape[0]
        last = total / T
        if epoch == 0:
            first = last
    return Refined(*params, first, last)


def balanced(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of ``A (N, d_out, r)``, ``B (N, r, d_in)`` with the same products ``A_i B_i``
    and, per rank-one term, ``‖A_i[:, j]‖ = ‖B_i[j, :]‖``: the closed-form fit puts the whole
    scale in ``B``, which a per-tensor learning rate would then move far too fast for ``A``."""
    a = A.norm(dim=1)  # (N, r)
    b = B.norm(dim=2)  # (N, r)
    live = (a > 0) & (b > 0)
    c = torch.where(live, (b / torch.where(live, a, torch.ones_like(a))).sqrt(), torch.ones_like(a))
    return A * c[:, None, :], B / c[:, :, None]


def _rms(t: torch.Tensor) -> float:
    value = float(t.pow(2).mean().sqrt()) if t.numel() else 0.0
    return value if value > 0 else 1.0


def layer_temperature(e: torch.Tensor, temperature: float) -> float:
    """``temperature · mean_t std_i(e_{t,i})`` for residual norms ``e`` ``(T, N)``, floored at
    ``1e-4 · mean(e)`` (experts that leave the same residual everywhere)."""
    spread = float(e.std(dim=1, correction=0).mean()) if e.numel() else 0.0
    floor = _MIN_RELATIVE_SPREAD * float(e.mean()) if e.numel() else 0.0
    return temperature * max(spread, floor, torch.finfo(e.dtype).tiny)


def _loss_and_grads(x, y, f, target, tau: float, A, B, R, kl_weight: float):
    """Loss of one batch and its gradients with respect to ``A``, ``B``, ``R``.

    Tokens are sorted by the router's choice, so each expert with tokens works on a contiguous
    slice: one small product per term, no padding (a zero-padded batched version ran slower
    with unequal groups). With ``Z_i = X_i B_iᵀ``, ``Res_i = Y_i − Z_i A_iᵀ`` and ``S = Σ‖y‖²``:
    ``∂/∂A_i = −2/S · Res_iᵀ Z_i``, ``∂/∂B_i = −2/S · (Res_i A_i)ᵀ X_i``; for the KL with logits
    ``−F Rᵀ/τ``: ``∂/∂R = −((p − q)/(b·τ))ᵀ F``.
    """
    b = x.shape[0]
    N = A.shape[0]
    logits = -(f @ R.T) / tau
    log_p = torch.log_softmax(logits, dim=1)
    kl = float((target * (target.clamp_min(torch.finfo(target.dtype).tiny).log() - log_p)).sum() / b)
    grad_R = ((target - log_p.exp()) / (b * tau)).T @ f * kl_weight

    choice = logits.argmax(dim=1)
    order = torch.argsort(choice, stable=True)
    counts = torch.bincount(choice, minlength=N).tolist()
    x, y = x[order], y[order]
    S = float(y.pow(2).sum()) or torch.finfo(y.dtype).tiny
    regression = 0.0
    grad_A, grad_B = torch.zeros_like(A), torch.zeros_like(B)
    start = 0
    for i, count in enumerate(counts):
        if not count:
            continue
        xi, yi = x[start : start + count], y[start : start + count]
        start += count
        Z = xi @ B[i].T  # (m, r)
        Res = yi - Z @ A[i].T  # (m, d_out)
        regression += float(Res.pow(2).sum())
        grad_A[i] = (Res.T @ Z) * (-2 / S)
        grad_B[i] = ((Res @ A[i]).T @ xi) * (-2 / S)
    return regression / S + kl_weight * kl, (grad_A, grad_B, grad_R)
