"""Quant Experts (docs/method.md): shared expert + token-routed low-rank experts.

Per linear, in the smoothed basis (``W̃``, ``x̃``, ``H̃``; the pipeline picks α per smoothing
group from :meth:`QuantExperts.smoothing_candidates`):

1. ``plan``: split channels by per-token importance frequency into ``C_s`` (k) and ``C_r``
   (N_r·k); exempt ``C_s`` (its r_s most frequent channels when r_s < k) from weight
   quantization and from the activation quantizer.
2. ``fit``: ``E = W̃ − W_q``; shared expert = whitened fit of rank r_s with ``H``;
   ``E_S = E − A_s B_s``; NPMI of ``C_r`` co-occurrence → spectral clusters ``G_i``; token t →
   expert ``argmax_i Σ_{c ∈ C_t ∩ G_i} s_{t,c}``; expert i = whitened fit of ``E_S`` with
   ``H_i = Σ_{t ∈ T_i} x̃ x̃ᵀ`` (damped), rank r_r; router ``R`` by ridge least squares so that
   ``R|x̃_t|`` predicts ``e_{t,i} = ‖(E_S − A_i B_i) x̃_t‖``.

Decisions where the paper leaves room (each documented where it is made; docs/method.md, choices
where the paper is silent):

* ``C_t`` is the importance statistics' top-k set (their ``k``); ``config.k`` sizes the split.
* The routed fit, the router and the figures use the pipeline's token sample, subsampled
  (seeded) to ``max_tokens``.
* Token scores for the assignment are recomputed on the sample in the *original* basis
  (``x = x̃ · s``) with the statistics' estimator, as the statistics themselves were.
* ``routed-only`` keeps the same ``C_r`` (ranks k … k(1+N_r) of the frequency order) and the
  same smoothing candidates; only the exemption and the shared expert go.
* ``refine=true`` (layer-wise training, docs/method.md, refinement) runs after the closed-form fit and any
  alternation; see :mod:`qe.compensators.refinement` for its loss and the keep-if-better rule.

The fitted :class:`QuantExpertsAdapter` carries ``fit_figures`` (JSON-serialisable; see
:meth:`QuantExperts.fit`): the router's agreement with oracle routing, the calibration
residual objective under router / oracle / shared-only, tokens per expert, the clustering
summary and the fit time.

Cost: QE's fit scales with ``tokens × d²`` (the Grams of the experts and of the router), the
whitened low-rank fit's with ``d³`` only, so QE fits several times slower than a rank-64
low-rank compensator, and needs its token sample: fewer tokens lose most of its gain. Figures
(held-out error, fit and forward time against rank 64, alternation, refinement) are in
docs/results.md, one layer at a time.
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import torch

from qe.analysis.channels import (
    check_split,
    cluster_summary,
    cooccurrence,
    npmi,
    random_clusters,
    spectral_clusters,
    split_channels,
    token_expert_assignment,
)
from qe.compensators.base import Compensator, LayerContext, LayerPlan
from qe.compensators.factor_bits import store_experts, store_pair
from qe.compensators.linalg import (
    lowrank_from_input_cholesky,
    lowrank_from_output_gram,
    whitened_lowrank,
)
from qe.compensators.lowrank import (
    QE_DEFAULT_ALPHAS,
    capped_rank,
    check_alphas,
    check_rank_override,
    importance_of,
    layer_hessian,
)
from qe.compensators.modules import QuantExpertsAdapter, check_adapter_bits
from qe.compensators.refinement import RefineSchedule, refine_experts
from qe.errors import ConfigError, DataError
from qe.gram import damped_gram_cholesky, damping_scale, symmetric_gram
from qe.quantized import QuantizedWeight

Mode = Literal["full", "shared-only", "routed-only", "random-routing", "random-clustering", "oracle-routing"]
SCORE_CHUNK = 4096  # tokens scored at a time (bounds the (chunk, d_in) score matrix)
# The experts' eigen steps run in float32: their fit is heuristic (a token assignment), so the
# ~1e-6 relative objective it costs is immaterial, and it halves the step's time.
EXPERT_EIG_DTYPE = torch.float32
# Subspace iterations of the experts' eigen steps: 8 leave ~1e-4 of an expert's own objective
# (measured on a W4 576×1536 error; linalg's default 16 reaches 1e-7) and save ~0.15 s a layer.
EXPERT_ITERATIONS: int | None = 8
# The (shared rank, experts, expert rank) `qe quantize --budget` chooses among per layer: shared
# experts alone (a rank on QE's base) and routed configurations from small expert ranks (each
# expert stores its own factors, so at about one extra bit per weight only small ones fit) up
# to the default (32, 8, 32).
BUDGET_SHAPES = ((8, 0, 1), (16, 0, 1), (32, 0, 1), (64, 0, 1), (128, 0, 1),
                 (16, 4, 4), (32, 4, 4), (32, 8, 4), (32, 4, 8), (32, 8, 32))


@dataclass(frozen=True)
class QuantExpertsConfig:
    k: int = 32
    num_experts: int = 8  # N_r
    shared_rank: int = 32  # r_s
    expert_rank: int = 32  # r_r
    alphas: tuple[float | None, ...] = QE_DEFAULT_ALPHAS  # None = no smoothing
    damp: float = 0.01
    router_ridge: float = 1e-3
    max_tokens: int = 16384
    alternation_rounds: int = 0
    refine: bool = False
    refine_epochs: int = 16
    refine_iterations: int = 100
    refine_lr: float = 3e-2  # relative to each tensor's RMS (refinement.py); chosen on block 12's q/gate/down
    refine_kl_weight: float = 1.0
    refine_temperature: float = 1.0
    mode: Mode = "full"
    branch_input_bits: int = 16
    adapter_bits: int = 32  # storage of the factors and router: 32 (float, --adapter-dtype), 16, 8 or 4

    def __post_init__(self) -> None:
        check_adapter_bits(self.adapter_bits)
        if self.k < 1:
            raise ConfigError(f"k={self.k} must be at least 1")
        if self.num_experts < 0:
            raise ConfigError(f"num_experts={self.num_experts} must be 0 or more")
        if self.shared_rank < 0 or self.expert_rank < 1:
            raise ConfigError(f"shared_rank={self.shared_rank} must be ≥ 0 and expert_rank={self.expert_rank} ≥ 1")
        check_alphas(self.alphas, "qe")
        if self.damp < 0 or self.router_ridge < 0:
            raise ConfigError(f"damp={self.damp} and router_ridge={self.router_ridge} must be 0 or more")
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens={self.max_tokens} must be at least 1")
        if self.alternation_rounds < 0:
            raise ConfigError(f"alternation_rounds={self.alternation_rounds} must be 0 or more")
        if self.refine_epochs < 1 or self.refine_iterations < 1:
            raise ConfigError(f"refine_epochs={self.refine_epochs} and refine_iterations={self.refine_iterations} must be at least 1")
        if not (self.refine_lr > 0 and self.refine_temperature > 0 and self.refine_kl_weight >= 0):
            raise ConfigError(
                f"refine_lr={self.refine_lr} and refine_temperature={self.refine_temperature} must be positive, "
                f"refine_kl_weight={self.refine_kl_weight} 0 or more"
            )
        if self.refine and self.routed_experts == 0:
            raise ConfigError(
                f"refine=true trains the routed experts and the router, and num_experts={self.num_experts} with "
                f"mode={self.mode} has none: use num_experts ≥ 1 and a mode other than shared-only"
            )
        if self.refine and self.mode in ("random-routing", "oracle-routing"):
            raise ConfigError(
                f"refine=true trains the experts for the router's choice, which mode={self.mode} does not use: "
                "use mode=full, routed-only or random-clustering"
            )

    # ------------------------------------------------------------------ derived
    @property
    def routed_experts(self) -> int:
        """N_r actually fitted (0 in shared-only mode)."""
        return 0 if self.mode == "shared-only" else self.num_experts

    @property
    def uses_shared(self) -> bool:
        return self.mode != "routed-only" and self.shared_rank > 0

    @property
    def exempts(self) -> bool:
        return self.mode != "routed-only"

    @property
    def routing(self) -> str:
        return {"random-routing": "random", "oracle-routing": "oracle"}.get(self.mode, "router")


class QuantExperts(Compensator):
    """Quant Experts: shared low-rank expert + top-1 routed low-rank experts (CVPR 2026)."""

    name = "qe"
    Config = QuantExpertsConfig
    needs_tokens = True
    needs_hessian = True
    modules = (QuantExpertsAdapter,)

    def __init__(self, config: QuantExpertsConfig | None = None):
        super().__init__(config)
        # The router's factored ridge system, shared by linears reading the same token sample
        # (a smoothing group): key → (weak reference to the tokens, their version, factor).
        self._router_cache: dict[tuple, tuple[Any, int, torch.Tensor]] = {}
        self._router_release: weakref.finalize | None = None

    # ------------------------------------------------------------------ checks
    def validate_layer(self, name: str, d_in: int, d_out: int) -> None:
        c = self.config
        check_split(d_in, c.k, c.routed_experts, name)
        for rank in (c.shared_rank if c.uses_shared else 0, c.expert_rank if c.routed_experts else 0):
            if capped_rank(rank, d_in, d_out) < rank:
                self.capped_layers[name] = (rank, capped_rank(rank, d_in, d_out))

    def validate_override(self, name: str, d_in: int, d_out: int) -> None:
        """For a compensator built from a per-layer override: refuse ranks instead of capping."""
        check_rank_override(max(self.config.shared_rank, self.config.expert_rank), d_in, d_out, name)
        self.validate_layer(name, d_in, d_out)

    def importance_k(self) -> int | None:
        return self.config.k

    def tokens_wanted(self) -> int | None:
        # Each routed expert fits a rank-r term from the tokens routed to it; at an even split,
        # fewer than 16·r tokens per expert fit the calibration tokens but not held-out text.
        n = self.config.routed_experts
        return 16 * n * self.config.expert_rank if n else None

    def smoothing_candidates(self) -> tuple[float | None, ...] | None:
        # routed-only keeps the grid too: the ablation removes exemption and the shared
        # expert only, so that it differs from the full method in one respect.
        return tuple(self.config.alphas)

    def _ranks(self, d_in: int, d_out: int) -> tuple[int, int, int]:
        c = self.config
        r_s = capped_rank(c.shared_rank, d_in, d_out) if c.uses_shared else 0
        n = c.routed_experts
        r_r = capped_rank(c.expert_rank, d_in, d_out) if n else 0
        return r_s, n, r_r

    # ------------------------------------------------------------------ plan
    def plan(self, layer: LayerContext) -> LayerPlan:
        c = self.config
        importance = importance_of(layer, "qe")
        C_s, C_r = split_channels(importance.total_counts(), c.k, c.routed_experts, layer.name)
        info = {"token_independent": C_s, "token_dependent": C_r}
        if c.routed_experts and c.mode != "random-clustering":
            # scikit-learn takes seconds to import: pay that here, not inside the timed fit.
            import sklearn.cluster  # noqa: F401
        if not c.exempts:
            return LayerPlan(info=info)
        r_s = self._ranks(layer.d_in, layer.d_out)[0]
        return LayerPlan.exempting(layer.d_in, C_s, r_s, info)

    # ------------------------------------------------------------------ fit
    def fit(self, layer: LayerContext, quantized: QuantizedWeight, plan: LayerPlan) -> QuantExpertsAdapter:
        """Fit the adapter; ``module.fit_figures`` holds (all JSON-serialisable):

        ``shared_rank``, ``num_experts``, ``expert_rank``, ``tokens`` (sample size used);
        ``residual_none`` = 1 and ``residual_shared``, ``residual_router``, ``residual_oracle``:
        ``Σ_t ‖(E − correction) x̃_t‖² / Σ_t ‖E x̃_t‖²`` on the sample (router: each token's
        routed expert; oracle: ``argmin_i e_{t,i}``); ``router_agreement``: share of tokens
        whose router choice is the oracle's; ``tokens_per_expert`` (fit assignment) and
        ``router_tokens_per_expert``; ``cluster_sizes``, ``cluster_mean_npmi``;
        ``alternation_rounds_kept``; with ``refine=true`` ``refine_residual_before`` /
        ``refine_residual_after`` (the router's residual objective), ``refine_kept``,
        ``refine_loss_first_epoch`` / ``refine_loss_last_epoch``; ``seconds`` (wall), ``cpu_seconds`` (all threads) and
        ``seconds_by_step`` / ``cpu_seconds_by_step``.
        """
        c = self.config
        clock = _Clock()
        W = layer.weight.detach().float()
        E = W - quantized.dequantize(torch.float32).to(W.device)  # (d_out, d_in)
        d_out, d_in = E.shape
        r_s, n_experts, r_r = self._ranks(d_in, d_out)
        for requested, used in ((c.shared_rank, r_s), (c.expert_rank, r_r)):
            if used and used < requested:
                self.capped_layers[layer.name] = (requested, used)
        X, rows = self._token_sample(layer)  # (T, d_in) x̃; rows of layer.tokens kept
        H = layer_hessian(layer, "qe")

        # Shared expert (docs/method.md, shared expert): whitened fit with the layer's full Hessian.
        module = QuantExpertsAdapter(d_in, d_out, r_s, n_experts, r_r, c.branch_input_bits, c.routing, layer.seed,
                                     c.adapter_bits)
        if r_s > 0:
            A_s, B_s = whitened_lowrank(E, H, r_s, c.damp, where=layer.name)
        else:
            A_s, B_s = E.new_zeros(d_out, 0), E.new_zeros(0, d_in)
        # Stored (and, below 32 bits, A_s refitted to the stored B_s): the experts fit what is left.
        A_s, B_s = store_pair(module, ("A_s", "B_s"), E, H, A_s, B_s, c.damp)
        E_S = E - A_s @ B_s
        clock.lap("shared")
        figures: dict[str, Any] = {"shared_rank": r_s, "num_experts": n_experts, "expert_rank": r_r, "tokens": X.shape[0]}
        residual = _Residuals(X, E_S, A_s, B_s)
        figures["residual_none"] = 1.0
        figures["residual_shared"] = residual.relative(residual.shared_sq)
        clock.lap("residuals")

        if n_experts > 0:
            C_r = self._token_dependent(layer, plan, n_experts)
            labels, cluster_figures = self._clusters(layer, C_r, n_experts)
            figures.update(cluster_figures)
            clock.lap("clustering")
            assignment = self._assign_tokens(layer, X, C_r, labels, n_experts, rows)
            clock.lap("assignment")
            A, B = fit_experts(E_S, X, assignment, n_experts, r_r, c.damp, Y=residual.Y)
            clock.lap("experts")
            e_sq = residual.routed_sq(A, B)  # (T, N)
            F = X.abs()  # router features |x̃|
            R = self._fit_router(layer, F, e_sq.sqrt())
            clock.lap("router")
            kept = 0
            for _ in range(c.alternation_rounds):
                router_choice = (F @ R.T).argmin(dim=1)
                before = e_sq.gather(1, router_choice[:, None]).sum()
                A2, B2 = fit_experts(E_S, X, router_choice, n_experts, r_r, c.damp, Y=residual.Y)
                e_sq2 = residual.routed_sq(A2, B2)
                R2 = self._fit_router(layer, F, e_sq2.sqrt())
                after = _routed(e_sq2, F, R2).sum()
                if not after < before:
                    break
                A, B, R, e_sq, assignment, kept = A2, B2, R2, e_sq2, router_choice, kept + 1
            clock.lap("alternation")
            if c.refine:
                A, B, R, e_sq, refine_figures = self._refine(layer, X, E_S, residual, F, A, B, R, e_sq)
                figures.update(refine_figures)
                clock.lap("refine")
            if c.adapter_bits != 32:
                # The stored experts' residuals differ from the fitted ones: refit the router to them.
                A, B = store_experts(module, E_S, X, assignment, A, B, c.damp)
                e_sq = residual.routed_sq(A, B)
                R = self._fit_router(layer, F, e_sq.sqrt())
                clock.lap("adapter_bits")
            else:
                module.set_factor("A", A)
                module.set_factor("B", B)
            R = module.set_factor("R", R)
            if module.E_S is not None:
                module.E_S.copy_(E_S)
            figures.update(_routing_figures(F, R, e_sq, residual, assignment, n_experts))
            figures["alternation_rounds_kept"] = kept
        figures["seconds_by_step"] = clock.laps
        figures["seconds"] = clock.total()
        figures["cpu_seconds"] = clock.cpu_total()
        figures["cpu_seconds_by_step"] = clock.cpu_laps
        module.fit_figures = figures
        return module

    # ------------------------------------------------------------------ steps
    def _token_sample(self, layer: LayerContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The token sample ``(T, d_in)`` and the rows of ``layer.tokens`` it keeps (None: all)."""
        if layer.tokens is None or layer.tokens.shape[0] == 0:
            raise DataError(f"qe needs a sample of the calibration inputs of {layer.name}, and none was captured: run with calibration data")
        X = layer.tokens.detach().float()
        if X.shape[0] <= self.config.max_tokens:
            return X, None
        g = torch.Generator().manual_seed(layer.seed)
        keep = torch.randperm(X.shape[0], generator=g)[: self.config.max_tokens].sort().values
        return X[keep.to(X.device)], keep

    def _token_dependent(self, layer: LayerContext, plan: LayerPlan, n_experts: int) -> torch.Tensor:
        """``C_r`` as planned (recomputed when the plan does not carry it)."""
        value = plan.info.get("token_dependent") if plan is not None else None
        if value is not None:
            return torch.as_tensor(value, dtype=torch.long)
        return split_channels(importance_of(layer, "qe").total_counts(), self.config.k, n_experts, layer.name)[1]

    def _clusters(self, layer: LayerContext, C_r: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Labels ``(N_r·k,)`` of ``C_r`` and the clustering figures."""
        c = self.config
        importance = importance_of(layer, "qe")
        if c.mode == "random-clustering":
            labels = random_clusters(C_r.numel(), n_experts, layer.seed)
        else:
            topk = importance.topk
            if topk.shape[0] == 0:
                raise DataError(
                    f"qe needs the per-token top-k sets of {layer.name} for co-occurrence, and none were kept: "
                    "collect importance statistics with keep_topk"
                )
            p_i, p_ij = cooccurrence(topk, C_r, layer.d_in)
            S = npmi(p_i, p_ij)
            labels = spectral_clusters(S, n_experts, layer.seed)
        figures: dict[str, Any] = {"cluster_labels": labels.tolist()}
        if c.mode != "random-clustering":
            sizes, means = cluster_summary(S, labels)
            figures["cluster_sizes"] = sizes
            figures["cluster_mean_npmi"] = [None if math.isnan(m) else m for m in means]
        else:
            figures["cluster_sizes"] = torch.bincount(labels, minlength=n_experts).tolist()
        return labels, figures

    def _assign_tokens(
        self, layer: LayerContext, X: torch.Tensor, C_r: torch.Tensor, labels: torch.Tensor, n_experts: int,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Expert per sample token (docs/method.md, routed experts) from scores recomputed in the original basis
        (``x = x̃ · s``); ``C_t`` from the statistics' stored top-k sets when they line up
        with the sample (:meth:`_stored_topk`), else recomputed."""
        importance = importance_of(layer, "qe")
        scale = layer.input_scale
        stored = self._stored_topk(layer, rows)
        out = torch.empty(X.shape[0], dtype=torch.long, device=X.device)
        for start in range(0, X.shape[0], SCORE_CHUNK):
            x = X[start : start + SCORE_CHUNK]
            x = x * scale.to(x) if scale is not None else x  # x = x̃ · s
            scores = importance.estimator.score(x, importance.channel_factor)
            if start == 0 and stored is not None and not _same_sets(scores, stored, importance.k):
                stored = None
            topk = stored[start : start + SCORE_CHUNK] if stored is not None else None
            out[start : start + SCORE_CHUNK] = token_expert_assignment(scores, C_r, labels, importance.k, n_experts, topk)
        return out

    @staticmethod
    def _stored_topk(layer: LayerContext, rows: torch.Tensor | None) -> torch.Tensor | None:
        """The stored top-k rows of the sample tokens, when positions and counts line up.

        The statistics keep every token's top-k set in stream order and the input statistics
        the sample's global positions; reusing them saves a top-k over ``T × d_in`` scores.
        """
        stats = layer.stats
        positions = stats.input.sample_positions if stats is not None and stats.input is not None else None
        importance = stats.importance if stats is not None else None
        if positions is None or importance is None or layer.tokens is None:
            return None
        topk = importance.topk
        if (positions.numel() != layer.tokens.shape[0] or topk.shape[0] != importance.n_tokens
                or positions.numel() == 0 or int(positions.max()) >= topk.shape[0]):
            return None
        positions = positions if rows is None else positions[rows.to(positions.device)]
        return topk[positions.long()]

    def _refine(self, layer, X, E_S, residual, F, A, B, R, e_sq):
        """Layer-wise refinement (docs/method.md, refinement); the refined factors replace the closed-form ones only if
        they lower the calibration residual objective under the router's choice."""
        c = self.config
        schedule = RefineSchedule(c.refine_epochs, c.refine_iterations, c.refine_lr, c.refine_kl_weight,
                                  c.refine_temperature, layer.seed)
        Y = residual.Y if residual.Y is not None else X @ E_S.T
        refined = refine_experts(X, Y, A, B, R, schedule, residual.routed_sq)
        e_sq2 = residual.routed_sq(refined.A, refined.B)
        before = residual.relative(_routed(e_sq, F, R))
        after = residual.relative(_routed(e_sq2, F, refined.R))
        kept = after < before
        figures = {"refine_residual_before": before, "refine_residual_after": after, "refine_kept": kept,
                   "refine_loss_first_epoch": refined.first_loss, "refine_loss_last_epoch": refined.last_loss}
        if kept:
            return refined.A, refined.B, refined.R, e_sq2, figures
        return A, B, R, e_sq, figures

    def _fit_router(self, layer: LayerContext, F: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Ridge least squares ``R`` ``(N, d_in)``: ``R |x̃_t| ≈ targets_t``, with μ = ridge ×
        the mean diagonal of the normal matrix ``FᵀF``.

        With fewer sample tokens ``T`` than input channels, the same solution comes from the
        dual system: ``(FᵀF + μI)⁻¹Fᵀ = Fᵀ(FFᵀ + μI)⁻¹``, so ``R = (Fᵀ (FFᵀ + μI)⁻¹ e)ᵀ`` from
        a ``T × T`` factor instead of a ``d_in × d_in`` one (at ``d_in`` = 8,192 and 1,024
        tokens: 8 MB instead of a 0.5 GB float64 factor and, while it is formed, a float32
        Gram). With ``router_ridge`` = 0 the dual system gives the minimum-norm fit, where the
        singular primal one is retried with a small ridge. The factor depends only on the
        tokens, so linears of one smoothing group (same token tensor) share it."""
        L = self._router_factor(layer, F)
        if _solved_dual(F):
            coefficients = torch.cholesky_solve(targets.double(), L)  # (T, N)
            return (coefficients.T @ F.double()).float()
        rhs = (targets.to(F.dtype).T @ F).T.double()  # (d_in, N) Fᵀe; this order reads F by rows (10× faster)
        return torch.cholesky_solve(rhs, L).T.float()

    def _router_factor(self, layer: LayerContext, F: torch.Tensor) -> torch.Tensor:
        """The Cholesky factor of the damped normal matrix of ``F`` ``(T, d_in)``: of ``FFᵀ``
        where :func:`_solved_dual`, else of ``FᵀF``."""
        tokens = layer.tokens
        key = (id(tokens), tuple(tokens.shape), F.shape[0], layer.seed, self.config.router_ridge)
        hit = self._router_cache.get(key)
        if hit is not None and hit[0]() is tokens and hit[1] == tokens._version:
            return hit[2]
        where = f"the router of {layer.name}"
        if _solved_dual(F):  # damped as the primal normal matrix is: mean(diag FᵀF) = ‖F‖² / d_in
            mean_diag = float(torch.linalg.vector_norm(F, dtype=torch.float64)) ** 2 / F.shape[1]
            L, _ = damped_gram_cholesky(F.T, self.config.router_ridge, where=where,
                                        scale=damping_scale(mean_diag))  # of FFᵀ
        else:
            L, _ = damped_gram_cholesky(F, self.config.router_ridge, where=where)  # of FᵀF
        try:
            ref = weakref.ref(tokens)
        except TypeError:
            return L
        # One group at a time; the factor may be d × d (0.5 GB in float64 at d = 8,192), so it
        # also goes with the group's tokens (the previous group's release is cancelled: its
        # entry is replaced here).
        self._router_cache.clear()
        if self._router_release is not None:
            self._router_release.detach()
        self._router_cache[key] = (ref, tokens._version, L)
        self._router_release = weakref.finalize(tokens, self._router_cache.clear)
        return L

    # ------------------------------------------------------------------ costs
    def budget_menu(self) -> tuple[dict[str, Any], ...]:
        return tuple({"shared_rank": r_s, "num_experts": n, "expert_rank": r_r} for r_s, n, r_r in BUDGET_SHAPES)

    def added_parameters(self, d_in: int, d_out: int) -> int:
        r_s, n, r_r = self._ranks(d_in, d_out)
        extra = d_out * d_in if self.config.mode == "oracle-routing" else 0  # E_S kept for the ablation
        return (r_s + n * r_r) * (d_in + d_out) + n * d_in + extra

    def flops_per_token(self, d_in: int, d_out: int) -> int:
        r_s, n, r_r = self._ranks(d_in, d_out)
        return (r_s + r_r) * (d_in + d_out) + n * d_in


# --------------------------------------------------------------------------- numerics


def fit_experts(
    E_S: torch.Tensor,
    X: torch.Tensor,
    assignment: torch.Tensor,
    num_experts: int,
    rank: int,
    damp: float,
    Y: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whitened rank-``rank`` fit of ``E_S`` per expert with ``H_i = Σ_{t ∈ T_i} x̃ x̃ᵀ`` (damped).

    Returns ``A (N, d_out, r)``, ``B (N, r, d_in)``; experts without tokens get zeros. Uses
    the smaller Gram per expert (see :mod:`qe.compensators.linalg`), batched over experts:

    * ``d_out ≤ d_in``: ``E_S H_i E_Sᵀ = Y_iᵀ Y_i + δ_i E_S E_Sᵀ`` with ``Y = X E_Sᵀ``
      (one product for all experts; ``Y`` may be passed in);
    * else ``H_i = X_iᵀ X_i + δ_i I``, Cholesky, ``L_iᵀ (E_SᵀE_S) L_i``.

    ``δ_i = damp · mean(diag H_i) = damp · ‖X_i‖²_F / d_in``. Tokens are sorted by expert
    once, so every ``X_iᵀ X_i`` (or ``Y_iᵀ Y_i``) is one product on a contiguous slice.
    """
    d_out, d_in = E_S.shape
    rank = min(rank, d_out, d_in)
    A = E_S.new_zeros(num_experts, d_out, rank)
    B = E_S.new_zeros(num_experts, rank, d_in)
    assignment = assignment.to(X.device)
    counts = torch.bincount(assignment, minlength=num_experts)[:num_experts].tolist()
    active = [i for i in range(num_experts) if counts[i] > 0]
    if not active or rank == 0:
        return A, B
    order = torch.argsort(assignment, stable=True)
    bounds = [0]
    for count in counts:
        bounds.append(bounds[-1] + count)
    token_sq = X.pow(2).sum(1).double()[order]
    sq_norms = {i: float(token_sq[bounds[i] : bounds[i + 1]].sum()) for i in active}
    deltas = torch.tensor([damp * sq_norms[i] / d_in if sq_norms[i] > 0 else damp for i in active],
                          dtype=torch.float64, device=E_S.device)
    Ed = E_S.double()
    if d_out <= d_in:
        Y_sorted = (X @ E_S.T if Y is None else Y)[order]  # (T, d_out)
        G = torch.stack([symmetric_gram(Y_sorted[bounds[i] : bounds[i + 1]]) for i in active])  # (n, d_out, d_out)
        G = G + deltas[:, None, None] * (Ed @ Ed.T)
        A_act, B_act = lowrank_from_output_gram(E_S, G, rank, eig_dtype=EXPERT_EIG_DTYPE, iterations=EXPERT_ITERATIONS)
    else:
        X_sorted = X[order]
        Ls = []
        for i, delta in zip(active, deltas.tolist()):
            if sq_norms[i] > 0:
                # the damping adds damp·mean(diag H_i) (= δ_i); retries raise it if needed.
                Ls.append(damped_gram_cholesky(X_sorted[bounds[i] : bounds[i + 1]], damp)[0])
            else:
                Ls.append(torch.eye(d_in, dtype=torch.float64, device=E_S.device) * math.sqrt(delta))
        A_act, B_act = lowrank_from_input_cholesky(
            E_S, torch.stack(Ls), rank, EtE=Ed.T @ Ed, eig_dtype=EXPERT_EIG_DTYPE, iterations=EXPERT_ITERATIONS
        )
    idx = torch.tensor(active, device=E_S.device)
    A[idx] = A_act.to(A.dtype)
    B[idx] = B_act.to(B.dtype)
    return A, B


class _Residuals:
    """Squared residual norms on the token sample ``X`` ``(T, d_in)``.

    ``‖E x̃_t‖²`` (uncompensated), ``‖E_S x̃_t‖²`` (after the shared expert) and
    ``e²_{t,i} = ‖(E_S − A_i B_i) x̃_t‖² = ‖E_S x̃_t‖² − 2 z·(A_iᵀ E_S x̃_t) + zᵀ(A_iᵀA_i)z``,
    ``z = B_i x̃_t``. ``A_iᵀ E_S x̃`` comes from ``Y = X E_Sᵀ`` when ``d_out ≤ d_in`` (``Y`` is
    kept for the expert fit too), else from ``(A_iᵀ E_S) x̃`` and ``‖E_S x̃‖² = x̃ᵀ(E_SᵀE_S)x̃``,
    whichever costs fewer products. No ``(T, d_out)`` temporaries per expert; the terms are
    combined in float64 (the residual keeps a large share of ``‖E_S x̃‖²``, so the cancellation
    costs little) and clamped at 0. ``E x̃ = E_S x̃ + A_s (B_s x̃)`` costs only the shared rank.
    """

    def __init__(self, X: torch.Tensor, E_S: torch.Tensor, A_s: torch.Tensor, B_s: torch.Tensor):
        d_out, d_in = E_S.shape
        self.X, self.E_S = X, E_S
        if d_out <= d_in:
            self.Y: torch.Tensor | None = X @ E_S.T  # (T, d_out)
            self.shared_sq = self.Y.pow(2).sum(1).double()
        else:
            self.Y = None
            self.shared_sq = ((X @ (E_S.T @ E_S)) * X).sum(1).double().clamp_min(0)
        if A_s.shape[1]:
            self.none_sq = self._expand(A_s[None], B_s[None], sign=1.0)[:, 0]
        else:
            self.none_sq = self.shared_sq
        self.total_none = float(self.none_sq.sum())

    def relative(self, per_token_sq: torch.Tensor) -> float:
        return float(per_token_sq.sum()) / self.total_none if self.total_none > 0 else 0.0

    def _project(self, A: torch.Tensor) -> torch.Tensor:
        """``A_iᵀ E_S x̃_t`` ``(T, N, r)`` for ``A`` ``(N, d_out, r)``."""
        N, d_out, r = A.shape
        T = self.X.shape[0]
        if self.Y is not None:
            return (self.Y @ A.transpose(0, 1).reshape(d_out, N * r)).reshape(T, N, r)
        C = (A.transpose(1, 2) @ self.E_S).reshape(N * r, -1)  # (N·r, d_in)
        return (self.X @ C.T).reshape(T, N, r)

    def _expand(self, A: torch.Tensor, B: torch.Tensor, sign: float) -> torch.Tensor:
        """``‖E_S x̃ + sign · A_i B_i x̃‖²`` ``(T, N)``."""
        N, _, r = A.shape
        T = self.X.shape[0]
        Z = (self.X @ B.reshape(N * r, -1).T).reshape(T, N, r)  # B_i x̃_t
        ZG = torch.einsum("tnr,nrs->tns", Z, A.transpose(1, 2) @ A)
        cross = (Z * self._project(A)).sum(2).double()
        quad = (ZG * Z).sum(2).double()
        return (self.shared_sq[:, None] + 2 * sign * cross + quad).clamp_min(0)

    def routed_sq(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``e²`` ``(T, N)`` for experts ``A (N, d_out, r)``, ``B (N, r, d_in)``."""
        return self._expand(A, B, sign=-1.0)


def _solved_dual(F: torch.Tensor) -> bool:
    """Whether the router's ridge system of ``F`` ``(T, d_in)`` is solved in its ``T × T`` dual
    form: with fewer sample tokens than input channels."""
    return F.shape[0] < F.shape[1]


def _routed(e_sq: torch.Tensor, F: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Each token's squared residual ``(T, 1)`` under the router ``R``'s choice."""
    return e_sq.gather(1, (F @ R.T).argmin(dim=1)[:, None])


def _routing_figures(F, R, e_sq, residual: _Residuals, assignment, n_experts) -> dict[str, Any]:
    router_choice = (F @ R.T).argmin(dim=1)
    oracle_choice = e_sq.argmin(dim=1)
    return {
        "residual_router": residual.relative(_routed(e_sq, F, R)),
        "residual_oracle": residual.relative(e_sq.gather(1, oracle_choice[:, None])),
        "router_agreement": float((router_choice == oracle_choice).double().mean()),
        "tokens_per_expert": torch.bincount(assignment, minlength=n_experts).tolist(),
        "router_tokens_per_expert": torch.bincount(router_choice, minlength=n_experts).tolist(),
    }


def _same_sets(scores: torch.Tensor, topk: torch.Tensor, k: int, check: int = 64) -> bool:
    """Do the stored top-k sets match the scores' on the first tokens (≥ 90% of them
    exactly; near-ties may flip with rounding of x̃·s)? Guards against a sample that is not
    the one the statistics saw."""
    n = min(check, scores.shape[0], topk.shape[0])
    if n == 0:
        return False
    fresh = scores[:n].topk(k, dim=1).indices.sort(dim=1).values
    stored = topk[:n].long().to(scores.device).sort(dim=1).values
    if stored.shape != fresh.shape:
        return False
    return float((fresh == stored).all(dim=1).double().mean()) >= 0.9


class _Clock:
    """Wall and CPU seconds per fit step (CPU time is the steadier figure on a shared machine)."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.cpu_start = self.cpu_last = time.process_time()
        self.laps: dict[str, float] = {}
        self.cpu_laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now, cpu_now = time.perf_counter(), time.process_time()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.last
        self.cpu_laps[name] = self.cpu_laps.get(name, 0.0) + cpu_now - self.cpu_last
        self.last, self.cpu_last = now, cpu_now

    def total(self) -> float:
        return time.perf_counter() - self.start

    def cpu_total(self) -> float:
        return time.process_time() - self.cpu_start
