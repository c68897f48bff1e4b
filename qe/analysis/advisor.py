"""Per-layer advice from the streamed statistics alone: which compensator pays, and how much rank.

No weight is quantized and nothing is fitted. The figures:

* ``energy``: the share of the sampled inputs' energy ``Σ_t ‖x_t‖²`` in their top-r principal
  directions, per rank r. A whitened rank-r fit of a weight error ``E`` minimises
  ``Σ_t ‖(E − A B) x_t‖²``; for a rounding error close to independent noise (round to nearest)
  it removes about that share of the error, so it predicts the low-rank term's relative gain;
* ``routing``: the token-dependent share of top-k memberships times the routed clusters'
  mean within-cluster NPMI (clamped at 0): how much per-token structure routed experts could
  use beyond one shared term;
* ``outlier``: ``log10`` of the largest max/median magnitude ratio of a channel.

From them: ``predicted_gain`` (the layer's predicted relative error reduction by a rank-``r_ref``
term plus a routing bonus, the figure the layers are ranked by), ``compensator`` (``qe`` where
routing is above :data:`ROUTING_PAYS`, else ``lowrank``) and ``rank`` (the smallest rank whose
energy share reaches :data:`ENERGY_TARGET`). ``benchmarks/equal_bits.py --advisor CELL`` checks
the ranking against the per-layer error reduction a quantization measures (Spearman,
docs/results.md, equal bits): it holds for a round-to-nearest base, whose error is close to
independent noise, and not for GPTQ's, whose error feedback already shaped the error against
the inputs (there the ranking is a weak prior).
"""

from __future__ import annotations

import math
from typing import Any

import torch

ADVISOR_RANKS = (8, 16, 32, 64, 128, 256)
ENERGY_TOKENS = 1024  # sampled tokens the spectrum is computed from (a uniform random draw)
ENERGY_TARGET = 0.8  # share of the input energy the advised rank should capture
ROUTING_PAYS = 0.05  # routing figure above which routed experts are advised
R_REF = 32  # the rank predicted_gain refers to (QE's default shared and expert rank)


def energy_shares(sample: torch.Tensor, ranks: tuple[int, ...] = ADVISOR_RANKS) -> dict[int, float]:
    """Share of ``Σ_t ‖x_t‖²`` in the top-r principal directions of ``sample`` ``(T, d_in)`` (uncentred),
    per rank (ranks above ``min(T, d_in)`` get 1)."""
    X = sample[:ENERGY_TOKENS].double()
    if X.numel() == 0:
        return {r: float("nan") for r in ranks}
    G = X @ X.T if X.shape[0] <= X.shape[1] else X.T @ X  # the smaller Gram: same nonzero spectrum
    values = torch.linalg.eigvalsh(G).flip(0).clamp_min(0)
    total = float(values.sum())
    cum = values.cumsum(0)
    return {r: (float(cum[min(r, cum.numel()) - 1]) / total if total > 0 else 0.0) for r in ranks}


def advise(summary: dict[str, Any], energy: dict[int, float]) -> dict[str, Any]:
    """The advice of one layer from its summary (:func:`qe.analysis.analyze.summarize_linear`)
    and its inputs' :func:`energy_shares`."""
    within = [w for w in summary["clusters"]["mean_within_npmi"] if isinstance(w, float) and w == w]
    npmi = max(0.0, sum(within) / len(within)) if within else 0.0
    routing = summary["token_dependent_share"] * npmi
    ratios = summary["outliers"]["top_max_over_median"]
    outlier = math.log10(max(ratios[0][1], 1.0)) if ratios else 0.0
    base = energy.get(R_REF, float("nan"))
    # The routed experts add per-token rank on top of the shared term: bonus up to the energy
    # a second rank-r_ref block would add, scaled by how routable the layer is.
    more = energy.get(2 * R_REF, base)
    predicted = base + min(1.0, routing / ROUTING_PAYS / 4) * max(0.0, more - base)
    rank = next((r for r in ADVISOR_RANKS if energy[r] >= ENERGY_TARGET), ADVISOR_RANKS[-1])
    return {
        "energy": {str(r): v for r, v in energy.items()},
        "routing": routing,
        "outlier": outlier,
        "predicted_gain": predicted,
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
