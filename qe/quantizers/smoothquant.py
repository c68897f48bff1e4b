"""SmoothQuant-style quantization: a fixed smoothing α, then an inner weight quantizer.

The smoothing itself is the shared transform of :mod:`qe.smoothing`: the pipeline asks
:meth:`SmoothQuant.smoothing_alpha`, applies the transform to the whole smoothing group
(scales folded into the norm or kept as an explicit input scale) and then calls
:meth:`SmoothQuant.quantize` with the smoothed weight (and smoothed Hessian), which this
plugin hands to its inner quantizer (``rtn`` or ``gptq``, resolved through the plugin manager).
"""

from __future__ import annotations

from dataclasses import dataclass

from qe.errors import ConfigError
from qe.quantized import QuantizedWeight
from qe.quantizers.base import Quantizer

INNER_QUANTIZERS = ("rtn", "gptq")


@dataclass(frozen=True)
class SmoothQuantConfig:
    alpha: float = 0.5  # migration strength: s_j = max|X_j|^α / max|W_:,j|^(1−α)
    inner: str = "rtn"  # the weight quantizer run on the smoothed weight: rtn or gptq

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha={self.alpha} is outside 0..1 (SmoothQuant uses 0.5 by default)")
        if self.inner not in INNER_QUANTIZERS:
            raise ConfigError(f"inner={self.inner!r} is not a quantizer smoothquant can wrap: use one of {', '.join(INNER_QUANTIZERS)}")


class SmoothQuant(Quantizer):
    """SmoothQuant-style smoothing (fixed α) followed by RTN or GPTQ on the smoothed weight.

    ``needs_hessian`` is an instance property here (true when the inner quantizer is GPTQ):
    ask the instance, not the class.
    """

    name = "smoothquant"
    Config = SmoothQuantConfig

    def __init__(self, config: SmoothQuantConfig | None = None):
        super().__init__(config)
        from qe.plugins import default_manager  # the manager imports the built-ins, this module among them

        self.inner: Quantizer = default_manager().resolve("quantizer", self.config.inner).create()

    @property
    def needs_hessian(self) -> bool:  # type: ignore[override]
        return self.inner.needs_hessian

    def smoothing_alpha(self) -> float | None:
        return self.config.alpha

    def quantize(self, weight, setting, *, hessian=None, exempt=None, layer_name="") -> QuantizedWeight:
        return self.inner.quantize(weight, setting, hessian=hessian, exempt=exempt, layer_name=layer_name)
