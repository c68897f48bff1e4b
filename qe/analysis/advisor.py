"""Per-layer advice from the streamed statistics (and the layer's own weights): which compensator
pays, and how much rank.

Nothing is quantized and nothing is fitted. The figures:

* ``energy``: the share of the sampled inputs' energy ``Σ_t ‖x_t‖²`` in their top-r principal
  directions, per rank r; ``rank`` is the smallest rank whose share reaches :data:`ENERGY_TARGET`;
* ``routing``: the token-dependent share of top-k memberships times the routed clusters'
  mean within-cluster NPMI (clamped at 0): how much per-token structure routed experts could
  use beyond one shared term; ``compensator`` is ``qe`` where it reaches :data:`ROUTING_PAYS`;
* ``outlier``: ``log10`` of the largest max/median magnitude ratio of a channel;
* ``predicted_gain``: per base quantizer (``rtn``, ``gptq``), the predicted relative reduction of
  the layer's output error by a whitened rank-``r_ref`` term (plus a routing bonus), from a
  model of that quantizer's error (:func:`error_model`). Layers are ranked by it.

The error model. A weight's rounding error is modelled as independent noise ``r``, uniform within
the entry's grid step ``s`` (variance ``s²/12``, steps from the setting's grid, without GPTQ's
clip search). A whitened rank-r fit of an error ``ΔW`` removes the top-r share of the energy of
``ΔW X`` (``X`` the sampled inputs). Round to nearest leaves ``ΔW = r``. GPTQ (act order, damping
λ) feeds each column's rounding error forward to the columns after it: ``ΔW = r D`` in its
order, with ``D = diag(U)⁻¹ U`` and ``H_damped⁻¹ = UᵀU`` (``U`` upper); the output energy of
``r D`` is ``r D H Dᵀ rᵀ``, and ``D H Dᵀ = diag(U)⁻² − λ D Dᵀ``. Its error is smaller than round
to nearest's and spread over more directions, so a low-rank term removes less of it. On QE's
base, GPTQ quantizes only the channels that are not exempt (its Hessian restricted to them);
the exempt columns' whole contribution is error the shared expert restores. Each share is
estimated from one seeded draw of the noise. Per-token activation rounding adds an error
``W δx`` of energy ``‖W‖²_F · s_t²/12`` per token that no low-rank term removes; the gain is
scaled by the weight error's part of the total.
``benchmarks/equal_bits.py --advisor CELL`` checks the ranking against measured reductions
(Spearman, docs/results.md, equal bits).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from qe.gram import symmetric_gram
from qe.quantizers.grid import column_groups, group_params
from qe.settings import QuantSetting

ADVISOR_RANKS = (8, 16, 32, 64, 128, 256)
ENERGY_TOKENS = 1024  # sampled tokens the spectrum is computed from (evenly spaced over the sample)
ERROR_TOKENS = 8192  # sampled tokens the error model's second moment is computed from
ENERGY_TARGET = 0.8  # share of the input energy the advised rank should capture
ROUTING_PAYS = 0.05  # routing figure above which routed experts are advised
R_REF = 32  # the rank predicted_gain refers to (QE's default shared and expert rank)
BASES = ("rtn", "gptq")  # the base quantizers the error model predicts for
GPTQ_DAMP = 0.01  # GPTQ's default damping, as a share of the mean diagonal


def energy_shares(sample: torch.Tensor, ranks: tuple[int, ...] = ADVISOR_RANKS) -> dict[int, float]:
    """Share of ``Σ_t ‖x_t‖²`` in the top-r principal directions of ``sample`` ``(T, d_in)`` (uncentred),
    per rank (ranks above ``min(T, d_in)`` get 1)."""
    X = _spread(sample, ENERGY_TOKENS).double()
    if X.numel() == 0:
        return {r: float("nan") for r in ranks}
    return _top_shares(X @ X.T if X.shape[0] <= X.shape[1] else X.T @ X, ranks)  # the smaller Gram: same nonzero spectrum


def _spread(sample: torch.Tensor, n: int) -> torch.Tensor:
    """At most ``n`` rows of ``sample``, evenly spaced (the sample is in stream order: a prefix
    would read the first samples only)."""
    if sample.shape[0] <= n:
        return sample
    return sample[torch.linspace(0, sample.shape[0] - 1, n).round().long()]


@dataclass(frozen=True)
class ErrorMetric:
    """The output energy of a weight error built from rounding noise ``r``: ``r[:, columns] ·
    matrix · r[:, columns]ᵀ`` (``matrix`` in the order of ``columns``)."""

    columns: torch.Tensor
    matrix: torch.Tensor

    @functools.cached_property
    def factor(self) -> torch.Tensor:
        """``F`` with ``F Fᵀ`` the ``matrix`` (computed once, for the tall weights that need it)."""
        values, vectors = torch.linalg.eigh(self.matrix)
        return vectors * values.clamp_min(0).sqrt()

    def error_gram(self, N: torch.Tensor) -> torch.Tensor:
        """A matrix with the nonzero eigenvalues of ``N K Nᵀ`` (``N`` the noise in ``columns``'
        order, ``K`` the ``matrix``), on the smaller side: ``N K Nᵀ`` for a short ``N``,
        ``(N F)ᵀ (N F)`` for a tall one."""
        if N.shape[0] <= N.shape[1]:
            return N @ self.matrix @ N.T
        M = N @ self.factor
        return M.T @ M


def gptq_metric(H: torch.Tensor, damp: float = GPTQ_DAMP, columns: torch.Tensor | None = None) -> ErrorMetric:
    """GPTQ's :class:`ErrorMetric` for the second moment ``H`` (float64) of the channels
    ``columns`` (default: all): act order (decreasing second moment), damping ``damp`` (a share
    of the mean diagonal), and ``D H Dᵀ`` with ``D = diag(U)⁻¹ U``, ``H_damped⁻¹ = UᵀU`` in that
    order: GPTQ turns a row of rounding errors ``r`` (in order) into the weight error ``r D``."""
    diag = H.diagonal()
    order = torch.argsort(diag, descending=True, stable=True)
    P = H[order[:, None], order]
    lam = damp * float(diag.mean()) + 1e-12  # the epsilon keeps an all-zero input factorable
    P.diagonal().add_(lam)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(P)), upper=True)
    D = U / U.diagonal()[:, None]
    # D H Dᵀ = D (H_damped − λI) Dᵀ = diag(U)⁻² − λ D Dᵀ, since U H_damped Uᵀ = I: one product, not two.
    metric = D @ D.T
    metric.mul_(-lam).diagonal().add_(U.diagonal().pow(-2))
    # The products that follow run in float32: a prediction needs no more, at half the time.
    return ErrorMetric(columns=order if columns is None else columns[order], matrix=metric.float())


@dataclass(frozen=True)
class InputModel:
    """What the error model needs from one input (shared by the linears that read it, q/k/v):
    its ``second_moment`` ``H = E[x xᵀ]`` (float64), the :class:`ErrorMetric` of round to
    nearest (``rtn``, ``H`` itself) and of GPTQ (``gptq``), and the sampled ``tokens``
    ``(T, d_in)``, whose magnitudes set each token's activation step."""

    second_moment: torch.Tensor
    rtn: ErrorMetric
    gptq: ErrorMetric
    tokens: torch.Tensor

    def gptq_without(self, kept: torch.Tensor) -> ErrorMetric:
        """GPTQ's metric when only the ``kept`` channels (a boolean mask) are quantized: exempt
        channels neither take nor pass on its error feedback."""
        columns = kept.nonzero().flatten()
        return gptq_metric(self.second_moment[columns[:, None], columns], columns=columns)


def input_model(sample: torch.Tensor, damp: float = GPTQ_DAMP) -> InputModel:
    """The :class:`InputModel` of the sampled inputs ``(T, d_in)`` (at most
    :data:`ERROR_TOKENS` of them, evenly spaced), with GPTQ's damping ``damp``."""
    X = _spread(sample, ERROR_TOKENS).float()
    H = symmetric_gram(X).div_(max(X.shape[0], 1))  # float32 products: a prediction needs no more
    return InputModel(second_moment=H, rtn=ErrorMetric(columns=torch.arange(H.shape[0]), matrix=H.float()),
                      gptq=gptq_metric(H, damp), tokens=X)


def _top_shares(gram: torch.Tensor, ranks: tuple[int, ...]) -> dict[int, float]:
    """Share of the trace of the positive semi-definite ``gram`` in its top-r eigenvalues, per rank."""
    values = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).double()  # float64 sums: shares stay within [0, 1]
    total, cum = float(values.sum()), values.cumsum(0)
    return {r: (float(cum[min(r, cum.numel()) - 1]) / total if total > 0 else 0.0) for r in ranks}


def error_model(weight: torch.Tensor, inputs: InputModel, setting: QuantSetting, seed: int = 0,
                ranks: tuple[int, ...] = (R_REF, 2 * R_REF),
                exempt: list[int] | None = None) -> dict[str, dict[str, Any]] | None:
    """Per base quantizer (:data:`BASES`, and ``qe`` when ``exempt`` channels are given):
    ``share`` (per rank r, the share of the weight error's output energy a whitened rank-r term
    removes), the expected output-error energy per token of the weight rounding
    (``weight_energy``) and of the activation rounding (``activation_energy``), and
    ``weight_fraction``, the former's part of their sum, for ``weight`` ``(d_out, d_in)``
    quantized with ``setting`` on the inputs ``inputs`` describes (the module docstring derives
    them). ``qe`` is GPTQ on QE's base: the ``exempt`` channels (QE's shared channels) leave
    the weight and activation grids and their columns' whole contribution is the error the
    shared expert restores (``exempt_energy``; ``weight_energy`` is the rest's). None when the
    setting leaves the weights in full precision."""
    if not setting.quantizes_weights:
        return None
    W = weight.detach().to("cpu", torch.float32)
    d_in = W.shape[1]
    kept = torch.ones(d_in, dtype=torch.bool)
    if exempt:
        kept[torch.as_tensor(exempt, dtype=torch.long)] = False
    noise = torch.randn(W.shape, generator=torch.Generator().manual_seed(seed))
    metrics = {"rtn": inputs.rtn, "gptq": inputs.gptq}
    if exempt:
        metrics["qe"] = inputs.gptq_without(kept)
    magnitudes = inputs.tokens.abs()
    out = {}
    for base, metric in metrics.items():
        on_qe_base = base == "qe"
        base_weight = W * kept if on_qe_base else W
        scales, _ = group_params(base_weight, setting.w_bits, setting.symmetric, setting.group_size)
        variance = (scales[:, column_groups(d_in, setting.group_size)].pow(2) / 12)[:, metric.columns]
        N = noise[:, metric.columns] * variance.sqrt()
        # E‖ΔW x‖² over the noise and the tokens: Σ_ij var_ij K_jj.
        weight_energy = float((variance.double() @ metric.matrix.diagonal().double()).sum())
        activation_energy = 0.0
        if setting.quantizes_activations and inputs.tokens.numel():
            absmax = (magnitudes * kept if on_qe_base else magnitudes).amax(dim=1)
            steps = absmax.double() / (2 ** (setting.a_bits - 1) - 1)  # the per-token grid's step
            activation_energy = float(base_weight.double().pow(2).sum()) * float((steps.pow(2) / 12).mean())
        total = weight_energy + activation_energy
        out[base] = {"share": _top_shares(metric.error_gram(N), ranks), "weight_energy": weight_energy,
                     "activation_energy": activation_energy,
                     "weight_fraction": weight_energy / total if total > 0 else 0.0}
        if on_qe_base:
            E = W.double()[:, ~kept]
            H = inputs.second_moment[~kept][:, ~kept]
            out[base]["exempt_energy"] = float(((E @ H) * E).sum())
    return out


def advise(summary: dict[str, Any], energy: dict[int, float],
           errors: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """The advice of one layer from its summary (:func:`qe.analysis.analyze.summarize_linear`),
    its inputs' :func:`energy_shares` and its :func:`error_model` (None: nothing is quantized,
    nothing to gain)."""
    within = [w for w in summary["clusters"]["mean_within_npmi"] if isinstance(w, float) and w == w]
    npmi = max(0.0, sum(within) / len(within)) if within else 0.0
    routing = summary["token_dependent_share"] * npmi
    ratios = summary["outliers"]["top_max_over_median"]
    outlier = math.log10(max(ratios[0][1], 1.0)) if ratios else 0.0
    # The routed experts add per-token rank on top of the shared term: a bonus up to what a
    # second rank-r_ref block would remove, scaled by how routable the layer is.
    routable = min(1.0, routing / ROUTING_PAYS / 4)
    predicted = {}
    for base in BASES + (("qe",) if errors and "qe" in errors else ()):
        if errors is None:
            predicted[base] = 0.0
            continue
        e = errors[base]
        share = e["share"]
        gain = share[R_REF] + routable * max(0.0, share[2 * R_REF] - share[R_REF])
        if base == "qe":  # the shared expert restores the exempt columns; experts fit the rest
            total = e["exempt_energy"] + e["weight_energy"] + e["activation_energy"]
            predicted[base] = (e["exempt_energy"] + gain * e["weight_energy"]) / total if total > 0 else 0.0
        else:
            predicted[base] = gain * e["weight_fraction"]
    rank = next((r for r in ADVISOR_RANKS if energy[r] >= ENERGY_TARGET), ADVISOR_RANKS[-1])
    return {
        "energy": {str(r): v for r, v in energy.items()},
        "routing": routing,
        "outlier": outlier,
        "predicted_gain": predicted,
        "weight_fraction": {base: errors[base]["weight_fraction"] for base in BASES} if errors else None,
        "compensator": "qe" if routing >= ROUTING_PAYS else "lowrank",
        "rank": rank,
    }


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN with fewer than 2 pairs or a constant side."""
    pairs = [(x, y) for x, y in zip(a, b) if x == x and y == y]
    if len(pairs) < 2:
        return float("nan")

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for m in range(i, j + 1):
                out[order[m]] = (i + j) / 2
            i = j + 1
        return out

    ra, rb = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va > 0 and vb > 0 else float("nan")
