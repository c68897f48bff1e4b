"""The transform contract: one scale vector per smoothing group, applied exactly.

Per smoothing group (the linears that read one input, e.g. q/k/v after the input norm) the
pipeline calls :meth:`Transform.group_scales` with a :class:`GroupContext`. A transform returns
``s`` (``d_in``) or None; the pipeline then applies it (see :mod:`qe.transforms.smoothing`):

    W̃ = W · diag(s)        x̃ = x / s        H̃ = diag(1/s) H diag(1/s)

folding ``1/s`` into the preceding norm where there is one and keeping an explicit input
scale on the quantized linear where there is not. The quantizer and the compensator see
only the transformed basis; neither knows which transform ran.

A transform may also change the whole model once, before any calibration input is captured
(:meth:`Transform.prepare_model`, declared by :meth:`Transform.changes_model`): the
``rotate`` transform folds orthogonal rotations into the weights there. The per-group step
then runs in the changed model's basis.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from qe.plugins import Plugin
from qe.quantized import QuantizedWeight
from qe.settings import QuantSetting

# quantize(W̃ (d_out, d_in), H̃ (d_in, d_in) | None, exempt (d_in,) | None) -> QuantizedWeight
QuantizeFn = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], QuantizedWeight]


@dataclass
class GroupContext:
    """What a transform sees of one smoothing group (everything in the original basis)."""

    names: list[str]  # full names of the group's linears
    weights: list[torch.Tensor]  # (d_out_i, d_in) float32
    tokens: torch.Tensor  # (S, d_in) float32 sample of the group's input tokens
    token_modality: torch.Tensor | None  # (S,) int8, values of qe.modality.Modality
    act_absmax: torch.Tensor  # (d_in,) max |x| per channel over every calibration token
    hessian: torch.Tensor | None  # (d_in, d_in) Σ x xᵀ, when the composition streams it
    setting: QuantSetting
    exempt: list[torch.Tensor | None]  # per linear: columns its compensator exempts from weight quantization
    act_exempt: list[torch.Tensor | None]  # per linear: channels zeroed before activation quantization
    quantize: list[QuantizeFn]  # per linear: the composition's quantizer, for searches by output error
    max_tokens: int = 4096  # a search uses at most the first this many tokens
    # Per linear, the same quantization for a Hessian that no one reads after it (a search's
    # own smoothed copy, at its last use): it may be overwritten, not copied (GPTQ then adds no
    # d × d matrix: 0.5 GB at a width of 8,192). Empty: use ``quantize``.
    quantize_spending: list[QuantizeFn] = field(default_factory=list)


@dataclass
class GroupScales:
    """A transform's answer for one group."""

    scale: torch.Tensor | None  # (d_in,) float32 s, or None for "leave the group as it is"
    alpha: float | None = None  # the α the scale came from, where there is one (per-layer table)
    # Per linear, the quantization of W̃ already done while searching (same weight, Hessian and
    # exemption as the pipeline's), reused instead of quantizing again; None where there is none.
    quantized: list[QuantizedWeight | None] | None = None
    figures: dict[str, float] = field(default_factory=dict)  # added to each linear's figures


@dataclass
class ModelContext:
    """What a transform's model-level step sees: the model, its adapter, and the decoder
    linears this run quantizes (full name → module; skipped linears are not among them)."""

    model: nn.Module
    adapter: Any  # qe.models.base.ModelAdapter (not imported: the adapters import the transforms' users)
    linears: dict[str, nn.Module]
    setting: QuantSetting
    seed: int = 0


class Transform(Plugin):
    """Base class of transforms (plugins of kind ``transform``)."""

    kind: ClassVar[str] = "transform"
    name: ClassVar[str]
    needs_hessian: ClassVar[bool] = False

    def needs_calibration(self) -> bool:
        """Whether the transform reads calibration data (all but the identity do)."""
        return True

    def smooths(self) -> bool:
        """Whether :meth:`group_scales` smooths (all but the identity and a rotation without
        smoothing do). Where it does not, a compensator that asks for a per-group α search
        gets one (a composition never smooths twice)."""
        return True

    def changes_model(self) -> bool:
        """Whether :meth:`prepare_model` changes the model (block inputs captured before it
        are then stale, and statistics streamed on the unchanged model do not apply)."""
        return False

    def prepare_model(self, model: ModelContext) -> list[str]:
        """The model-level step, run once before calibration inputs are captured and any group
        is smoothed; it changes ``model.model`` in place so that its full-precision outputs stay
        the same. Returns warnings for the run's record. Nothing by default."""
        return []

    def group_scales(self, group: GroupContext) -> GroupScales | None:
        """The scales of one smoothing group, or None to leave it unchanged."""
        return None
