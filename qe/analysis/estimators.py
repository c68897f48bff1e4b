"""Channel-importance estimators: per-token scores of a linear layer's input channels.

An estimator sees a linear's weight once (``prepare``) and then scores batches of its input
tokens. Scores are non-negative, ``T × d_in``; each token's top-k channels are its important
set ``C_t`` (docs/method.md, channel importance).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from qe.hookspecs import hookimpl
from qe.plugins import Plugin


class Estimator(Plugin):
    """Base class: ``prepare(weight)`` returns per-channel weight factors; ``score`` uses them."""

    kind: ClassVar[str] = "estimator"
    name: ClassVar[str]


    def prepare(self, weight: torch.Tensor) -> torch.Tensor | None:
        """Per-input-channel factor from the weight ``(d_out, d_in)``, or None."""
        return None

    def score(self, x: torch.Tensor, channel_factor: torch.Tensor | None) -> torch.Tensor:
        """Scores ``(T, d_in)`` of input tokens ``x`` ``(T, d_in)``."""
        raise NotImplementedError


class ActWeight(Estimator):
    """|x_tc| · mean_o |W_oc| — the paper's saliency (default)."""

    name = "act-weight"

    def prepare(self, weight):
        return weight.detach().abs().float().mean(dim=0)

    def score(self, x, channel_factor):
        return x.abs() * channel_factor


class ActAbsMax(Estimator):
    """|x_tc| — activation magnitude alone."""

    name = "act-absmax"

    def score(self, x, channel_factor):
        return x.abs()


class HessianDiag(Estimator):
    """x_tc² · ‖W_:c‖² — each token's share of the OBD saliency of channel c."""

    name = "hessian-diag"

    def prepare(self, weight):
        return weight.detach().float().pow(2).sum(dim=0)

    def score(self, x, channel_factor):
        return x.pow(2) * channel_factor


@hookimpl
def qe_estimators():
    return [ActWeight, ActAbsMax, HessianDiag]
