"""Quant Experts: the ``qe`` plugin, its fit and the routed adapter module."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from qe.analysis.estimators import ActWeight
from qe.analysis.statistics import ImportanceStats, InputStats, LinearStats
from qe.checkpoint import compensator_module
from qe.compensators.base import LayerContext
from qe.compensators.modules import QuantExpertsAdapter
from qe.compensators.quant_experts import QuantExperts, QuantExpertsConfig
from qe.errors import ConfigError, DataError
from qe.plugins import QEPluginManager, default_manager
from qe.quantizers.grid import quantize_rtn
from qe.settings import parse_setting


def planted_inputs(d_in, T, n_groups, seed):
    """Tokens with a few always-large channels and per-token groups of large channels."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(d_in, generator=g)
    X = torch.randn(T, d_in, generator=g)
    X[:, perm[:4]] *= 8  # token-independent outliers
    group_of = torch.randint(n_groups, (T,), generator=g)
    groups = perm[4 : 4 + 6 * n_groups].reshape(n_groups, 6)
    boost = torch.ones(T, d_in)
    boost.scatter_(1, groups[group_of], 4.0)
    return X * boost


def make_layer(d_in=48, d_out=24, T=1200, seed=0, k=4, n_groups=3, weight=None, X=None, input_scale=None, name="blk.0.q_proj"):
    X = planted_inputs(d_in, T, n_groups, seed) if X is None else X
    T = X.shape[0]
    W = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed + 7)) * 0.05 if weight is None else weight
    est = ActWeight()
    inp = InputStats(d_in, sample_positions=torch.arange(T))
    imp = ImportanceStats(d_in, k, est.prepare(W), est)
    modality = torch.zeros(T, dtype=torch.int8)
    inp.update(X, modality, 0)
    imp.update(X, modality, 0)
    stats = LinearStats(name, inp, imp)
    tokens, W_s, H = X, W, inp.xtx
    if input_scale is not None:  # the smoothed basis: x̃ = x / s, W̃ = W·diag(s)
        tokens, W_s = X / input_scale, W * input_scale
        H = H / input_scale.double()[:, None] / input_scale.double()[None, :]
    return LayerContext(name, 0, W_s, None, parse_setting("W4A8"), stats, hessian=H, tokens=tokens,
                        token_modality=modality, input_scale=input_scale, seed=seed)


def fit(layer, bits=3, **config):
    comp = QuantExperts(QuantExpertsConfig(**{"k": 4, "num_experts": 3, "shared_rank": 4, "expert_rank": 3, **config}))
    comp.validate_layer(layer.name, layer.d_in, layer.d_out)
    plan = comp.plan(layer)
    q = quantize_rtn(layer.weight, bits, 0, True, plan.exempt)
    return comp, plan, q, comp.fit(layer, q, plan)


def calibration_objective(layer, q, module, **kwargs):
    """Σ_t ‖E x̃_t − module(x̃_t)‖² on the layer's tokens."""
    E = layer.weight - q.dequantize()
    X = layer.tokens
    out = module.forward_with_assignment(X, kwargs["assignment"]) if "assignment" in kwargs else module(X)
    return float((X @ E.T - out).double().pow(2).sum())


# --------------------------------------------------------------------------- sanity properties (docs/method.md)


def test_exempt_columns_are_absorbed_exactly_when_nothing_else_errs():
    d_in, d_out = 48, 20
    g = torch.Generator().manual_seed(1)
    # every weight on the 4-bit grid (codes ±7, one step per row): only exemption leaves error
    steps = torch.rand(d_out, 1, generator=g) + 0.5
    W = torch.where(torch.rand(d_out, d_in, generator=g) < 0.5, -7.0, 7.0) * steps / 100
    layer = make_layer(d_in, d_out, weight=W, seed=1)
    _, plan, q, m = fit(layer, bits=4, shared_rank=4, k=4)
    E = layer.weight - q.dequantize()
    assert plan.exempt.sum() == 4
    assert torch.equal(E[:, ~plan.exempt], torch.zeros(d_out, d_in - 4))  # nothing else carries error
    assert E[:, plan.exempt].abs().min() > 0
    assert m.fit_figures["residual_shared"] < 1e-9
    assert torch.allclose(m.shared(layer.tokens), layer.tokens @ E.T, atol=1e-5 * float((layer.tokens @ E.T).abs().max()))


def test_no_routed_experts_equals_shared_only():
    layer = make_layer()
    _, plan_a, q_a, a = fit(layer, num_experts=0)
    _, plan_b, q_b, b = fit(layer, num_experts=3, mode="shared-only")
    assert torch.equal(plan_a.exempt, plan_b.exempt) and torch.equal(q_a.codes, q_b.codes)
    assert a.num_experts == b.num_experts == 0
    assert torch.equal(a.A_s, b.A_s) and torch.equal(a.B_s, b.B_s)
    assert torch.equal(a(layer.tokens), b(layer.tokens))
    assert a.fit_figures["residual_shared"] == b.fit_figures["residual_shared"]


@settings(max_examples=8)
@given(seed=st.integers(0, 10_000), d_out=st.sampled_from([24, 64]), rounds=st.integers(0, 2))
def test_oracle_routing_is_never_worse_than_the_router(seed, d_out, rounds):
    layer = make_layer(d_out=d_out, seed=seed, T=600)
    _, _, q, router = fit(layer, alternation_rounds=rounds)
    _, _, _, oracle = fit(layer, alternation_rounds=rounds, mode="oracle-routing")
    figs = router.fit_figures
    assert figs["residual_oracle"] <= figs["residual_router"] * (1 + 1e-12)
    assert torch.equal(router.A, oracle.A) and torch.equal(router.R, oracle.R)
    assert oracle.E_S is not None
    r_obj = calibration_objective(layer, q, router)
    o_obj = calibration_objective(layer, q, oracle)
    assert o_obj <= r_obj * (1 + 1e-5)
    # the figures agree with the module's forward
    total = float((layer.tokens @ (layer.weight - q.dequantize()).T).double().pow(2).sum())
    assert r_obj / total == pytest.approx(figs["residual_router"], rel=1e-3, abs=1e-9)
    assert o_obj / total == pytest.approx(figs["residual_oracle"], rel=1e-3, abs=1e-9)


def test_alternation_never_raises_the_router_objective():
    layer = make_layer(d_out=30, seed=5, T=800)
    base = fit(layer)[3].fit_figures
    alt = fit(layer, alternation_rounds=3)[3].fit_figures
    assert alt["residual_router"] <= base["residual_router"] * (1 + 1e-12)
    assert 0 <= alt["alternation_rounds_kept"] <= 3


def test_qe_improves_on_its_shared_expert_on_planted_data():
    layer = make_layer(d_out=40, seed=3)
    figs = fit(layer)[3].fit_figures
    assert figs["residual_router"] < figs["residual_shared"] < figs["residual_none"] == 1.0
    assert sum(figs["tokens_per_expert"]) == sum(figs["router_tokens_per_expert"]) == layer.tokens.shape[0]
    json.dumps(figs)  # the figures go to the manifest as they are


# --------------------------------------------------------------------------- the routed module


@settings(max_examples=20)
@given(T=st.integers(0, 24), n=st.integers(1, 4), r=st.integers(1, 3), r_s=st.integers(0, 3),
       bits=st.sampled_from([8, 16]), seed=st.integers(0, 999))
def test_grouped_forward_equals_per_token_reference(T, n, r, r_s, bits, seed):
    d_in, d_out = 7, 5
    g = torch.Generator().manual_seed(seed)
    m = QuantExpertsAdapter(d_in, d_out, r_s, n, r, input_bits=bits)
    for buf in (m.A_s, m.B_s, m.A, m.B):
        buf.copy_(torch.randn(buf.shape, generator=g))
    m.R.copy_(torch.rand(n, d_in, generator=g))
    m.R[-1] += 100.0  # the last expert never wins: an expert without tokens
    x = torch.randn(T, d_in, generator=g)
    y = m(x)
    from qe.quantized import fake_quantize_activations

    xb = fake_quantize_activations(x, bits) if bits < 16 else x
    for t in range(T):
        i = int((m.R @ xb[t].abs()).argmin())
        assert i != n - 1 or n == 1
        ref = m.A_s @ (m.B_s @ xb[t]) + m.A[i] @ (m.B[i] @ xb[t])
        assert torch.allclose(y[t], ref, atol=1e-4)
    # explicit assignment, including experts left empty
    assignment = torch.randint(n, (T,), generator=g) if n > 1 else torch.zeros(T, dtype=torch.long)
    y2 = m.forward_with_assignment(x, assignment)
    for t in range(T):
        i = int(assignment[t])
        assert torch.allclose(y2[t], m.A_s @ (m.B_s @ xb[t]) + m.A[i] @ (m.B[i] @ xb[t]), atol=1e-4)
    # leading dimensions are kept
    assert m(x.reshape(1, T, d_in)).shape == (1, T, d_out)


def test_random_routing_is_seeded_and_spreads_tokens():
    m = QuantExpertsAdapter(6, 4, 0, 4, 2, routing="random", seed=3)
    x = torch.randn(400, 6)
    a, b = m.route(x), m.route(x)
    assert torch.equal(a, b)
    counts = torch.bincount(a, minlength=4)
    assert counts.min() > 60
    assert not torch.equal(a, QuantExpertsAdapter(6, 4, 0, 4, 2, routing="random", seed=4).route(x))


@pytest.mark.parametrize("mode", ["full", "oracle-routing", "random-routing"])
def test_layout_and_safetensors_round_trip(tmp_path, mode):
    layer = make_layer(seed=2, T=500)
    _, _, _, m = fit(layer, mode=mode)
    path = tmp_path / "qe.safetensors"
    save_file(m.state_dict(), str(path))
    fresh = compensator_module("layer", {"module": m.module_type, "layout": json.loads(json.dumps(m.layout()))}, default_manager().compensator_modules())
    fresh.load_state_dict(load_file(str(path)))
    assert torch.equal(fresh(layer.tokens), m(layer.tokens))


# --------------------------------------------------------------------------- plan, modes, inputs


def test_plan_exempts_the_token_independent_channels():
    layer = make_layer()
    _, plan, _, _ = fit(layer)
    C_s = plan.info["token_independent"]
    assert torch.equal(plan.exempt.nonzero().flatten(), C_s.sort().values)
    assert torch.equal(plan.act_exempt, plan.exempt)
    assert plan.info["token_dependent"].numel() == 12
    _, plan_r, _, routed = fit(layer, mode="routed-only")
    assert plan_r.exempt is None and plan_r.act_exempt is None
    assert routed.shared_rank == 0 and routed.fit_figures["residual_shared"] == 1.0
    assert routed.fit_figures["residual_router"] < 1.0


def test_random_clustering_uses_equal_groups():
    layer = make_layer()
    figs = fit(layer, mode="random-clustering")[3].fit_figures
    assert figs["cluster_sizes"] == [4, 4, 4]
    assert "cluster_mean_npmi" not in figs  # no co-occurrence was computed


def test_token_scores_use_the_original_basis_when_smoothed():
    X = planted_inputs(48, 600, 3, 4)
    s = torch.rand(48) + 0.5
    plain = make_layer(X=X, seed=4)
    smooth = make_layer(X=X, seed=4, input_scale=s)
    comp = QuantExperts(QuantExpertsConfig(k=4, num_experts=3))
    C_r = comp.plan(plain).info["token_dependent"]
    labels = torch.arange(12) % 3
    a = comp._assign_tokens(plain, plain.tokens, C_r, labels, 3)
    b = comp._assign_tokens(smooth, smooth.tokens, C_r, labels, 3)
    assert (a == b).double().mean() > 0.999  # x̃·s reproduces x up to rounding


def test_stored_top_k_sets_are_used_only_when_they_match_the_sample():
    layer = make_layer(T=600, seed=6)
    comp = QuantExperts(QuantExpertsConfig(k=4, num_experts=3))
    C_r = comp.plan(layer).info["token_dependent"]
    labels = torch.arange(12) % 3
    stored = comp._stored_topk(layer, None)
    assert stored is not None and torch.equal(stored, layer.stats.importance.topk)
    rows = torch.tensor([5, 17, 300])
    assert torch.equal(comp._stored_topk(layer, rows), layer.stats.importance.topk[rows])
    # a sample that is not the one the statistics saw: the stored sets are not used
    other = make_layer(T=600, seed=7)
    swapped = LayerContext(layer.name, 0, layer.weight, None, layer.setting, layer.stats, hessian=layer.hessian,
                           tokens=other.tokens, seed=6)
    importance = layer.stats.importance
    scores = importance.estimator.score(other.tokens, importance.channel_factor)
    from qe.analysis.channels import token_expert_assignment

    expected = token_expert_assignment(scores, C_r, labels, 4, 3)
    assert torch.equal(comp._assign_tokens(swapped, other.tokens, C_r, labels, 3), expected)


def test_router_factor_is_shared_by_a_smoothing_group():
    layer = make_layer(T=500)
    comp = QuantExperts(QuantExpertsConfig(k=4, num_experts=3, shared_rank=4, expert_rank=3))
    F = layer.tokens.abs()
    L1 = comp._router_factor(layer, F)
    assert comp._router_factor(layer, F) is L1  # same token tensor: cached
    other = make_layer(T=500, seed=9)
    assert comp._router_factor(other, other.tokens.abs()) is not L1


def test_router_factor_is_released_with_its_group():
    """A d × d factor is kept for one group at a time: replaced by the next group's while the
    first group's tokens are still alive, and dropped when its own group's tokens go."""
    import gc
    import weakref

    comp = QuantExperts(QuantExpertsConfig(k=4, num_experts=3, shared_rank=4, expert_rank=3))
    first, second = make_layer(T=300), make_layer(T=300, seed=9)
    L1 = weakref.ref(comp._router_factor(first, first.tokens.abs()))
    L2 = weakref.ref(comp._router_factor(second, second.tokens.abs()))
    gc.collect()
    assert L1() is None and L2() is not None  # first's tokens alive, its factor gone
    del second
    gc.collect()
    assert L2() is None and not comp._router_cache


def test_max_tokens_subsamples():
    layer = make_layer(T=700)
    figs = fit(layer, max_tokens=300)[3].fit_figures
    assert figs["tokens"] == 300 and sum(figs["tokens_per_expert"]) == 300


# --------------------------------------------------------------------------- bad input


def test_bad_configs_and_shapes():
    pm = QEPluginManager(load_entry_points=False)
    cfg = pm.resolve("compensator", "qe[alphas=none/0.25/0.5;num_experts=4;mode=oracle-routing]").config
    assert cfg.alphas == (None, 0.25, 0.5) and cfg.num_experts == 4
    assert QuantExperts(cfg).smoothing_candidates() == (None, 0.25, 0.5)
    assert QuantExperts(cfg).importance_k() == 32
    assert pm.resolve("compensator", "qe[refine=true;refine_epochs=2]").config.refine
    for spec, match in (("qe[refine=true;mode=shared-only]", "has none"), ("qe[refine=true;num_experts=0]", "has none"),
                        ("qe[refine=true;mode=oracle-routing]", "does not use"), ("qe[refine_epochs=0]", "at least 1"),
                        ("qe[refine_lr=0]", "must be positive")):
        with pytest.raises(ConfigError, match=match):
            pm.resolve("compensator", spec)
    with pytest.raises(ConfigError, match="outside"):
        pm.resolve("compensator", "qe[alphas=1.5]")
    with pytest.raises(ConfigError, match="choose one of"):
        pm.resolve("compensator", "qe[mode=best]")
    with pytest.raises(ConfigError, match="num_experts ≤ 17"):
        QuantExperts().validate_layer("blk.0.k_proj", 576, 192) or QuantExperts(QuantExpertsConfig(num_experts=18)).validate_layer("blk.0.k_proj", 576, 192)
    with pytest.raises(ConfigError, match="exceeds the input width 64"):
        QuantExperts().validate_layer("tiny", 64, 64)


def test_missing_statistics_are_reported():
    layer = make_layer(T=300)
    comp = QuantExperts(QuantExpertsConfig(k=4, num_experts=3))
    plan = comp.plan(layer)
    q = quantize_rtn(layer.weight, 4, 0, True, plan.exempt)
    no_tokens = LayerContext(layer.name, 0, layer.weight, None, layer.setting, layer.stats, hessian=layer.hessian)
    with pytest.raises(DataError, match="sample of the calibration inputs"):
        comp.fit(no_tokens, q, plan)
    no_stats = LayerContext(layer.name, 0, layer.weight, None, layer.setting, None)
    with pytest.raises(ConfigError, match="importance statistics"):
        comp.plan(no_stats)


def test_costs():
    comp = QuantExperts()
    assert comp.added_parameters(576, 1536) == (32 + 8 * 32) * (576 + 1536) + 8 * 576
    assert comp.flops_per_token(576, 1536) == 64 * (576 + 1536) + 8 * 576
    assert QuantExperts(QuantExpertsConfig(mode="shared-only")).added_parameters(576, 576) == 32 * 1152


def test_a_shared_rank_below_k_exempts_only_the_columns_it_can_carry():
    """Exempt columns reach the output only through the shared expert: with r_s < k the plan
    exempts the r_s most important channels, and that beats exempting all k (what it did
    before: a rank-3 shared expert left 29 of SmolLM2's 32 most important columns unserved)."""
    from qe.compensators.base import LayerPlan

    layer = make_layer(k=8, seed=3)
    comp, plan, q, module = fit(layer, bits=3, k=8, num_experts=2, shared_rank=2)
    C_s = plan.info["token_independent"]
    assert C_s.numel() == 8 and int(plan.exempt.sum()) == 2 and plan.exempt[C_s[:2]].all()
    assert torch.equal(plan.act_exempt, plan.exempt)
    everything = LayerPlan.exempting(layer.d_in, C_s, C_s.numel(), plan.info)
    q_all = quantize_rtn(layer.weight, 3, 0, True, everything.exempt)
    module_all = comp.fit(layer, q_all, everything)
    assert calibration_objective(layer, q, module) < calibration_objective(layer, q_all, module_all)
    # No shared expert: nothing is exempt.
    no_shared = QuantExperts(QuantExpertsConfig(k=8, num_experts=2, shared_rank=0, expert_rank=3))
    assert no_shared.plan(layer).exempt is None


@settings(max_examples=20, deadline=None)
@given(T=st.integers(8, 60), extra=st.integers(1, 80), ridge=st.sampled_from([1e-3, 1e-1, 1.0]), seed=st.integers(0, 10**6))
def test_router_fit_with_fewer_tokens_than_channels_is_the_primal_ridge_solution(T, extra, ridge, seed):
    """Below d_in tokens the router is solved in its dual form; it must be the primal ridge
    solution ``(FᵀF + μI)⁻¹Fᵀe`` with μ = ridge × mean diag(FᵀF), computed here directly."""
    d_in = T + extra
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, d_in, generator=g)
    layer = LayerContext("blk.0.q_proj", 0, torch.randn(4, d_in, generator=g), None, parse_setting("W4A8"), None,
                         tokens=X, seed=0)
    F, targets = X.abs(), torch.rand(T, 3, generator=g)
    R = QuantExperts(QuantExpertsConfig(router_ridge=ridge))._fit_router(layer, F, targets)
    normal = F.double().T @ F.double()
    mu = ridge * float(normal.diagonal().mean())
    expected = torch.linalg.solve(normal + mu * torch.eye(d_in, dtype=torch.float64), F.double().T @ targets.double()).T
    assert R.shape == (3, d_in)

    def objective(R):  # the ridge objective the router minimizes
        return float((F.double() @ R.T - targets.double()).pow(2).sum() + mu * R.pow(2).sum())

    # Both Grams are formed from float32 products, so R agrees to the conditioning of the
    # system; the objective, flat at its minimum, agrees far more closely.
    assert objective(R.double()) <= objective(expected) * (1 + 1e-6)
    torch.testing.assert_close(R.double(), expected, rtol=1e-2, atol=1e-3 * float(expected.abs().max()))


def test_router_with_fewer_tokens_than_channels_holds_no_channel_square_matrix(matrices_held):
    """The dual router fit allocates T × T and T × d_in matrices, not d_in × d_in ones: fitting
    from 200 tokens at d_in = 2,000 raises the memory high-water mark by well under one d × d
    float64 matrix (the primal fit took 2.4: the Gram and its factor)."""
    setup = """
from qe.compensators.quant_experts import QuantExperts, QuantExpertsConfig
from qe.compensators.base import LayerContext
from qe.settings import parse_setting

def run(W, H):
    X = torch.randn(min(200, W.shape[1] - 1), W.shape[1], generator=torch.Generator().manual_seed(1))
    layer = LayerContext("blk.0.q_proj", 0, W, None, parse_setting("W4A8"), None, tokens=X, seed=0)
    QuantExperts(QuantExpertsConfig())._fit_router(layer, X.abs(), torch.rand(X.shape[0], 4))
"""
    assert matrices_held(setup, 2000) < 0.3


def test_router_from_an_all_zero_sample_with_fewer_tokens_than_channels_is_zero():
    """An all-zero sample has no normal-matrix diagonal to scale the ridge by: the dual fit, like
    the primal one, damps by the ridge alone and fits R = 0 rather than failing."""
    X = torch.zeros(8, 16)
    layer = LayerContext("blk.0.q_proj", 0, torch.randn(4, 16), None, parse_setting("W4A8"), None, tokens=X, seed=0)
    R = QuantExperts(QuantExpertsConfig())._fit_router(layer, X.abs(), torch.rand(8, 3))
    assert R.shape == (3, 16) and torch.equal(R, torch.zeros(3, 16))
