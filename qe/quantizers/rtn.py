"""Round-to-nearest weight quantization."""

from __future__ import annotations

from dataclasses import dataclass

from qe.errors import ConfigError
from qe.quantized import QuantizedWeight
from qe.quantizers.base import Quantizer
from qe.quantizers.grid import quantize_rtn

# Clip ratios searched per row/group when clipping is on (MSE-optimal choice among them).
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def require_weight_bits(setting, layer_name: str) -> None:
    if not setting.quantizes_weights:
        where = f"{layer_name}: " if layer_name else ""
        raise ConfigError(f"{where}setting {setting} keeps 16-bit weights; nothing to quantize (use 2 to 8 weight bits)")


@dataclass(frozen=True)
class RTNConfig:
    clip: bool = False  # search an MSE-optimal clip ratio per row/group over CLIP_GRID


class RTN(Quantizer):
    """Round-to-nearest onto the setting's grid (optional MSE clip search)."""

    name = "rtn"
    Config = RTNConfig

    def quantize(self, weight, setting, *, hessian=None, exempt=None, layer_name="") -> QuantizedWeight:
        require_weight_bits(setting, layer_name)
        return quantize_rtn(weight, setting.w_bits, setting.group_size, setting.symmetric, exempt,
                            CLIP_GRID if self.config.clip else None, layer_name=layer_name)
