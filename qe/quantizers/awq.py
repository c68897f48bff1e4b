"""AWQ-style activation-aware scaling, with MBQ-style modality weighting of the search loss.

Per smoothing group the scale ``s = mean|X|^r`` (normalised, see
:func:`qe.smoothing.activation_scales`) is searched over ``r ∈ {0, 1/grid, …}`` by the group's
output error on the calibration token sample after quantizing ``W·diag(s)`` with the inner
quantizer (``r = 0`` is no smoothing). MBQ's observation that vision tokens are less sensitive
than text is taken as per-modality weights of each token's squared error
(``vision_weight``, ``answer_weight``; text tokens weigh 1). The scale is then applied by the
shared smoothing transform (folded into the norm or kept as an explicit input scale).

Differences from llm-awq: the loss is the sum of the group's linear outputs (not the output
of the whole attention or MLP module), and the optional clipping is the inner quantizer's
weight-MSE clip search rather than an output-error clip search.

Pipeline protocol: before quantizing a smoothing group, call :meth:`AWQ.search_smoothing_scales`
with the group's weights and token sample, apply the returned scales with :mod:`qe.smoothing`,
then call :meth:`AWQ.quantize` per linear on the smoothed weight. ``quantize`` refuses to run
before any search, so a pipeline that does not know the protocol fails loudly instead of
silently producing an unsmoothed RTN model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from qe.errors import ConfigError
from qe.quantized import QuantizedWeight
from qe.quantizers.base import Quantizer
from qe.settings import QuantSetting

INNER_QUANTIZERS = ("rtn", "gptq")
# Token modalities (qe.models.base.Modality): TEXT = 0, VISION = 1, ANSWER = 2.
_TEXT, _VISION, _ANSWER = 0, 1, 2


@dataclass(frozen=True)
class AWQConfig:
    grid: int = 20  # ratios r = 0, 1/grid, ..., (grid-1)/grid
    inner: str = "rtn"  # the weight quantizer run on the scaled weight: rtn or gptq
    clip: bool = False  # the inner quantizer's MSE clip search
    vision_weight: float = 1.0  # MBQ-style weight of a vision token's error (text tokens weigh 1)
    answer_weight: float = 1.0  # weight of an answer token's error

    def __post_init__(self) -> None:
        if self.grid < 1:
            raise ConfigError(f"grid={self.grid} must be at least 1 (llm-awq uses 20)")
        if self.inner not in INNER_QUANTIZERS:
            raise ConfigError(f"inner={self.inner!r} is not a quantizer awq can wrap: use one of {', '.join(INNER_QUANTIZERS)}")
        if self.vision_weight < 0 or self.answer_weight < 0:
            raise ConfigError("vision_weight and answer_weight must be non-negative (text tokens weigh 1)")


@dataclass
class ScaleSearch:
    """The outcome of one group's search, kept for the pipeline's figures."""

    ratio: float
    errors: dict[float, float] = field(default_factory=dict)


class AWQ(Quantizer):
    """AWQ-style activation-aware scale search (MBQ-style modality weights), then RTN or GPTQ.

    ``needs_hessian`` is an instance property (true when the inner quantizer is GPTQ).
    """

    name = "awq"
    Config = AWQConfig

    def __init__(self, config: AWQConfig | None = None):
        super().__init__(config)
        from qe.plugins import default_manager  # the manager imports the built-ins

        cfg = self.config
        self.inner: Quantizer = default_manager().resolve("quantizer", f"{cfg.inner}[clip={str(cfg.clip).lower()}]").create()
        self.searches: list[ScaleSearch] = []

    @property
    def needs_hessian(self) -> bool:  # type: ignore[override]
        return self.inner.needs_hessian

    def token_weights(self, token_modality: torch.Tensor | None, n_tokens: int) -> torch.Tensor | None:
        """``(S,)`` weight of each token's error by its modality (None when all weigh 1)."""
        cfg = self.config
        if token_modality is None or (cfg.vision_weight == 1.0 and cfg.answer_weight == 1.0):
            return None
        if token_modality.shape != (n_tokens,):
            raise ConfigError(f"token modality of shape {tuple(token_modality.shape)} does not match {n_tokens} tokens")
        by_modality = torch.tensor([1.0, cfg.vision_weight, cfg.answer_weight], dtype=torch.float64)
        return by_modality[token_modality.long().cpu()].to(token_modality.device)

    def search_smoothing_scales(
        self,
        weights: Sequence[torch.Tensor],
        tokens: torch.Tensor,
        token_modality: torch.Tensor | None,
        setting: QuantSetting,
        *,
        hessian: torch.Tensor | None = None,
        exempt: torch.Tensor | None = None,
        act_exempt: torch.Tensor | None = None,
        layer_name: str = "",
    ) -> torch.Tensor:
        """``(d_in,)`` scales of one smoothing group (original basis ``weights``, ``tokens`` ``(S, d_in)``)."""
        from qe.smoothing import search_activation_scales

        if self.inner.needs_hessian and hessian is None:
            raise ConfigError(f"awq with inner={self.config.inner} needs calibration data: no Hessian was given for {layer_name or 'the group'}")

        def quantize_fn(w_s, h_s, ex):
            return self.inner.quantize(w_s, setting, hessian=h_s, exempt=ex, layer_name=layer_name).dequantize()

        s, ratio, errors = search_activation_scales(
            weights, tokens, quantize_fn, setting.a_bits, grid=self.config.grid, hessian=hessian, exempt=exempt,
            act_exempt=act_exempt, token_weights=self.token_weights(token_modality, tokens.shape[0]),
        )
        self.searches.append(ScaleSearch(ratio, errors))
        return s

    def quantize(self, weight, setting, *, hessian=None, exempt=None, layer_name="") -> QuantizedWeight:
        if not self.searches:
            raise ConfigError(
                "awq needs its scale search before quantizing: the pipeline must call "
                "AWQ.search_smoothing_scales per smoothing group and smooth the weights first"
            )
        return self.inner.quantize(weight, setting, hessian=hessian, exempt=exempt, layer_name=layer_name)
