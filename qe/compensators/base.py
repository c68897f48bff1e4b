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
per smoothing group by calibration output error (see :mod:`qe.transforms.smoothing`). A composition
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

    @classmethod
    def exempting(cls, d_in: int, channels: torch.Tensor, rank: int, info: dict[str, Any] | None = None) -> LayerPlan:
        """Exempt the first ``rank`` of ``channels`` (most important first) from weight and
        activation quantization. Exempt columns reach the output only through the
        compensator's rank-``rank`` term, which reproduces at most ``rank`` columns exactly:
        exempting more would hand the most important channels to a term too small to carry
        them (a rank-8 term for 32 columns is worse than not exempting at all)."""
        kept = channels[:rank]
        if kept.numel() == 0:
            return cls(info=info or {})
        exempt = torch.zeros(d_in, dtype=torch.bool)
        exempt[kept] = True
        return cls(exempt=exempt, act_exempt=exempt.clone(), info=info or {})


class CompensatorModule(nn.Module):
    """Base class of the modules a compensator adds to a quantized linear.

    The module reads the smoothed, unquantized input ``x̃`` (``(..., d_in)``) and returns
    ``(..., d_out)``, added to the quantized linear's output. To save and reload, a module
    describes itself:

    * ``module_type``: a name unique among installed compensator modules, written into the
      checkpoint's layout next to the name of the compensator plugin that wrote it;
    * :meth:`layout`: the JSON-serialisable shapes and options :meth:`from_layout` needs;
    * :meth:`from_layout`: an empty module of that layout whose ``state_dict`` (every tensor
      a registered buffer or parameter) is then filled from the checkpoint's safetensors.

    A checkpoint is rebuilt only through classes that an installed compensator plugin lists
    in :attr:`Compensator.modules`; nothing named in a checkpoint is imported.
    ``fit_figures`` holds the fit's JSON-serialisable figures (numbers reach the per-layer
    table and the manifest).
    """

    module_type: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        self.fit_figures: dict[str, Any] = {}

    def layout(self) -> dict[str, Any]:
        """Shapes and options to rebuild an empty module (JSON-serialisable)."""
        raise NotImplementedError(f"{type(self).__name__} must implement layout()")

    @classmethod
    def from_layout(cls, layout: dict[str, Any]) -> CompensatorModule:
        """An empty module of ``layout`` (its tensors are filled by ``load_state_dict``)."""
        raise NotImplementedError(f"{cls.__name__} must implement from_layout()")

    @classmethod
    def layout_problem(cls, layout: dict[str, Any], d_in: int, d_out: int) -> str | None:
        """What is wrong with a layout read from a checkpoint for a ``d_out × d_in`` linear (one
        phrase), or None. Called before :meth:`from_layout`, so a damaged or hostile manifest
        is refused before anything is allocated: check sizes and ranks against the layer."""
        return None

    def set_caching(self, enabled: bool) -> None:
        """Whether the module may keep tensors derived from its buffers between forwards (a
        dequantized factor, say). Off for an offloaded module, whose buffers leave memory after
        each forward: a module that caches drops its cache and stops caching. Nothing to do by
        default."""

    def storage_bytes(self) -> int:
        """Bytes of the tensors this module saves (in their own dtypes)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def castable_keys(self) -> set[str]:
        """State keys a checkpoint may store in the global ``--adapter-dtype``: every floating
        tensor by default; a module that fixed its own storage precision returns none of them."""
        return {k for k, t in self.state_dict().items() if t.is_floating_point()}


class Compensator(Plugin):
    """Base class of compensators (plugins of kind ``compensator``).

    Class attributes a compensator may set:

    * ``needs_tokens``: ``fit`` reads the bounded token sample ``layer.tokens``;
    * ``needs_hessian``: ``fit`` reads ``layer.hessian`` (``Σ x̃ x̃ᵀ``);
    * ``modules``: the :class:`CompensatorModule` classes its ``fit`` returns, so that the
      plugin manager can rebuild them from a checkpoint.

    ``capped_layers`` maps a layer name to ``(requested, used)`` rank where the compensator
    lowered a rank to fit the layer's shape; the pipeline reports it as a warning.
    """

    kind: ClassVar[str] = "compensator"
    name: ClassVar[str]
    needs_tokens: ClassVar[bool] = False
    needs_hessian: ClassVar[bool] = False
    modules: ClassVar[tuple[type[CompensatorModule], ...]] = ()

    def __init__(self, config: Any = None):
        super().__init__(config)
        self.capped_layers: dict[str, tuple[int, int]] = {}

    def needs_calibration(self) -> bool:
        """Whether this compensator reads calibration data at all. True by default (``fit``
        sees the layer's statistics); only a compensator that never fits returns False, which
        lets a data-free quantizer skip calibration entirely."""
        return True

    def tokens_wanted(self) -> int | None:
        """Calibration tokens below which this compensator's fit is underdetermined (the pipeline
        warns, naming how many it had), or None when any number will do."""
        return None

    def smoothing_candidates(self) -> tuple[float | None, ...] | None:
        """Smoothing α candidates this compensator wants chosen per smoothing group by
        calibration output error (``None`` in the tuple means "no smoothing"), or None."""
        return None

    def importance_k(self) -> int | None:
        """Top-k size of the per-token channel importance this compensator needs in
        ``layer.stats.importance`` (QE's k), or None when it needs none."""
        return None

    def validate_layer(self, name: str, d_in: int, d_out: int) -> None:
        """Raise ConfigError if this compensator cannot serve a layer of this shape (before
        any work); it may record a lowered rank in ``capped_layers``."""

    def validate_override(self, name: str, d_in: int, d_out: int) -> None:
        """The check for a compensator a recipe assigns to some layers by pattern: the user
        named those layers, so a rank that does not fit is refused rather than capped."""
        self.validate_layer(name, d_in, d_out)

    def plan(self, layer: LayerContext) -> LayerPlan:
        """Requests before weight quantization (exempt columns); none by default."""
        return LayerPlan()

    def fit(self, layer: LayerContext, quantized: QuantizedWeight, plan: LayerPlan) -> CompensatorModule | None:
        """The module added to the quantized linear's output, or None for no compensation."""
        return None

    def budget_menu(self) -> tuple[dict[str, Any], ...]:
        """The options ``qe quantize --budget`` chooses among per layer, each a set of parameter
        changes to this compensator's configuration (e.g. ``{"rank": 32}``); empty when the
        compensator has nothing to allocate (the default). Options a layer cannot hold are
        dropped for that layer (see :meth:`validate_override`)."""
        return ()

    def added_parameters(self, d_in: int, d_out: int) -> int:
        """Values the compensator adds to a ``d_out × d_in`` layer (for effective bits)."""
        return 0

    def flops_per_token(self, d_in: int, d_out: int) -> int:
        """Multiply-adds per token the compensator adds at inference."""
        return 0
