"""Types every layer of qe shares: the quantized-weight record and activation fake-quantization.

Quantizers produce a :class:`QuantizedWeight`; compensators, the deployed
:class:`~qe.quantizers.qlinear.QuantLinear` and the kernels read it. Neither quantizers nor
compensators import each other: both import this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_EPS = 1e-12


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(code − zero) · scale``, elementwise with broadcasting: the one dequantization formula."""
    return (codes - zero) * scale


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(d_out, d_in)`` weight from codes and per-row (``group_size == 0``) or per-group
    ``(d_out, n_groups)`` scales and zero points; column ``c`` reads group ``c // group_size``."""
    d_in = codes.shape[1]
    g = torch.arange(d_in, device=codes.device) // (group_size if group_size > 0 else d_in)
    return dequantize_codes(codes.to(dtype), scales[:, g].to(dtype), zeros[:, g].to(dtype))


@dataclass
class QuantizedWeight:
    """A weight on a low-bit grid: ``W_q[o, c] = (codes[o, c] - zeros[o, g(c)]) * scales[o, g(c)]``.

    * ``codes``: ``(d_out, d_in)`` integer codes in ``[0, 2**bits)`` (``torch.uint8`` for
      bits ≤ 8). Symmetric grids store ``q + 2**(bits-1)``, so one unsigned format serves both.
    * ``scales``, ``zeros``: ``(d_out, n_groups)`` float32; ``g(c) = c // group_size`` where
      ``group_size == 0`` means one group per row. When ``group_size`` does not divide
      ``d_in`` the last group is shorter (``n_groups = ceil(d_in / group_size)``).
      Symmetric grids have ``zeros == 2**(bits-1)`` everywhere.
    * ``exempt``: ``(d_in,)`` bool or None. Exempt columns are zero in the dequantized weight
      whatever their codes say (their codes are stored as the zero point).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool
    exempt: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def effective_group_size(self) -> int:
        return self.group_size if self.group_size > 0 else self.codes.shape[1]

    def group_index(self) -> torch.Tensor:
        """``(d_in,)`` group of each input column."""
        d_in = self.codes.shape[1]
        return torch.arange(d_in, device=self.codes.device) // self.effective_group_size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = dequantize(self.codes, self.scales, self.zeros, self.group_size, dtype)
        if self.exempt is not None:
            w[:, self.exempt] = 0
        return w


# --------------------------------------------------------------------------- symmetric grids


def symmetric_scale(w: torch.Tensor, bits: int, dim: int = -1, clip: float | torch.Tensor = 1.0) -> torch.Tensor:
    """The symmetric b-bit step of ``w`` along ``dim`` (kept as a size-1 dimension): the smallest
    step that puts both ends on the grid, ``-2^(b-1)·s ≤ min(w)`` and ``max(w) ≤ (2^(b-1) - 1)·s``
    (the weight grids' convention, :mod:`qe.quantizers.grid`)."""
    half = 2 ** (bits - 1)
    w = w.float()
    lo = -w.amin(dim=dim, keepdim=True) * clip / half
    hi = w.amax(dim=dim, keepdim=True) * clip / (half - 1)
    return torch.maximum(lo, hi).clamp_min(_EPS)


def quantize_symmetric(w: torch.Tensor, bits: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest of ``w`` with one step per slice along ``dim``: unsigned codes
    ``q + 2^(b-1)`` in ``[0, 2^b)`` (uint8) and the float32 steps (``dim`` kept as size 1). Every
    value lands within half a step of its dequantization (no value is clamped)."""
    scale = symmetric_scale(w, bits, dim)
    half = 2 ** (bits - 1)
    codes = (w.float() / scale).round().clamp(-half, half - 1) + half
    return codes.to(torch.uint8), scale


def dequantize_symmetric(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`quantize_symmetric` (float32)."""
    return dequantize_codes(codes.float(), scale.float(), torch.tensor(float(2 ** (bits - 1)), device=codes.device))


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
