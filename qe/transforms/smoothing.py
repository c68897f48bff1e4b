"""The smoothing transform shared by SmoothQuant-style quantization and QE's planning step.

Per smoothing group (the linears that read one input, e.g. q/k/v after the input norm), one
scale vector ``s`` (``d_in``) moves activation outliers into the weights (docs/method.md, smoothing):

    s_j = max|X_j|^α / max_{linears, o} |W[o, j]|^(1−α)
    W̃ = W · diag(s)          x̃ = x / s          H̃ = diag(1/s) H diag(1/s)

so ``x̃ W̃ᵀ = x Wᵀ`` in full precision. ``1/s`` is folded into the preceding norm where there
is one (:func:`fold_into_norm`), else kept as an explicit per-channel input scale.

``α = None`` means no smoothing (``s ≡ 1``); ``α = 0`` is *not* that: it gives
``s_j = 1 / max|W_{:,j}|``. :func:`choose_alpha` picks α per group from candidates by the
group's relative output error on calibration tokens, given a caller's weight-quantization
function, so it knows nothing of which quantizer or compensator is used.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from qe.errors import ConfigError, NumericalError
from qe.gram import mirror_upper_in_place
from qe.quantized import fake_quantize_activations

SCALE_RANGE = (1e-5, 1e5)  # s is clamped to this range so no channel is scaled to 0 or ∞

# quantize_fn(weight_smoothed (d_out, d_in), hessian_smoothed (d_in, d_in) | None, exempt (d_in,) | None)
#   -> dequantized weight (d_out, d_in)
QuantizeFn = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]
# The same, returning a dequantized tensor or an object with ``.dequantize()`` (a QuantizedWeight)
QuantizeAny = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], Any]


# --------------------------------------------------------------------------- the transform


def smoothing_scales(act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float | None) -> torch.Tensor:
    """``(d_in,)`` float32 scales ``s_j = max|X_j|^α / max|W_{:,j}|^(1−α)`` over the group's weights.

    ``alpha=None`` gives ones (no smoothing). Channels whose activation or weight maximum is 0
    get ``s = 1``; the rest are clamped to :data:`SCALE_RANGE`.
    """
    d_in = act_absmax.shape[0]
    if alpha is None:
        return torch.ones(d_in, device=act_absmax.device)
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"smoothing alpha {alpha} is outside 0..1 (None means no smoothing)")
    if not weights:
        raise ConfigError("smoothing needs at least one weight in the group")
    for w in weights:
        if w.shape[1] != d_in:
            raise ConfigError(f"a weight of the smoothing group has {w.shape[1]} input columns; the activations have {d_in}")
    a = act_absmax.detach().double().abs()
    w_max = torch.stack([w.detach().abs().amax(0).to(a) for w in weights]).amax(0)  # (d_in,)
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(w_max).all())):
        raise NumericalError("NaN or Inf in the activation maxima or weights given to smoothing: check the model's dtype")
    s = a.pow(alpha) / w_max.pow(1.0 - alpha)
    s = s.clamp(*SCALE_RANGE)
    s = torch.where((a > 0) & (w_max > 0), s, torch.ones_like(s))
    return s.float()


def smooth_weight(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``W̃ = W · diag(s)``: ``(d_out, d_in)``."""
    return weight * s.to(weight)[None, :]


def smooth_tokens(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``x̃ = x / s`` (``(..., d_in)``)."""
    return x / s.to(x)


def smooth_hessian(hessian: torch.Tensor, s: torch.Tensor, *, in_place: bool = False) -> torch.Tensor:
    """``H̃ = diag(1/s) H diag(1/s)`` for ``x̃ = x / s`` (``(d_in, d_in)``, H's dtype); with
    ``in_place``, written over ``hessian`` (the same values, no new ``d × d`` matrix)."""
    s = s.to(hessian)
    # Two divisions, not an outer product of s: one d × d allocation at most, not two; the
    # order of the divisions differs across the diagonal, so the upper triangle is mirrored to
    # keep the result exactly symmetric.
    out = hessian.div_(s[:, None]) if in_place else hessian / s[:, None]
    return mirror_upper_in_place(out.div_(s[None, :]))


# --------------------------------------------------------------------------- folding

_warned_norms: set[str] = set()


def _candidate_kinds(norm: nn.Module) -> list[str]:
    """Ways the norm may apply its weight, most likely first: ``"layernorm"`` (weight and bias),
    ``"rms"`` (``x̂ · w``), ``"gemma"`` (``x̂ · (1 + w)``). Empty when it has no per-channel weight."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return []
    cls = type(norm).__name__
    if isinstance(norm, nn.LayerNorm):
        return ["layernorm"]
    if isinstance(norm, nn.RMSNorm) or "RMSNorm" in cls:
        # Gemma's norms scale by (1 + w), but not all of them (Gemma3n's scale by w): the probe decides.
        return ["gemma", "rms"] if "Gemma" in cls else ["rms", "gemma"]
    return []


def fold_into_norm(norm: nn.Module, s: torch.Tensor) -> bool:
    """Divide the norm's output by ``s`` in place, so it produces ``x̃ = x / s``.

    Handles ``nn.LayerNorm`` (weight and bias), RMSNorm-style modules with ``x̂ · weight``
    (``nn.RMSNorm``, Llama/Qwen2/SmolLM ``*RMSNorm``) and Gemma's ``x̂ · (1 + weight)``. Each fold
    is checked on a probe input (``norm(probe)`` must become ``norm(probe) / s``). A norm of
    another kind, or one no fold passes the check for, is left unchanged and False is returned
    (with one warning per norm class): the caller then keeps an explicit input scale instead.
    """
    cls = type(norm).__name__
    kinds = _candidate_kinds(norm)
    if not kinds:
        _warn_once(cls, f"cannot fold smoothing scales into {cls} (an unknown norm kind); keeping an explicit input scale")
        return False
    weight: torch.Tensor = norm.weight
    s32 = s.detach().float().to(weight.device)
    if s32.shape != weight.shape:
        raise ConfigError(f"smoothing scales of length {s32.numel()} do not fit {cls} of width {weight.numel()}")
    bias = getattr(norm, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) and kinds == ["layernorm"] else None
    saved_weight = weight.detach().clone()
    saved_bias = bias.detach().clone() if bias is not None else None
    probe = torch.randn(4, weight.numel(), generator=torch.Generator().manual_seed(0)).to(weight)
    tol = 1e-4 if weight.dtype in (torch.float32, torch.float64) else 2e-2
    with torch.no_grad():
        expected = norm(probe).float() / s32
        for kind in kinds:
            if kind == "gemma":
                weight.copy_(((1.0 + saved_weight.float()) / s32 - 1.0).to(weight.dtype))
            else:
                weight.copy_((saved_weight.float() / s32).to(weight.dtype))
            if bias is not None:
                bias.copy_((saved_bias.float() / s32).to(bias.dtype))
            after = norm(probe).float()
            if torch.allclose(after, expected, rtol=tol, atol=tol * float(expected.abs().max().clamp_min(1e-30))):
                return True
            weight.copy_(saved_weight)  # this is not how the module applies its weight: undo
            if bias is not None:
                bias.copy_(saved_bias)
    _warn_once(cls, f"folding smoothing scales into {cls} did not give x/s on a probe input; keeping an explicit input scale")
    return False


def _warn_once(key: str, message: str) -> None:
    if key not in _warned_norms:
        _warned_norms.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------- choosing α


Masks = "torch.Tensor | Sequence[torch.Tensor | None] | None"  # one (d_in,) mask for the group, or one per weight


def _per_weight(masks, n: int) -> list:
    if masks is None or isinstance(masks, torch.Tensor):
        return [masks] * n
    masks = list(masks)
    if len(masks) != n:
        raise ConfigError(f"{len(masks)} exemption masks for {n} weights: give one mask, or one per weight")
    return masks


def relative_group_error(
    tokens: torch.Tensor,
    weights: Sequence[torch.Tensor],
    dequantized: Sequence[torch.Tensor],
    s: torch.Tensor,
    a_bits: int,
    exempt: Masks = None,
    act_exempt: Masks = None,
    token_weights: torch.Tensor | None = None,
    references: Sequence[torch.Tensor] | None = None,
) -> float:
    """``Σ_i ‖X W_iᵀ − Ŷ_i‖² / Σ_i ‖X W_iᵀ‖²`` on ``tokens`` ``X`` ``(S, d_in)``; with
    ``token_weights`` ``(S,)`` each token's squared errors (and norms) count that many times.
    ``references`` may hold the ``X W_iᵀ`` already computed (they do not depend on α).

    ``Ŷ_i = Q_a(x̃ ⊙ keep_i) Ŵ_iᵀ + x̃_{E_i} W̃_{i,E_i}ᵀ``: the quantized path reads the
    per-token quantized ``x̃`` with linear ``i``'s activation-exempt channels zeroed, and the
    columns ``E_i`` it leaves out (weight- or activation-exempt) are added exactly, as a
    compensator absorbs them, so the figure measures what the quantized path gets wrong.
    ``exempt`` / ``act_exempt``: one mask for every weight, or a sequence of one per weight
    (QE's exempt channels differ between the linears of a group).
    """
    x = tokens.float()
    xs = smooth_tokens(x, s)  # (S, d_in)
    n = len(weights)
    tw = torch.ones(x.shape[0], dtype=torch.float64, device=x.device) if token_weights is None else token_weights.double().to(x.device)
    xq_by_mask: dict[int, torch.Tensor] = {}  # linears sharing an activation mask share Q_a(x̃)
    num = den = 0.0
    for i, (w, w_hat, ex, act_ex) in enumerate(zip(weights, dequantized, _per_weight(exempt, n), _per_weight(act_exempt, n))):
        left_out = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
        for mask in (ex, act_ex):
            if mask is not None:
                left_out |= mask.to(device=x.device, dtype=torch.bool)
        if id(act_ex) not in xq_by_mask:
            xq_in = xs if act_ex is None else xs.masked_fill(act_ex.to(x.device, torch.bool), 0.0)
            xq_by_mask[id(act_ex)] = fake_quantize_activations(xq_in, a_bits)
        xq = xq_by_mask[id(act_ex)]
        w = w.float()
        y = x @ w.T if references is None else references[i]  # (S, d_out)
        w_hat = w_hat.float().masked_fill(left_out[None, :], 0.0)
        y_hat = xq @ w_hat.T
        if bool(left_out.any()):
            y_hat = y_hat + xs[:, left_out] @ smooth_weight(w, s)[:, left_out].T
        num += float(tw @ (y - y_hat).double().pow(2).sum(1))
        den += float(tw @ y.double().pow(2).sum(1))
    return num / max(den, 1e-30)


def _spending_last(fns: list, last_spending) -> list:
    """``fns`` with the last replaced by ``last_spending`` (when given): the last weight's
    quantization is the last use of a candidate's smoothed Hessian."""
    return fns if last_spending is None or not fns else [*fns[:-1], last_spending]


class AlphaChoice(NamedTuple):
    alpha: float | None
    errors: dict  # {candidate α: relative group error}, in candidate order
    quantized: list  # what quantize_fn returned for each weight at the chosen α


def choose_alpha(
    candidates: Sequence[float | None],
    act_absmax: torch.Tensor,
    weights: Sequence[torch.Tensor],
    tokens: torch.Tensor,
    quantize_fn: QuantizeAny | Sequence[QuantizeAny],
    a_bits: int,
    *,
    hessian: torch.Tensor | None = None,
    exempt: Masks = None,
    act_exempt: Masks = None,
    max_tokens: int | None = None,
    last_spending: QuantizeAny | None = None,
) -> AlphaChoice:
    """Pick the smoothing α of one group by its relative output error on calibration tokens.

    For each candidate (``None`` = no smoothing): ``s`` from :func:`smoothing_scales`, each
    linear's ``W̃`` quantized by ``quantize_fn(W̃, H̃, exempt)`` (one function for all weights,
    or one per weight, e.g. to name the layer; ``H̃`` is None when no ``hessian`` is given;
    ``exempt`` is that weight's mask where one per weight is given),
    activations quantized per token at ``a_bits``, and the error of
    :func:`relative_group_error` on the first ``max_tokens`` rows of ``tokens`` ``(S, d_in)``
    (original, unsmoothed basis). ``quantize_fn`` returns a dequantized weight or an object
    with ``.dequantize()``; the chosen candidate's returns come back in ``quantized``, so a
    caller need not quantize the chosen ``W̃`` again (a GPTQ run per linear saved). Ties keep
    the earlier candidate. ``last_spending``: the last weight's quantization, given the
    candidate's ``H̃`` at its last use, which it may overwrite (the same result as its
    ``quantize_fn``, without a copy of ``H̃``).
    """
    if not candidates:
        raise ConfigError("choose_alpha needs at least one candidate (None means no smoothing)")
    if tokens.dim() != 2 or tokens.shape[0] == 0:
        raise ConfigError("choose_alpha needs a non-empty (tokens, d_in) sample of calibration inputs")
    fns = list(quantize_fn) if isinstance(quantize_fn, Sequence) else [quantize_fn] * len(weights)
    if len(fns) != len(weights):
        raise ConfigError(f"choose_alpha got {len(fns)} quantize functions for {len(weights)} weights: give one, or one per weight")
    x = tokens if max_tokens is None else tokens[:max_tokens]
    x = x.float()
    references = [x @ w.float().T for w in weights]  # the same for every candidate
    errors: dict[float | None, float] = {}
    best: AlphaChoice | None = None
    for alpha in candidates:
        s = smoothing_scales(act_absmax, weights, alpha)
        h = None  # the previous candidate's d × d Hessian goes before the next is made
        h = smooth_hessian(hessian, s) if hessian is not None else None
        quantized = [fn(smooth_weight(w.float(), s), h, ex)
                     for fn, w, ex in zip(_spending_last(fns, last_spending), weights, _per_weight(exempt, len(weights)))]
        dequantized = [q if isinstance(q, torch.Tensor) else q.dequantize(torch.float32) for q in quantized]
        errors[alpha] = relative_group_error(x, weights, dequantized, s, a_bits, exempt, act_exempt,
                                             references=references)
        if best is None or errors[alpha] < errors[best.alpha]:  # strict: ties keep the earlier
            best = AlphaChoice(alpha, errors, quantized)
    return best


# --------------------------------------------------------------------------- AWQ-style search


def activation_scales(act_meanabs: torch.Tensor, ratio: float) -> torch.Tensor:
    """AWQ's scale family: ``s_j = mean|X_j|^ratio``, normalised so ``max(s)·min(s) = 1``.

    ``ratio = 0`` gives ``s ≡ 1`` (no smoothing). Channels that never fire are floored at
    ``1e-4`` of the largest mean before the power, so no scale is 0.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"AWQ ratio {ratio} is outside 0..1")
    m = act_meanabs.detach().double().abs()
    m = m.clamp_min(1e-4 * float(m.max().clamp_min(1e-30)))
    s = m.pow(ratio)
    s = s / (s.max() * s.min()).sqrt()
    return s.clamp(*SCALE_RANGE).float()


def search_activation_scales(
    weights: Sequence[torch.Tensor],
    tokens: torch.Tensor,
    quantize_fn: QuantizeFn,
    a_bits: int,
    *,
    grid: int = 20,
    hessian: torch.Tensor | None = None,
    exempt: torch.Tensor | None = None,
    act_exempt: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    last_spending: QuantizeFn | None = None,
) -> tuple[torch.Tensor, float, dict[float, float]]:
    """AWQ-style search over ``s = mean|X|^r`` (``r = 0, 1/grid, …, (grid−1)/grid``) of one
    smoothing group, by the group's (token-weighted) relative output error on ``tokens``.

    ``token_weights`` ``(S,)`` weigh each token's error, e.g. by modality as MBQ does.
    Returns ``(s, best r, {r: error})``; ``r = 0`` is no smoothing, and ties keep the smaller r.
    ``last_spending``: as in :func:`choose_alpha`.
    """
    if grid < 1:
        raise ConfigError(f"the AWQ grid needs at least one point, got {grid}")
    if tokens.dim() != 2 or tokens.shape[0] == 0:
        raise ConfigError("the AWQ search needs a non-empty (tokens, d_in) sample of calibration inputs")
    act_meanabs = tokens.float().abs().mean(0)
    errors: dict[float, float] = {}
    best_s, best_r = None, 0.0
    for k in range(grid):
        r = k / grid
        s = activation_scales(act_meanabs, r)
        h = None  # the previous ratio's d × d Hessian goes before the next is made
        h = smooth_hessian(hessian, s) if hessian is not None else None
        fns = _spending_last([quantize_fn] * len(weights), last_spending)
        dequantized = [fn(smooth_weight(w.float(), s), h, exempt) for fn, w in zip(fns, weights)]
        errors[r] = relative_group_error(tokens, weights, dequantized, s, a_bits, exempt, act_exempt, token_weights)
        if best_s is None or errors[r] < errors[best_r]:
            best_s, best_r = s, r
    return best_s, best_r, errors
