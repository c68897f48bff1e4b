"""adapter_bits: compensator factors stored and run in 16, 8 or 4 bits, fitted for it, counted
exactly, and reloaded from a checkpoint to the same model."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import qe
from qe.checkpoint import effective_bits, layer_storage_bits, quantized_layers
from qe.compensators.factor_bits import refit_left
from qe.compensators.modules import LowRankAdapter, QuantExpertsAdapter, round_factor
from qe.errors import ConfigError
from qe.gram import damped
from qe.plugins import default_manager
from qe.quantized import dequantize_symmetric, quantize_symmetric


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 40), bits=st.sampled_from([4, 8]), dim=st.sampled_from([-1, -2]),
       seed=st.integers(0, 10_000), spread=st.floats(1e-4, 1e3))
def test_symmetric_factor_error_is_at_most_half_a_step(rows, cols, bits, dim, seed, spread):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * spread
    codes, scale = quantize_symmetric(w, bits, dim)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 2**bits
    err = (dequantize_symmetric(codes, scale, bits) - w).abs()
    assert bool((err <= scale / 2 * (1 + 1e-5) + 1e-30).all())  # one step per slice along dim


@settings(max_examples=25, deadline=None)
@given(d_in=st.integers(1, 24), d_out=st.integers(1, 24), rank=st.integers(0, 6), experts=st.integers(0, 3),
       bits=st.sampled_from([32, 16, 8, 4]))
def test_storage_bytes_are_exact_and_factors_round_trip(d_in, d_out, rank, experts, bits):
    m = QuantExpertsAdapter(d_in, d_out, rank, experts, max(rank, 1), adapter_bits=bits)
    g = torch.Generator().manual_seed(d_in * 31 + d_out)
    values = {n: torch.randn(*m._factors[n][0], generator=g) for n in ("A_s", "B_s", "A", "B", "R")}
    for n, v in values.items():
        stored = m.set_factor(n, v)
        assert torch.equal(stored, m.factor(n))
        assert torch.equal(stored, round_factor(v, bits, m._factors[n][1]))
    # Bytes: one per int8 code, 4 · ⌈c / 8⌉ per row of c int4 codes, a float32 step per rank
    # component and factor.
    expected = 0
    for shape, dim in m._factors.values():
        numel = torch.Size(shape).numel()
        if bits >= 16:
            expected += numel * bits // 8
        else:  # stored with the step dimension last: A transposed
            stored = shape if dim == -1 else (*shape[:-2], shape[-1], shape[-2])
            rows = torch.Size(stored[:-1]).numel()
            codes_per_row = stored[-1] if bits == 8 else 4 * -(-stored[-1] // 8)
            expected += rows * codes_per_row + 4 * rows
    assert m.storage_bytes() == expected
    # A module rebuilt from its layout and state dict is the same module.
    twin = QuantExpertsAdapter.from_layout(m.layout())
    twin.load_state_dict(m.state_dict())
    for n in values:
        assert torch.equal(twin.factor(n), m.factor(n))


def test_adapter_bits_is_checked():
    with pytest.raises(ConfigError, match="adapter_bits"):
        default_manager().resolve("compensator", "qe[adapter_bits=7]")
    with pytest.raises(ConfigError, match="adapter_bits"):
        default_manager().resolve("compensator", "lowrank[adapter_bits=2]")
    assert LowRankAdapter.layout_problem({"d_in": 4, "d_out": 4, "rank": 2, "adapter_bits": 5}, 4, 4)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), rank=st.integers(1, 5))
def test_refit_is_the_least_squares_optimum_for_the_stored_b(seed, rank):
    g = torch.Generator().manual_seed(seed)
    E, X = torch.randn(10, 12, generator=g), torch.randn(40, 12, generator=g)
    H = X.T.double() @ X.double()
    Hd = damped(H, 0.01)
    B_q = round_factor(torch.randn(rank, 12, generator=g), 8, -1)
    A = refit_left(E, H, B_q, 0.01)

    def objective(A_):
        R = (E.double() - A_.double() @ B_q.double())
        return float(torch.trace(R @ Hd @ R.T))

    best = objective(A)
    for _ in range(5):
        assert objective(A + 1e-3 * torch.randn(A.shape, generator=g)) >= best * (1 - 1e-9)


@pytest.mark.parametrize("spec", ["lowrank[rank=6;adapter_bits={}]",
                                  "qe[k=4;num_experts=3;shared_rank=4;expert_rank=3;adapter_bits={}]"])
def test_int8_adapters_cost_little_and_refit_beats_rounding(spec):
    """The stored int8 pair is close to the float fit, and (low-rank) at least as good as rounding
    both float factors without the refit."""
    from qe.quantizers.grid import quantize_rtn

    ctx = _layer()
    comp32 = default_manager().create("compensator", spec.format(32))
    comp8 = default_manager().create("compensator", spec.format(8))
    plan = comp32.plan(ctx)
    q = quantize_rtn(ctx.weight, 3, 0, True, plan.exempt)
    m32, m8 = comp32.fit(ctx, q, plan), comp8.fit(ctx, q, plan)
    E = ctx.weight - q.dequantize()
    X = ctx.tokens

    def err(module):
        return float(((X @ E.T) - module(X)).pow(2).sum() / (X @ E.T).pow(2).sum())

    e32, e8 = err(m32), err(m8)
    assert e32 < 0.9 and e8 <= e32 + 0.02 * (1 - e32)
    m4 = default_manager().create("compensator", spec.format(4)).fit(ctx, q, plan)
    e4 = err(m4)
    assert e8 <= e4 < e32 + 0.25 * (1 - e32)  # 16 levels: more error than 256, still most of the fit's gain
    if isinstance(m32, LowRankAdapter):
        for bits, e in ((8, e8), (4, e4)):
            naive = LowRankAdapter.from_factors(m32.A, m32.B, adapter_bits=bits)
            assert e <= err(naive) + 1e-6
    assert m8.storage_bytes() < m32.storage_bytes() / 3
    assert m4.storage_bytes() < 0.6 * m8.storage_bytes()


def _layer():
    """A 48→24 layer with outlier and grouped input channels, its statistics and tokens."""
    from qe.analysis.estimators import ActWeight
    from qe.analysis.statistics import ImportanceStats, InputStats, LinearStats
    from qe.compensators.base import LayerContext
    from qe.settings import parse_setting

    g = torch.Generator().manual_seed(0)
    d_in, d_out, T = 48, 24, 1500
    X = torch.randn(T, d_in, generator=g)
    X[:, :4] *= 8
    group_of = torch.randint(3, (T,), generator=g)
    boost = torch.ones(T, d_in)
    boost.scatter_(1, (4 + torch.arange(18).reshape(3, 6))[group_of], 4.0)
    X = X * boost
    W = torch.randn(d_out, d_in, generator=g) * 0.05
    est = ActWeight()
    inp = InputStats(d_in, sample_positions=torch.arange(T))
    imp = ImportanceStats(d_in, 4, est.prepare(W), est)
    modality = torch.zeros(T, dtype=torch.int8)
    inp.update(X, modality, 0)
    imp.update(X, modality, 0)
    return LayerContext("blk.0.q_proj", 0, W, None, parse_setting("W3A16"), LinearStats("blk.0.q_proj", inp, imp),
                        hessian=inp.xtx, tokens=X, token_modality=modality)


@pytest.fixture(scope="module", params=[8, 4])
def int8_checkpoint(tmp_path_factory, request):
    from qe.commands.quantize import run_quantize
    from qe.models.loading import load_model
    from qe.recipe import Recipe

    out = tmp_path_factory.mktemp("q8") / "ckpt"
    loaded = load_model("tiny:llava")
    recipe = Recipe(quantizer="rtn",
                    compensator=f"qe[k=4;num_experts=2;shared_rank=4;expert_rank=4;adapter_bits={request.param}]",
                    setting="W4A8", samples=4)
    path, manifest = run_quantize(recipe, out=out, loaded=loaded, progress=False, adapter_dtype="bfloat16",
                                  check_heldout=False)
    return loaded, path, manifest


def test_int8_checkpoint_reloads_to_equal_logits(int8_checkpoint):
    from qe.data.calibration import calibration_set

    loaded, path, manifest = int8_checkpoint
    reloaded = qe.load_quantized(path)
    _, encoded = calibration_set(loaded, None, 2)
    with torch.no_grad():
        for e in encoded:
            assert torch.equal(loaded.model(**e.inputs).logits, reloaded.model(**e.inputs).logits)
    layouts = [v["compensator"]["layout"] for v in manifest["layouts"].values() if v["compensator"]]
    assert layouts and len({lay["adapter_bits"] for lay in layouts}) == 1 and layouts[0]["adapter_bits"] in (8, 4)


def test_bits_accounting_equals_the_bytes_on_disk(int8_checkpoint):
    """The manifest's all-in bits are the bytes of the quantized linears' tensors in the shard
    (--adapter-dtype bfloat16 leaves int8 factors and their float32 steps alone)."""
    loaded, path, manifest = int8_checkpoint
    layers = quantized_layers(loaded.model)
    on_disk = 0
    with safe_open(str(path / manifest["shards"][0]), "pt") as f:
        for key in f.keys():
            if any(key.startswith(name + ".") for name in layers):
                on_disk += 8 * f.get_tensor(key).numel() * f.get_tensor(key).element_size()
    bits = manifest["effective_bits"]
    assert bits["bits"] == on_disk
    assert bits["bits"] == sum(sum(layer_storage_bits(q, torch.bfloat16)) for q in layers.values())
    assert effective_bits(loaded.model, torch.bfloat16)["bits"] == on_disk
    assert json.loads((path / "qe_manifest.json").read_text())["effective_bits"]["bits"] == on_disk


def test_lora_export_dequantizes_int8_factors_exactly(int8_checkpoint, tmp_path):
    from qe.export.plan import lowrank_term

    loaded, _, _ = int8_checkpoint
    for name, ql in quantized_layers(loaded.model).items():
        term = lowrank_term(name, ql)
        assert term is not None and torch.equal(term.A, ql.compensator.factor("A_s"))
        break
