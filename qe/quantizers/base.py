"""The quantizer contract."""

from __future__ import annotations

from typing import ClassVar

import torch

from qe.plugins import Plugin
from qe.quantized import QuantizedWeight
from qe.settings import QuantSetting


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
