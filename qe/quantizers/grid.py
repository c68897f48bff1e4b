"""Uniform quantization grids: weights (per tensor / channel / group) and activations.

Conventions (shared with :class:`qe.quantizers.base.QuantizedWeight` and the kernels):

* symmetric b-bit: ``q ∈ [-2^(b-1), 2^(b-1) - 1]``, ``scale = max|w| / (2^(b-1) - 1)``,
  stored as the unsigned code ``q + 2^(b-1)`` with zero point ``2^(b-1)``;
* asymmetric b-bit: ``code ∈ [0, 2^b - 1]``, ``scale = (max - min) / (2^b - 1)``,
  ``zero = round(-min / scale)`` clamped to the code range;
* a group size that does not divide ``d_in`` leaves a shorter last group.
"""

from __future__ import annotations

import math

import torch

from qe.errors import ConfigError
from qe.quantizers.base import QuantizedWeight

_EPS = 1e-12


def num_groups(d_in: int, group_size: int) -> int:
    return 1 if group_size == 0 else math.ceil(d_in / group_size)


def check_group_size(d_in: int, group_size: int, layer_name: str = "") -> None:
    if group_size < 0 or group_size > d_in:
        where = f" of {layer_name}" if layer_name else ""
        raise ConfigError(f"group size {group_size} is outside 1..{d_in} (the input width{where}); use 0 for per channel")


def grid_params(
    w: torch.Tensor, bits: int, symmetric: bool, clip: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of ``w`` ``(rows, cols)`` → ``(rows,)`` each.

    ``clip`` shrinks the range (a scalar or one ratio per row).
    """
    w = w.float()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = w.abs().amax(dim=1) * clip
        scale = (amax / qmax).clamp_min(_EPS)
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


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (codes - zero) * scale


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return dequantize_codes(quantize_to_codes(w, scale, zero, bits), scale, zero)


def _group_views(d_in: int, group_size: int) -> list[slice]:
    g = d_in if group_size == 0 else group_size
    return [slice(s, min(s + g, d_in)) for s in range(0, d_in, g)]


def mse_clip_ratio(w: torch.Tensor, bits: int, symmetric: bool, grid: tuple[float, ...]) -> torch.Tensor:
    """Per-row clip ratio from ``grid`` minimising the rounding MSE of each row."""
    best_err = torch.full((w.shape[0],), float("inf"))
    best = torch.ones(w.shape[0])
    for ratio in grid:
        scale, zero = grid_params(w, bits, symmetric, ratio)
        err = (fake_quantize(w, scale[:, None], zero[:, None], bits) - w).pow(2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, ratio), best)
    return best


def quantize_rtn(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    exempt: torch.Tensor | None = None,
    clip_grid: tuple[float, ...] | None = None,
) -> QuantizedWeight:
    """Round-to-nearest quantization of ``weight`` ``(d_out, d_in)``.

    Exempt columns take no part in the grid (they do not set any range) and come out zero.
    """
    w = weight.detach().float()
    d_out, d_in = w.shape
    check_group_size(d_in, group_size)
    if exempt is not None:
        w = w.clone()
        w[:, exempt] = 0.0  # zero columns never widen a range: max|w| and min/max ignore them
    n_g = num_groups(d_in, group_size)
    codes = torch.empty(d_out, d_in, dtype=torch.uint8)
    scales = torch.empty(d_out, n_g)
    zeros = torch.empty(d_out, n_g)
    for gi, cols in enumerate(_group_views(d_in, group_size)):
        wg = w[:, cols]
        clip = mse_clip_ratio(wg, bits, symmetric, clip_grid) if clip_grid else 1.0
        scale, zero = grid_params(wg, bits, symmetric, clip)
        codes[:, cols] = quantize_to_codes(wg, scale[:, None], zero[:, None], bits).to(torch.uint8)
        scales[:, gi], zeros[:, gi] = scale, zero
    if exempt is not None:
        g_of = torch.arange(d_in) // (d_in if group_size == 0 else group_size)
        codes[:, exempt] = zeros[:, g_of[exempt]].to(torch.uint8)
    return QuantizedWeight(codes, scales, zeros, bits, group_size, symmetric, exempt)


# --------------------------------------------------------------------------- activations


def quantize_activations_per_token(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic symmetric quantization: integer codes ``q ∈ [-qmax, qmax]`` and
    per-token scales (``x ≈ q * scale``), ``qmax = 2^(b-1) - 1``."""
    qmax = 2 ** (bits - 1) - 1
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / qmax).clamp_min(_EPS)
    q = (x.float() / scale).round().clamp(-qmax, qmax)
    return q, scale


def fake_quantize_activations(x: torch.Tensor, bits: int, static_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize activations; A16 (bits ≥ 16) is the identity.

    Per token and dynamic by default; with ``static_scale`` one calibrated per-tensor scale.
    """
    if bits >= 16:
        return x
    if static_scale is not None:
        qmax = 2 ** (bits - 1) - 1
        return ((x.float() / static_scale).round().clamp(-qmax, qmax) * static_scale).to(x.dtype)
    q, scale = quantize_activations_per_token(x, bits)
    return (q * scale).to(x.dtype)
