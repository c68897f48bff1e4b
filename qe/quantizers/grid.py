"""Uniform quantization grids: weights (per tensor / channel / group) and activations.

Conventions (shared with :class:`qe.quantizers.base.QuantizedWeight` and the kernels):

* symmetric b-bit: ``q ∈ [-2^(b-1), 2^(b-1) - 1]`` with zero point ``2^(b-1)`` (stored as the
  unsigned code ``q + 2^(b-1)``) and ``scale = max(-min(w) / 2^(b-1), max(w) / (2^(b-1) - 1))``:
  the smallest step for which both ends of the row land on the grid, so the lowest level is
  used when the negative side dominates and no weight is ever clamped. Measured on the
  embedded default (RTN W4 per-channel, held-out perplexity, FP32 11.87): this grid 21.93;
  ``max|w| / (2^(b-1) - 1)`` (one level unused) 23.91; ``max|w| / (2^(b-1) - ½)`` (all
  levels, the largest weight clamped half a step, as compressed-tensors does) 23.40. It is
  also idempotent: quantizing the dequantized row again gives the same scale and codes;
* asymmetric b-bit: ``code ∈ [0, 2^b - 1]``, ``scale = (max - min) / (2^b - 1)`` over a range
  that always holds 0, ``zero = round(-min / scale)`` clamped to the code range;
* a group size that does not divide ``d_in`` leaves a shorter last group
  (``n_groups = ceil(d_in / group_size)``), as the reference GPTQ does;
* per tensor is one scale for the whole matrix, stored like per channel (every row holds
  the same scale), so one storage format serves all granularities.

Activations are quantized per token, dynamic and symmetric (``q ∈ [-qmax, qmax]``,
``qmax = 2^(b-1) - 1``), or with one static per-tensor scale calibrated from the streamed
absolute maxima; A16 means no activation quantization.
"""

from __future__ import annotations

import math

import torch

from qe.errors import ConfigError, NumericalError
from qe.gram import all_finite
from qe.quantized import QuantizedWeight, dequantize_codes, symmetric_scale

_EPS = 1e-12
WEIGHT_BITS = range(2, 9)


# --------------------------------------------------------------------------- checks


def num_groups(d_in: int, group_size: int) -> int:
    return 1 if group_size == 0 else math.ceil(d_in / group_size)


def _where(layer_name: str) -> str:
    return f" of {layer_name}" if layer_name else ""


def check_group_size(d_in: int, group_size: int, layer_name: str = "") -> None:
    """``group_size`` must be 0 (per channel) or in ``1..d_in``."""
    if group_size < 0 or group_size > d_in:
        raise ConfigError(
            f"group size {group_size} is outside 1..{d_in} (the input width{_where(layer_name)}); use 0 for per channel"
        )


def check_weight_bits(bits: int, layer_name: str = "") -> None:
    if bits not in WEIGHT_BITS:
        raise ConfigError(f"{bits}-bit weights{_where(layer_name)} are unsupported: use 2 to 8 bits")


def check_finite(t: torch.Tensor, what: str, layer_name: str = "") -> None:
    """Raise :class:`NumericalError` if ``t`` holds NaN or Inf."""
    if not all_finite(t):
        raise NumericalError(
            f"NaN or Inf in the {what}{_where(layer_name)}: check the model's dtype and the calibration data"
        )


# --------------------------------------------------------------------------- weight grids


def grid_params(
    w: torch.Tensor, bits: int, symmetric: bool, clip: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of ``w`` ``(rows, cols)`` → ``(rows,)`` each.

    ``clip`` shrinks the range (a scalar or one ratio per row).
    """
    w = w.float()
    if symmetric:
        # The smallest step that puts both ends on the grid: -half·s ≤ min(w), max(w) ≤ (half-1)·s.
        clip_col = clip[:, None] if isinstance(clip, torch.Tensor) and clip.dim() == 1 else clip
        scale = symmetric_scale(w, bits, dim=1, clip=clip_col)[:, 0]
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        levels = 2**bits - 1
        wmin = (w.amin(dim=1) * clip).clamp(max=0)
        wmax = (w.amax(dim=1) * clip).clamp(min=0)
        scale = ((wmax - wmin) / levels).clamp_min(_EPS)
        zero = (-wmin / scale).round().clamp(0, levels)
    return scale, zero


def quantize_to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``w`` onto the grid: codes in ``[0, 2^b)`` (float tensor of integers)."""
    return (w / scale + zero).round().clamp(0, 2**bits - 1)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return dequantize_codes(quantize_to_codes(w, scale, zero, bits), scale, zero)


def mse_clip_ratio(w: torch.Tensor, bits: int, symmetric: bool, grid: tuple[float, ...]) -> torch.Tensor:
    """Per-row clip ratio from ``grid`` minimising the rounding MSE of each row (ties keep the earlier ratio)."""
    w = w.float()
    best_err = torch.full((w.shape[0],), float("inf"), device=w.device)
    best = torch.ones(w.shape[0], device=w.device)
    for ratio in grid:
        scale, zero = grid_params(w, bits, symmetric, ratio)
        err = (fake_quantize(w, scale[:, None], zero[:, None], bits) - w).pow(2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, ratio), best)
    return best


def group_params(
    w: torch.Tensor, bits: int, symmetric: bool, group_size: int, clip_grid: tuple[float, ...] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points of ``w`` ``(d_out, d_in)`` per row and group → ``(d_out, n_groups)`` each.

    Full groups are handled in one batched call; a shorter last group separately.
    """
    d_out, d_in = w.shape
    g = d_in if group_size == 0 else group_size
    n_full, tail = divmod(d_in, g)

    def params(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        clip = mse_clip_ratio(rows, bits, symmetric, clip_grid) if clip_grid else 1.0
        return grid_params(rows, bits, symmetric, clip)

    scales, zeros = [], []
    if n_full:
        s, z = params(w[:, : n_full * g].reshape(d_out * n_full, g))  # row-major: (o, group) pairs
        scales.append(s.reshape(d_out, n_full))
        zeros.append(z.reshape(d_out, n_full))
    if tail:
        s, z = params(w[:, n_full * g :])
        scales.append(s[:, None])
        zeros.append(z[:, None])
    return torch.cat(scales, 1), torch.cat(zeros, 1)


def column_groups(d_in: int, group_size: int, device=None) -> torch.Tensor:
    """``(d_in,)`` group index of each input column."""
    g = d_in if group_size == 0 else group_size
    return torch.arange(d_in, device=device) // g


def quantize_rtn(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    exempt: torch.Tensor | None = None,
    clip_grid: tuple[float, ...] | None = None,
    layer_name: str = "",
) -> QuantizedWeight:
    """Round-to-nearest quantization of ``weight`` ``(d_out, d_in)``.

    Exempt columns take no part in the grid (they do not set any range) and come out zero,
    with the zero point as their code.
    """
    check_weight_bits(bits, layer_name)
    w = weight.detach().float()
    d_out, d_in = w.shape
    check_group_size(d_in, group_size, layer_name)
    check_finite(w, "weight", layer_name)
    if exempt is not None:
        exempt = exempt.to(device=w.device, dtype=torch.bool)
        w = w.clone()
        w[:, exempt] = 0.0  # zero columns never widen a range: max|w| and min/max ignore them
    scales, zeros = group_params(w, bits, symmetric, group_size, clip_grid)
    g_of = column_groups(d_in, group_size, w.device)
    codes = quantize_to_codes(w, scales[:, g_of], zeros[:, g_of], bits)
    if exempt is not None:
        codes[:, exempt] = zeros[:, g_of[exempt]]
    return QuantizedWeight(codes.to(torch.uint8), scales, zeros, bits, group_size, symmetric, exempt)


def quantize_rtn_per_tensor(
    weight: torch.Tensor,
    bits: int,
    symmetric: bool,
    exempt: torch.Tensor | None = None,
    layer_name: str = "",
) -> QuantizedWeight:
    """Round-to-nearest with one scale (and zero point) for the whole matrix.

    Stored as per channel (``group_size == 0``) with every row holding the same parameters.
    """
    check_weight_bits(bits, layer_name)
    w = weight.detach().float()
    check_finite(w, "weight", layer_name)
    if exempt is not None:
        exempt = exempt.to(device=w.device, dtype=torch.bool)
        w = w.clone()
        w[:, exempt] = 0.0
    scale, zero = grid_params(w.reshape(1, -1), bits, symmetric)
    d_out = w.shape[0]
    scales, zeros = scale.expand(d_out, 1).clone(), zero.expand(d_out, 1).clone()
    codes = quantize_to_codes(w, scales, zeros, bits)
    if exempt is not None:
        codes[:, exempt] = zeros[:, :1]
    return QuantizedWeight(codes.to(torch.uint8), scales, zeros, bits, 0, symmetric, exempt)


# --------------------------------------------------------------------------- activations


def static_activation_scale(
    absmax: torch.Tensor, bits: int, act_exempt: torch.Tensor | None = None
) -> torch.Tensor:
    """One per-tensor activation scale ``max_c absmax_c / qmax`` from the streamed per-channel
    absolute maxima (exempt channels, zeroed before quantization, do not count)."""
    if bits >= 16:
        raise ConfigError("a static activation scale needs activation bits 4 to 8; A16 keeps activations unquantized")
    a = absmax.float()
    if act_exempt is not None:
        a = a.masked_fill(act_exempt.to(a.device), 0.0)
    qmax = 2 ** (bits - 1) - 1
    return (a.max() / qmax).clamp_min(_EPS)
