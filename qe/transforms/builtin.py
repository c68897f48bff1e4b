"""Built-in transforms (registered through the ``qe_transforms`` hook).

* ``none``: the identity;
* ``smoothquant[alpha]``: SmoothQuant's fixed migration strength,
  ``s_j = max|X_j|^α / max|W_{:,j}|^(1−α)``;
* ``awq[grid;vision_weight;answer_weight]``: AWQ-style search over ``s = mean|X|^r`` by the
  group's output error after quantizing with the composition's quantizer, each token's error
  weighted by its modality (MBQ's observation that vision tokens are less sensitive);
* ``alpha-search[candidates]``: the per-group choice among SmoothQuant α values by output
  error, which Quant Experts asks for (``qe`` on the ``none`` transform runs it with its own
  candidates).

Differences from llm-awq: the loss is the sum of the group's linear outputs (not the output
of the whole attention or MLP module); clipping is the quantizer's own (``rtn[clip=true]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qe.errors import ConfigError
from qe.hookspecs import hookimpl
from qe.modality import Modality
from qe.transforms import smoothing
from qe.transforms.base import GroupContext, GroupScales, Transform


class NoTransform(Transform):
    """No transform: the weights are quantized in their own basis."""

    name = "none"

    def needs_calibration(self) -> bool:
        return False

    def smooths(self) -> bool:
        return False


@dataclass(frozen=True)
class SmoothQuantConfig:
    alpha: float = 0.5  # migration strength: s_j = max|X_j|^α / max|W_:,j|^(1−α)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha={self.alpha} is outside 0..1 (SmoothQuant uses 0.5 by default)")


class SmoothQuant(Transform):
    """SmoothQuant-style smoothing with a fixed α (default 0.5)."""

    name = "smoothquant"
    Config = SmoothQuantConfig

    def group_scales(self, group: GroupContext) -> GroupScales:
        alpha = self.config.alpha
        return GroupScales(smoothing.smoothing_scales(group.act_absmax, group.weights, alpha), alpha=alpha)


@dataclass(frozen=True)
class AWQConfig:
    grid: int = 20  # ratios r = 0, 1/grid, ..., (grid-1)/grid
    vision_weight: float = 1.0  # MBQ-style weight of a vision token's error (text tokens weigh 1)
    answer_weight: float = 1.0  # weight of an answer token's error

    def __post_init__(self) -> None:
        if self.grid < 1:
            raise ConfigError(f"grid={self.grid} must be at least 1 (llm-awq uses 20)")
        if not (self.vision_weight >= 0 and self.answer_weight >= 0):
            raise ConfigError("vision_weight and answer_weight must be non-negative (text tokens weigh 1)")


class AWQ(Transform):
    """AWQ-style activation-aware scale search, with MBQ-style modality weights of the loss."""

    name = "awq"
    Config = AWQConfig

    def token_weights(self, token_modality: torch.Tensor | None, n_tokens: int) -> torch.Tensor | None:
        """``(S,)`` weight of each token's error by its modality (None when all weigh 1)."""
        cfg = self.config
        if token_modality is None or (cfg.vision_weight == 1.0 and cfg.answer_weight == 1.0):
            return None
        if token_modality.shape != (n_tokens,):
            raise ConfigError(f"token modality of shape {tuple(token_modality.shape)} does not match {n_tokens} tokens")
        by_modality = torch.ones(len(Modality), dtype=torch.float64)
        by_modality[Modality.VISION], by_modality[Modality.ANSWER] = cfg.vision_weight, cfg.answer_weight
        return by_modality[token_modality.long().cpu()].to(token_modality.device)

    def group_scales(self, group: GroupContext) -> GroupScales:
        exempt = _union(group.exempt)
        # One quantizer for the search: the group's first linear's (as every group decision).
        quantize = group.quantize[0]
        spending = group.quantize_spending[0] if group.quantize_spending else quantize

        def dequantizing(fn):
            return lambda w_s, h_s, ex: fn(w_s, h_s, ex).dequantize()

        s, ratio, errors = smoothing.search_activation_scales(
            group.weights, group.tokens, dequantizing(quantize), group.setting.a_bits, grid=self.config.grid,
            hessian=group.hessian, exempt=exempt, act_exempt=_union(group.act_exempt),
            token_weights=self.token_weights(group.token_modality, group.tokens.shape[0]),
            last_spending=dequantizing(spending),
        )
        return GroupScales(s, figures={"awq_ratio": ratio, "awq_error": errors[ratio]})


@dataclass(frozen=True)
class AlphaSearchConfig:
    # SmoothQuant α candidates; "none" is no smoothing
    candidates: tuple[float | None, ...] = (None, 0.25, 0.5, 0.75)

    def __post_init__(self) -> None:
        if not self.candidates:
            raise ConfigError("alpha-search needs at least one candidate (none means no smoothing)")
        for a in self.candidates:
            if a is not None and not 0.0 <= a <= 1.0:
                raise ConfigError(f"alpha-search candidate {a} is outside 0..1 (none means no smoothing)")


class AlphaSearch(Transform):
    """Per-group SmoothQuant α chosen among candidates by calibration output error."""

    name = "alpha-search"
    Config = AlphaSearchConfig

    def group_scales(self, group: GroupContext) -> GroupScales:
        choice = smoothing.choose_alpha(
            self.config.candidates, group.act_absmax, group.weights, group.tokens, group.quantize,
            group.setting.a_bits, hessian=group.hessian, exempt=group.exempt, act_exempt=group.act_exempt,
            max_tokens=group.max_tokens, last_spending=group.quantize_spending[-1] if group.quantize_spending else None,
        )
        scale = None if choice.alpha is None else smoothing.smoothing_scales(group.act_absmax, group.weights, choice.alpha)
        return GroupScales(scale, alpha=choice.alpha, quantized=list(choice.quantized),
                           figures={"alpha_error": float(choice.errors[choice.alpha])})


def _union(masks: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0].clone()
    for m in present[1:]:
        out |= m
    return out


@hookimpl
def qe_transforms():
    from qe.transforms.rotation import Rotate

    return [NoTransform, SmoothQuant, AWQ, AlphaSearch, Rotate]
