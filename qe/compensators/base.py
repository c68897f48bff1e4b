"""The compensator contract: plan before weight quantization, fit after it.

Per linear layer, the pipeline calls

1. ``plan(layer)`` before quantizing: the compensator may exempt input columns from weight
   quantization (``LayerPlan.exempt``) and from the activation quantizer's per-token scale
   (``LayerPlan.act_exempt``); the quantizer receives the mask without knowing who asked.
2. the quantizer, then ``fit(layer, quantized, plan)``: the compensator sees ``W``, ``W_q``,
   the streamed statistics and a bounded token sample, and returns the module whose output is
   added to the quantized linear's (or None). The module reads the smoothed, unquantized input
   ``x̃`` and returns ``(..., d_out)``.

A compensator that wants smoothing returns candidate α values from
``smoothing_candidates`` (``None`` in the tuple means "no smoothing"); the pipeline picks one
per smoothing group by calibration output error (see :mod:`qe.smoothing`). A composition
never smooths twice: on a smoothing quantizer's base, the base's scales are used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from qe.analysis.statistics import LinearStats
from qe.plugins import Plugin
from qe.quantized import QuantizedWeight
from qe.settings import QuantSetting


@dataclass
class LayerContext:
    """What a compensator sees of one linear layer.

    ``weight``, ``hessian`` and ``tokens`` are all in the smoothed basis when smoothing
    applies (``W̃ = W·diag(s)``, ``x̃ = x / s``, ``H̃ = diag(1/s) H diag(1/s)``).
    """

    name: str
    block_index: int
    weight: torch.Tensor  # (d_out, d_in) float32
    bias: torch.Tensor | None
    setting: QuantSetting
    stats: LinearStats | None
    hessian: torch.Tensor | None = None  # (d_in, d_in) float64, Σ x̃ x̃ᵀ
    tokens: torch.Tensor | None = None  # (S, d_in) float32 sample of x̃
    token_modality: torch.Tensor | None = None  # (S,) int8
    input_scale: torch.Tensor | None = None  # s, or None when unsmoothed
    seed: int = 0

    @property
    def d_out(self) -> int:
        return self.weight.shape[0]

    @property
    def d_in(self) -> int:
        return self.weight.shape[1]


@dataclass
class LayerPlan:
    """A compensator's requests before weight quantization."""

    exempt: torch.Tensor | None = None  # (d_in,) bool: columns the quantizer must leave out
    act_exempt: torch.Tensor | None = None  # (d_in,) bool: channels zeroed before activation quantization
    info: dict[str, Any] = field(default_factory=dict)


class Compensator(Plugin):
    """Base class of compensators (plugins of kind ``compensator``)."""

    kind: ClassVar[str] = "compensator"
    name: ClassVar[str]
    needs_tokens: ClassVar[bool] = False
    needs_hessian: ClassVar[bool] = False


    def smoothing_candidates(self) -> tuple[float | None, ...] | None:
        return None

    def importance_k(self) -> int | None:
        """Top-k size of the per-token channel importance this compensator needs in
        ``layer.stats.importance`` (QE's k), or None when it needs none."""
        return None

    def validate_layer(self, name: str, d_in: int, d_out: int) -> None:
        """Raise ConfigError if this compensator cannot serve a layer of this shape."""

    def plan(self, layer: LayerContext) -> LayerPlan:
        return LayerPlan()

    def fit(self, layer: LayerContext, quantized: QuantizedWeight, plan: LayerPlan) -> nn.Module | None:
        return None

    def added_parameters(self, d_in: int, d_out: int) -> int:
        """Values the compensator adds to a ``d_out × d_in`` layer (for effective bits)."""
        return 0

    def flops_per_token(self, d_in: int, d_out: int) -> int:
        """Multiply-adds per token the compensator adds at inference."""
        return 0
