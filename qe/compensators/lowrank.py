"""Global low-rank compensation: ``y += A (B x̃)`` with one rank-r pair per linear.

Methods (the baselines of docs/method.md, baselines and ablations):

* ``whitened`` — the optimum of the damped calibration objective (docs/method.md, shared expert; the
  same optimum as QERA-exact / EoRA, and QE's shared expert);
* ``lqer`` — LQER's diagonal activation scaling: SVD of ``E · diag(a)``, with ``a`` the
  per-channel RMS of the layer's (smoothed) input, ``a_c = sqrt(H_cc)`` (a streamed statistic;
  the scale's overall factor does not change the fit);
* ``svd`` — plain truncated SVD of ``E`` (ZeroQuant-V2 LoRC).

``on_qe_base=true`` runs the compensator on Quant Experts' base: it asks for QE's smoothing
candidates and exempts QE's token-independent channels ``C_s`` (the k most frequent per-token
important channels) from weight and activation quantization, so the low-rank pair must
absorb them as QE's shared expert does. That baseline isolates what routing adds.

Ranks above a layer's ``min(d_in, d_out)`` are capped for that layer (the rank-288 baseline
meets this on 576→192 projections). The compensator records them in ``capped_layers``
(``{layer name: (requested, used)}``) from ``validate_layer`` on; the pipeline prints one
warning listing them. A rank given as a *per-layer override* is not capped but refused:
the pipeline calls :func:`check_rank_override` (or ``validate_override``) for those.

Every fitted module carries ``fit_figures`` (JSON-serialisable): ``rank``,
``requested_rank``, ``method``, ``seconds`` (wall), ``cpu_seconds`` (all threads).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

from qe.analysis.channels import check_split, split_channels
from qe.compensators.base import Compensator, LayerContext, LayerPlan
from qe.compensators.factor_bits import store_pair
from qe.compensators.linalg import lqer_lowrank, svd_lowrank_plain, whitened_lowrank
from qe.compensators.modules import LowRankAdapter, check_adapter_bits
from qe.errors import ConfigError
from qe.quantized import QuantizedWeight

# The ranks `qe quantize --budget` chooses among per layer.
BUDGET_RANKS = (8, 16, 32, 64, 128, 256)
# Quant Experts' default smoothing grid (docs/method.md, smoothing): None = no smoothing.
QE_DEFAULT_ALPHAS: tuple[float | None, ...] = (None, 0.25, 0.5, 0.75)


def capped_rank(rank: int, d_in: int, d_out: int) -> int:
    """The rank a layer can hold: ``min(rank, d_in, d_out)``."""
    return min(rank, d_in, d_out)


def check_rank_override(rank: int, d_in: int, d_out: int, layer_name: str) -> None:
    """A per-layer rank override above the layer's ``min(d_in, d_out)`` is an error."""
    if rank > min(d_in, d_out):
        raise ConfigError(
            f"the per-layer rank {rank} for {layer_name} exceeds min(d_in, d_out) = {min(d_in, d_out)} "
            f"of that {d_in}→{d_out} layer: lower the override to at most {min(d_in, d_out)}"
        )


def check_alphas(alphas: tuple[float | None, ...], owner: str) -> None:
    if not alphas:
        raise ConfigError(f"{owner}: alphas is empty: give at least one value, e.g. alphas=none/0.5")
    for a in alphas:
        if a is not None and not 0.0 <= a <= 1.0:
            raise ConfigError(f"{owner}: alpha {a} is outside [0, 1] (use none for no smoothing)")


def importance_of(layer: LayerContext, who: str):
    """The layer's importance statistics, or a ConfigError saying what is missing."""
    importance = layer.stats.importance if layer.stats is not None else None
    if importance is None:
        raise ConfigError(
            f"{who} needs the per-token channel importance statistics of {layer.name}, which were not collected: "
            "run with calibration data and an importance estimator"
        )
    return importance


@dataclass(frozen=True)
class LowRankConfig:
    rank: int = 64
    method: Literal["whitened", "lqer", "svd"] = "whitened"
    damp: float = 0.01
    on_qe_base: bool = False  # QE's smoothing candidates and C_s exemption
    k: int = 32  # size of C_s when on_qe_base
    branch_input_bits: int = 16  # 8: the branch reads x̃ quantized per token
    adapter_bits: int = 32  # storage of A and B: 32 (float, --adapter-dtype), 16 (float16), 8 or 4 (integer)

    def __post_init__(self) -> None:
        check_adapter_bits(self.adapter_bits)
        if self.rank < 1:
            raise ConfigError(f"rank={self.rank} must be at least 1")
        if self.damp < 0:
            raise ConfigError(f"damp={self.damp} must be 0 or more")
        if self.k < 1:
            raise ConfigError(f"k={self.k} must be at least 1")
        if self.branch_input_bits not in (8, 16):
            raise ConfigError(f"branch_input_bits={self.branch_input_bits} unsupported: use 8 or 16")


class LowRankCompensator(Compensator):
    """Global low-rank error compensation (whitened SVD, LQER, or plain SVD)."""

    name = "lowrank"
    Config = LowRankConfig
    needs_hessian = True  # the whitened and LQER fits read H (plain SVD ignores it)
    modules = (LowRankAdapter,)

    # ------------------------------------------------------------------ checks
    def validate_layer(self, name: str, d_in: int, d_out: int) -> None:
        if self.config.on_qe_base:
            check_split(d_in, self.config.k, 0, name)
        used = capped_rank(self.config.rank, d_in, d_out)
        if used < self.config.rank:
            self.capped_layers[name] = (self.config.rank, used)

    def validate_override(self, name: str, d_in: int, d_out: int) -> None:
        """For a compensator built from a per-layer override: refuse instead of capping."""
        check_rank_override(self.config.rank, d_in, d_out, name)
        self.validate_layer(name, d_in, d_out)

    def importance_k(self) -> int | None:
        return self.config.k if self.config.on_qe_base else None

    def smoothing_candidates(self) -> tuple[float | None, ...] | None:
        return QE_DEFAULT_ALPHAS if self.config.on_qe_base else None

    # ------------------------------------------------------------------ plan and fit
    def plan(self, layer: LayerContext) -> LayerPlan:
        if not self.config.on_qe_base:
            return LayerPlan()
        importance = importance_of(layer, "lowrank[on_qe_base=true]")
        C_s, _ = split_channels(importance.total_counts(), self.config.k, 0, layer.name)
        rank = capped_rank(self.config.rank, layer.d_in, layer.d_out)
        return LayerPlan.exempting(layer.d_in, C_s, rank, {"token_independent": C_s})

    def fit(self, layer: LayerContext, quantized: QuantizedWeight, plan: LayerPlan) -> LowRankAdapter:
        start, cpu_start = time.perf_counter(), time.process_time()
        W = layer.weight.detach().float()
        E = W - quantized.dequantize(torch.float32).to(W.device)  # (d_out, d_in)
        rank = capped_rank(self.config.rank, layer.d_in, layer.d_out)
        if rank < self.config.rank:
            self.capped_layers[layer.name] = (self.config.rank, rank)
        method = self.config.method
        H = None
        if method == "svd":
            A, B = svd_lowrank_plain(E, rank)
        else:
            H = layer_hessian(layer, "lowrank")
            if method == "whitened":
                A, B = whitened_lowrank(E, H, rank, self.config.damp, where=layer.name)
            else:
                A, B = lqer_lowrank(E, H.diagonal().clamp_min(0).sqrt(), rank)
        module = LowRankAdapter(layer.d_in, layer.d_out, rank, self.config.branch_input_bits, self.config.adapter_bits)
        # A is refitted to the stored B (plain least squares for the svd method, which reads no H).
        store_pair(module, ("A", "B"), E, H, A.float(), B.float(), self.config.damp)
        module.fit_figures = {
            "method": method, "rank": rank, "requested_rank": self.config.rank,
            "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start,
        }
        return module

    # ------------------------------------------------------------------ costs
    def budget_menu(self) -> tuple[dict[str, Any], ...]:
        return tuple({"rank": r} for r in BUDGET_RANKS)

    def added_parameters(self, d_in: int, d_out: int) -> int:
        return capped_rank(self.config.rank, d_in, d_out) * (d_in + d_out)

    def flops_per_token(self, d_in: int, d_out: int) -> int:
        return capped_rank(self.config.rank, d_in, d_out) * (d_in + d_out)


def layer_hessian(layer: LayerContext, who: str) -> torch.Tensor:
    """``H = Σ x̃ x̃ᵀ`` (float64): the streamed one, else the token sample's."""
    if layer.hessian is not None:
        return layer.hessian.double()
    if layer.tokens is not None and layer.tokens.shape[0] > 0:
        X = layer.tokens.double()
        return X.T @ X
    raise ConfigError(
        f"{who} needs the calibration Hessian of {layer.name}, which was not collected: run with calibration data"
    )
