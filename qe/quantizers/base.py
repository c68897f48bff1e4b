"""The quantizer contract."""

from __future__ import annotations

from typing import ClassVar

import torch

from qe.plugins import Plugin
from qe.quantized import QuantizedWeight
from qe.settings import QuantSetting


class Quantizer(Plugin):
    """Base class of weight quantizers (plugins of kind ``quantizer``).

    ``quantize`` maps a full-precision weight to a :class:`~qe.quantized.QuantizedWeight` for
    one setting. ``hessian`` is the layer's ``XᵀX`` over the calibration tokens (float64,
    ``d_in × d_in``, in the transformed basis when a transform applies); quantizers that set
    ``needs_hessian`` get it, others may get None. ``exempt`` marks input columns that must
    come out zero and take no part in the quantizer's own updates. A quantizer never knows
    which transform ran before it or which compensator follows it.
    """

    kind: ClassVar[str] = "quantizer"
    name: ClassVar[str]
    needs_hessian: ClassVar[bool] = False

    def needs_calibration(self) -> bool:
        """Whether quantizing reads calibration data (by default: when it needs the Hessian)."""
        return self.needs_hessian

    def quantize(
        self,
        weight: torch.Tensor,
        setting: QuantSetting,
        *,
        hessian: torch.Tensor | None = None,
        exempt: torch.Tensor | None = None,
        layer_name: str = "",
    ) -> QuantizedWeight:
        raise NotImplementedError(f"{type(self).__name__} must implement quantize()")

    def quantize_spending_hessian(
        self,
        weight: torch.Tensor,
        setting: QuantSetting,
        *,
        hessian: torch.Tensor | None = None,
        exempt: torch.Tensor | None = None,
        layer_name: str = "",
    ) -> QuantizedWeight:
        """:meth:`quantize`, told that no one reads ``hessian`` afterwards, so a quantizer may
        overwrite it instead of copying it (GPTQ works in its memory: one ``d × d`` float64
        matrix less, 0.5 GB at a width of 8,192). The same result as :meth:`quantize`, which
        it calls by default."""
        return self.quantize(weight, setting, hessian=hessian, exempt=exempt, layer_name=layer_name)
