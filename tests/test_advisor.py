"""qe analyze's advisor: input energy shares, the error model against real quantizers, the
advice, and the rank correlation it is checked with."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qe.analysis.advisor import ROUTING_PAYS, advise, energy_shares, error_model, input_model, spearman
from qe.quantized import fake_quantize_activations
from qe.quantizers.gptq import gptq_quantize
from qe.quantizers.grid import quantize_rtn
from qe.settings import parse_setting


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
    W = torch.randn(64, 96, generator=g)
    errors = error_model(W, input_model(X), parse_setting("W4A8"))
    a = advise(summary, energy, errors)
    assert a["rank"] == 16 and a["compensator"] == "qe" and a["routing"] > ROUTING_PAYS
    flat = advise({**summary, "clusters": {"mean_within_npmi": [-0.1]}}, energy, errors)
    assert flat["compensator"] == "lowrank"
    for base in ("rtn", "gptq"):
        assert 0 < flat["predicted_gain"][base] <= a["predicted_gain"][base] <= 1
    # Weights left in full precision: nothing to compensate.
    assert error_model(W, input_model(X), parse_setting("W16A8")) is None
    assert advise(summary, energy, None)["predicted_gain"] == {"rtn": 0.0, "gptq": 0.0}


def _layer(seed: int, d_in: int = 96, d_out: int = 128, tokens: int = 1024):
    """Inputs with an uneven spectrum and three outlier channels, and a weight."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) * torch.rand(d_in, generator=g).pow(4)
    X = torch.randn(tokens, d_in, generator=g) @ mix.T + 0.05 * torch.randn(tokens, d_in, generator=g)
    X[:, :3] *= 8
    return X, torch.randn(d_out, d_in, generator=g) * 0.05


def _measured(W, Q, X, rank=32):
    """Output-error energy per token of ``Q − W`` on ``X`` and the share of it a whitened rank-r term removes."""
    s2 = torch.linalg.svdvals((Q - W).double() @ X.double().T).pow(2)
    return float(s2.sum() / X.shape[0]), float(s2[:rank].sum() / s2.sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_error_model_predicts_what_rtn_gptq_and_activation_rounding_do(seed):
    """Reference comparison: the model's energies and rank-32 shares against quantizing for real."""
    X, W = _layer(seed)
    model = error_model(W, input_model(X), parse_setting("W4A8"), seed=seed)
    energy, share = _measured(W, quantize_rtn(W, 4, 0, True).dequantize(), X)
    assert model["rtn"]["weight_energy"] == pytest.approx(energy, rel=0.05)
    assert model["rtn"]["share"][32] == pytest.approx(share, abs=0.02)
    energy, share = _measured(W, gptq_quantize(W, (X.T @ X).double(), 4, 0, True, act_order=True).dequantize(), X)
    assert model["gptq"]["weight_energy"] == pytest.approx(energy, rel=0.1)
    assert model["gptq"]["share"][32] == pytest.approx(share, abs=0.03)
    # GPTQ's feedback leaves less error, and less of it in a few directions, than RTN.
    assert model["gptq"]["weight_energy"] < model["rtn"]["weight_energy"] / 5
    assert model["gptq"]["share"][32] < model["rtn"]["share"][32]
    activation = float(((fake_quantize_activations(X, 8) - X).double() @ W.double().T).pow(2).sum() / X.shape[0])
    assert model["gptq"]["activation_energy"] == pytest.approx(activation, rel=0.05)


@pytest.mark.parametrize("seed,exempt", [(0, [0, 1, 2, 10, 20]), (1, [0, 1, 2, 10, 20]),
                                         (2, list(range(1, 96, 3)))])  # a third of the channels, all through the order
def test_error_model_predicts_gptq_on_qes_base(seed, exempt):
    """Reference comparison on QE's base: the exempt columns' whole contribution, and GPTQ's
    rounding of the rest, against gptq_quantize with the same exempt channels."""
    X, W = _layer(seed)
    model = error_model(W, input_model(X), parse_setting("W4A8"), seed=seed, exempt=exempt)
    mask = torch.zeros(W.shape[1], dtype=torch.bool)
    mask[exempt] = True
    error = (gptq_quantize(W, (X.T @ X).double(), 4, 0, True, act_order=True, exempt=mask).dequantize() - W).double()
    kept = error * ~mask
    energy, share = _measured(kept, torch.zeros_like(kept), X)
    assert model["qe"]["weight_energy"] == pytest.approx(energy, rel=0.1)
    assert model["qe"]["share"][32] == pytest.approx(share, abs=0.03)
    exempt_energy = float(((error - kept) @ X.double().T).pow(2).sum() / X.shape[0])
    assert model["qe"]["exempt_energy"] == pytest.approx(exempt_energy, rel=1e-6)
    # Without its outlier channels the activation grid is finer.
    if {0, 1, 2} <= set(exempt):
        assert model["qe"]["activation_energy"] < model["gptq"]["activation_energy"] / 4
    assert "qe" not in error_model(W, input_model(X), parse_setting("W4A8"))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), a_bits=st.sampled_from([4, 5, 6, 7, 16]), w_bits=st.integers(2, 8),
       group=st.sampled_from([0, 8, 16]))
def test_error_model_fractions_and_shares_are_consistent(seed, a_bits, w_bits, group):
    X, W = _layer(seed, d_in=32, d_out=24, tokens=64)
    setting = parse_setting(f"W{w_bits}A{a_bits}g{group}" if group else f"W{w_bits}A{a_bits}ch")
    model = error_model(W, input_model(X), setting, ranks=(1, 4, 16, 64))
    for base in ("rtn", "gptq"):
        m = model[base]
        values = [m["share"][r] for r in (1, 4, 16, 64)]
        assert all(0 <= v <= 1 + 1e-9 for v in values) and values == sorted(values)
        assert values[-1] == pytest.approx(1.0)  # rank 64 ≥ min(d_out, d_in): everything
        assert m["weight_energy"] > 0
        assert m["weight_fraction"] == pytest.approx(m["weight_energy"] / (m["weight_energy"] + m["activation_energy"]))
        assert (m["activation_energy"] == 0) == (a_bits >= 16)
    # One more activation bit quarters the activation rounding's energy.
    if a_bits < 8:
        finer = error_model(W, input_model(X), parse_setting(setting.name.replace(f"A{a_bits}", f"A{a_bits + 1}", 1)))
        ratio = model["rtn"]["activation_energy"] / finer["rtn"]["activation_energy"]
        qmax = 2 ** (a_bits - 1) - 1
        assert ratio == pytest.approx(((2 * qmax + 1) / qmax) ** 2, rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(-5, 5), st.floats(-10, 10)), min_size=3, max_size=30))
def test_spearman_equals_scipy(pairs):
    from scipy.stats import spearmanr

    a, b = [float(p[0]) for p in pairs], [p[1] for p in pairs]
    if len(set(a)) < 2 or len(set(b)) < 2:
        return
    assert spearman(a, b) == pytest.approx(float(spearmanr(a, b).statistic), abs=1e-9)
