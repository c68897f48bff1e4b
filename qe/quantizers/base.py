"""The quantizer contract and the quantized-weight record every quantizer returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from qe.plugins import Plugin
from qe.settings import QuantSetting


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
        g = self.group_index()
        w = (self.codes.to(dtype) - self.zeros[:, g].to(dtype)) * self.scales[:, g].to(dtype)
        if self.exempt is not None:
            w[:, self.exempt] = 0
        return w


class Quantizer(Plugin):
    """Base class of weight quantizers (plugins of kind ``quantizer``).

    ``quantize`` maps a full-precision weight to a :class:`QuantizedWeight` for one setting.
    ``hessian`` is the layer's ``XᵀX`` over the calibration tokens (float64, ``d_in × d_in``,
    already in the smoothed basis when smoothing applies); quantizers that set
    ``needs_hessian`` get it, others may get None. ``exempt`` marks input columns that must
    come out zero and take no part in the quantizer's own updates. A quantizer never knows
    which compensator follows it.

    A quantizer that smooths (SmoothQuant-style) returns its α from ``smoothing_alpha``; the
    pipeline then applies the shared smoothing transform to the whole smoothing group before
    calling ``quantize`` (see :mod:`qe.smoothing`).
    """

    kind: ClassVar[str] = "quantizer"
    name: ClassVar[str]
    needs_hessian: ClassVar[bool] = False


    def smoothing_alpha(self) -> float | None:
        return None

    def quantize(
        self,
        weight: torch.Tensor,
        setting: QuantSetting,
        *,
        hessian: torch.Tensor | None = None,
        exempt: torch.Tensor | None = None,
        layer_name: str = "",
    ) -> QuantizedWeight:
        raise NotImplementedError
