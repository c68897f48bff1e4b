"""qe quantize --budget: the allocation stays within the budget to the bit, is the knapsack
optimum, never gets worse with more budget, and impossible budgets are refused in one line."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qe.budget import LayerOptions, allocate
from qe.errors import ConfigError


@st.composite
def tables(draw, max_layers=5, max_options=4):
    layers = []
    for i in range(draw(st.integers(1, max_layers))):
        n = draw(st.integers(1, max_options))
        bits = draw(st.lists(st.integers(0, 5000), min_size=n, max_size=n))
        errors = draw(st.lists(st.floats(0, 1), min_size=n, max_size=n))
        layers.append(LayerOptions(f"l{i}", draw(st.integers(1, 4000)), draw(st.integers(0, 20000)),
                                   [f"o{j}" for j in range(n)], bits, errors))
    return layers


def _floor(layers):
    return sum(layer.base_bits + min(layer.bits) for layer in layers)


@settings(max_examples=60, deadline=None)
@given(layers=tables(), extra=st.integers(0, 30000), more=st.integers(0, 30000))
def test_allocation_fits_the_budget_and_more_budget_never_costs_error(layers, extra, more):
    total = _floor(layers) + extra
    a = allocate(layers, total)
    exact = sum(layer.base_bits + layer.bits[a.choice[layer.name]] for layer in layers)
    assert a.bits == exact <= total
    b = allocate(layers, total + more)
    assert b.bits <= total + more
    assert b.error <= a.error + 1e-12


@settings(max_examples=60, deadline=None)
@given(layers=tables(max_layers=4, max_options=3), extra=st.integers(0, 15000))
def test_allocation_is_the_brute_force_optimum(layers, extra):
    """Small tables (costs below the knapsack's unit limit): the exact optimum."""
    total = _floor(layers) + extra
    best = min(
        sum(layer.errors[j] for layer, j in zip(layers, combo))
        for combo in itertools.product(*[range(len(layer.bits)) for layer in layers])
        if sum(layer.base_bits + layer.bits[j] for layer, j in zip(layers, combo)) <= total
    )
    assert allocate(layers, total).error == pytest.approx(best, abs=1e-12)


def test_a_budget_below_the_cheapest_options_is_refused_naming_the_minimum():
    layers = [LayerOptions("a", 100, 400, ["x", "y"], [50, 90], [0.5, 0.2])]
    with pytest.raises(ConfigError, match=r"at least 4\.5000"):
        allocate(layers, 449)
    assert allocate(layers, 450).choice == {"a": 0}
    assert allocate(layers, 490).choice == {"a": 1}


@pytest.fixture(scope="module")
def tiny_loaded():
    from qe.models.loading import load_model

    return load_model("tiny:llava")


def _quantize(tiny_loaded, tmp_path, compensator, budget):
    import copy

    from qe.commands.quantize import run_quantize
    from qe.recipe import Recipe

    loaded = copy.deepcopy(tiny_loaded)
    recipe = Recipe(quantizer="rtn", compensator=compensator, setting="W4A8", samples=4)
    return run_quantize(recipe, out=tmp_path / f"b{budget}", loaded=loaded, progress=False, check_heldout=False,
                        adapter_dtype="float16", budget=budget)


def test_budget_end_to_end_is_within_budget_and_recorded(tiny_loaded, tmp_path):
    budget = 7.0
    path, manifest = _quantize(tiny_loaded, tmp_path, "lowrank[adapter_bits=8]", budget)
    b = manifest["budget"]
    bits = manifest["effective_bits"]
    assert b["within_budget"] and bits["bits"] <= budget * bits["weights"]
    assert b["bits"] == bits["bits"] and b["bits"] <= b["planned_bits"]
    assert len(b["allocation"]) == len(manifest["layers"])
    assert {a["option"] for a in b["allocation"].values()} <= {f"lowrank[adapter_bits=8;rank={r}]" for r in (8, 16, 32, 64)}
    # The allocation is what the checkpoint holds.
    for name, a in b["allocation"].items():
        layout = manifest["layouts"][name]["compensator"]["layout"]
        assert f"rank={layout['rank']}]" in a["option"] and layout["adapter_bits"] == 8


def test_impossible_budgets_and_compensators_are_refused_before_calibration(tiny_loaded, tmp_path):
    with pytest.raises(ConfigError, match="below the .* bits per weight of the base's codes"):
        _quantize(tiny_loaded, tmp_path, "lowrank", 3.5)
    with pytest.raises(ConfigError, match="use --compensator qe or lowrank"):
        _quantize(tiny_loaded, tmp_path, "none", 5.0)
    with pytest.raises(ConfigError, match="raise --budget to at least"):
        _quantize(tiny_loaded, tmp_path, "lowrank", 4.01)


def test_qe_budget_allocates_ranks_and_experts_and_more_budget_lowers_the_planned_error(tiny_loaded, monkeypatch):
    import copy

    import qe.compensators.quant_experts as qe_module

    # Four options of the menu's kinds (shared only; routed), one too wide for the 64-wide model.
    monkeypatch.setattr(qe_module, "BUDGET_SHAPES", ((8, 0, 1), (16, 0, 1), (8, 2, 4), (128, 0, 1)))
    from qe.budget import allocate, plan_budget
    from qe.composition import resolve_composition
    from qe.data.calibration import calibration_set
    from qe.pipeline import PipelineOptions

    loaded = copy.deepcopy(tiny_loaded)
    composition = resolve_composition("rtn", "qe[k=4;adapter_bits=8]", "W4A8")
    _, encoded = calibration_set(loaded, None, 2)
    plan = plan_budget(loaded, composition, encoded, 9.0, PipelineOptions(progress=False))
    assert all(len(layer.specs) == 3 for layer in plan.layers)  # rank 128 dropped on the 64-wide model
    weights = sum(layer.weights for layer in plan.layers)
    errors = [allocate(plan.layers, int(b * weights)).error for b in (7.5, 8.0, 9.0, 12.0)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0]
    assert plan.allocation.bits <= 9.0 * weights
    chosen = {plan.layers[i].specs[plan.allocation.choice[layer.name]] for i, layer in enumerate(plan.layers)}
    assert all(s.startswith("qe[k=4;adapter_bits=8;shared_rank=") for s in chosen)


def test_planning_leaves_the_model_as_it_was(tiny_loaded):
    """Each block is measured on a copy of its own: the planned model's tensors are unchanged."""
    import copy

    import torch

    from qe.budget import plan_budget
    from qe.composition import resolve_composition
    from qe.data.calibration import calibration_set
    from qe.pipeline import PipelineOptions

    loaded = copy.deepcopy(tiny_loaded)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    _, encoded = calibration_set(loaded, None, 2)
    plan = plan_budget(loaded, resolve_composition("rtn", "lowrank[adapter_bits=8]", "W4A8"), encoded, 7.0,
                       PipelineOptions(progress=False))
    assert plan.layers
    after = loaded.model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_budget_on_an_offloaded_model_equals_the_in_memory_run(tmp_path, same_checkpoint_tensors):
    from qe.commands.quantize import run_quantize
    from qe.models import tiny
    from qe.models.loading import load_model
    from qe.models.offload import is_offloaded
    from qe.recipe import Recipe

    path = str(tiny.tiny_model_dir("llava"))
    recipe = Recipe(quantizer="rtn", compensator="lowrank[adapter_bits=8]", setting="W4A8", samples=4)
    ref_dir, ref = run_quantize(recipe, path, out=tmp_path / "ref", progress=False, check_heldout=False, budget=7.0)
    off = load_model(path, device_map=tiny.LLAVA_BLOCKS_ON_DISK, offload_folder=tmp_path / "offload")
    assert is_offloaded(off.adapter.decoder_blocks(off.model)[0])
    off_dir, manifest = run_quantize(recipe, out=tmp_path / "off", progress=False, loaded=off, check_heldout=False,
                                     budget=7.0)
    assert manifest["budget"]["allocation"] == ref["budget"]["allocation"]
    same_checkpoint_tensors(ref_dir, off_dir)


def test_a_budget_with_a_rotation_on_an_offloaded_model_is_refused_in_one_line(tmp_path):
    from qe.commands.quantize import run_quantize
    from qe.models import tiny
    from qe.models.loading import load_model
    from qe.recipe import Recipe

    path = str(tiny.tiny_model_dir("llava"))
    off = load_model(path, device_map=tiny.LLAVA_BLOCKS_ON_DISK, offload_folder=tmp_path / "offload")
    recipe = Recipe(transform="rotate", quantizer="rtn", compensator="lowrank", setting="W4A8", samples=4)
    with pytest.raises(ConfigError, match="changes the whole model") as info:
        run_quantize(recipe, out=tmp_path / "q", progress=False, loaded=off, check_heldout=False, budget=7.0)
    assert "\n" not in str(info.value) and not (tmp_path / "q").exists()


def test_a_compensator_that_reads_no_data_is_refused_before_calibration(tiny_loaded, tmp_path, monkeypatch):
    """A budget's options are measured by fitting them; a compensator that declares it reads no
    calibration data (a third-party one, say) cannot be planned, and is refused in one line."""
    from qe.compensators.lowrank import LowRankCompensator

    monkeypatch.setattr(LowRankCompensator, "needs_calibration", lambda self: False)
    with pytest.raises(ConfigError, match="reads none") as info:
        _quantize(tiny_loaded, tmp_path, "lowrank", 7.0)
    assert "\n" not in str(info.value) and not (tmp_path / "b7.0").exists()
