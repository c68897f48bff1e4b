"""qe analyze's advisor: input energy shares, the advice, and the rank correlation it is checked with."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qe.analysis.advisor import ROUTING_PAYS, advise, energy_shares, spearman


@settings(max_examples=30, deadline=None)
@given(T=st.integers(2, 80), d=st.integers(2, 60), seed=st.integers(0, 1000))
def test_energy_shares_match_the_singular_values_and_grow_with_rank(T, d, seed):
    X = torch.randn(T, d, generator=torch.Generator().manual_seed(seed))
    shares = energy_shares(X, (1, 2, 4, 8, 300))
    s2 = torch.linalg.svdvals(X.double()).pow(2)
    for r, v in shares.items():
        assert v == pytest.approx(float(s2[:r].sum() / s2.sum()), rel=1e-9, abs=1e-12)
    values = list(shares.values())
    assert values == sorted(values) and values[-1] == pytest.approx(1.0)


def test_planted_low_rank_inputs_ask_for_that_rank():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 16, generator=g) @ torch.randn(16, 96, generator=g)  # rank 16
    energy = energy_shares(X)
    assert energy[16] == pytest.approx(1.0) and energy[8] < 0.95
    summary = {"clusters": {"mean_within_npmi": [0.6, 0.5]}, "token_dependent_share": 0.5,
               "outliers": {"top_max_over_median": [[3, 40.0]]}}
    a = advise(summary, energy)
    assert a["rank"] == 16 and a["compensator"] == "qe" and a["routing"] > ROUTING_PAYS
    flat = advise({**summary, "clusters": {"mean_within_npmi": [-0.1]}}, energy)
    assert flat["compensator"] == "lowrank" and flat["predicted_gain"] <= a["predicted_gain"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(-5, 5), st.floats(-10, 10)), min_size=3, max_size=30))
def test_spearman_equals_scipy(pairs):
    from scipy.stats import spearmanr

    a, b = [float(p[0]) for p in pairs], [p[1] for p in pairs]
    if len(set(a)) < 2 or len(set(b)) < 2:
        return
    assert spearman(a, b) == pytest.approx(float(spearmanr(a, b).statistic), abs=1e-9)
