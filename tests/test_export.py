"""qe export: the compressed-tensors base loads through transformers to qe's base model, the
PEFT LoRA adapter on it to qe's lowrank model and to qe's QE model without routed experts;
smoothing folds into the linear before; what the formats cannot express is refused in one line.

Tolerances: with A16 the decompressed weights equal qe's dequantized weights bit for bit and
the logits agree to 1e-5 (matmul order). With A8 compressed-tensors' reference activation
quantizer divides the per-token max by 127.5 and clamps to [-128, 127] where qe divides by 127
and clamps to ±127: the logits agree to 1e-5 once qe's quantizer is given that convention, and
to about 1% of the logits' range as they are.
"""

import json

import pytest
import torch

pytest.importorskip("compressed_tensors")
pytest.importorskip("peft")

import qe  # noqa: E402
from qe import cli  # noqa: E402
from qe.commands.quantize import run_quantize  # noqa: E402
from qe.compensators.base import Compensator, CompensatorModule  # noqa: E402
from qe.compensators.modules import QuantExpertsAdapter  # noqa: E402
from qe.errors import ConfigError, QEError  # noqa: E402
from qe.export.core import export_checkpoint  # noqa: E402
from qe.models.loading import load_model  # noqa: E402
from qe.plugins import QEPluginManager  # noqa: E402
from qe.quantizers.qlinear import QuantLinear  # noqa: E402
from qe.recipe import Recipe  # noqa: E402

IDS = torch.randint(3, 900, (2, 24), generator=torch.Generator().manual_seed(0))


def _quantize(tmp_path_factory, name, compensator, setting, manager=None):
    out = tmp_path_factory.mktemp(name) / "ckpt"
    loaded = load_model("tiny:llava")
    run_quantize(Recipe(quantizer="rtn", compensator=compensator, setting=setting, samples=2), out=out,
                 loaded=loaded, progress=False, manager=manager)
    return out


@pytest.fixture(scope="module")
def lowrank_w4a16(tmp_path_factory):
    return _quantize(tmp_path_factory, "lr16", "lowrank[rank=4]", "W4A16g32asym")


@pytest.fixture(scope="module")
def lowrank_w8a8(tmp_path_factory):
    return _quantize(tmp_path_factory, "lr8", "lowrank[rank=4]", "W8A8")


@pytest.fixture(scope="module")
def qe_w4a16(tmp_path_factory):
    # alphas=none: no smoothing, so o_proj (grouped-query attention) has nothing to fold
    return _quantize(tmp_path_factory, "qe16", "qe[k=4;num_experts=2;shared_rank=4;expert_rank=2;alphas=none]",
                     "W4A16g32sym")


def _logits(model):
    model = getattr(model, "model", model) if hasattr(model, "adapter") else model  # a LoadedModel
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _without_compensators(loaded):
    for m in loaded.model.modules():
        if isinstance(m, QuantLinear):
            m.compensator = None
    return loaded


def _hf(path, dequantize):
    from transformers import AutoModelForImageTextToText, CompressedTensorsConfig

    config = CompressedTensorsConfig(dequantize=dequantize)
    return AutoModelForImageTextToText.from_pretrained(path, quantization_config=config).eval()


def _peft(path, dequantize=True):
    """Base + adapter. A base left compressed decompresses on its first forward: PEFT needs the
    ``weight`` that this forward restores, so one runs before the adapter is attached."""
    from peft import PeftModel

    base = _hf(path, dequantize)
    if not dequantize:
        _logits(base)
    return PeftModel.from_pretrained(base, str(path / "lora")).eval()


# --------------------------------------------------------------------------- equality


def test_w4a16_base_and_lora_equal_qe(lowrank_w4a16, tmp_path):
    out, report = export_checkpoint(lowrank_w4a16, "peft-lora", tmp_path / "x")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    (group,) = config["config_groups"].values()
    assert group["weights"] == {**group["weights"], "num_bits": 4, "strategy": "group", "group_size": 32,
                                "symmetric": False}
    assert report["adapter"]["modules"] == 14 and set(report["adapter"]["ranks"].values()) == {4}
    assert (out / "qe_export.json").is_file() and (out / "lora" / "adapter_model.safetensors").is_file()

    # The decompressed weights are qe's dequantized weights, bit for bit.
    hf = _hf(out, dequantize=True)
    reference = qe.load_quantized(lowrank_w4a16)
    for name, ql in reference.model.named_modules():
        if isinstance(ql, QuantLinear):
            assert torch.equal(hf.get_submodule(name).weight.data, ql.dequantized_weight())
    torch.testing.assert_close(_logits(hf), _logits(_without_compensators(qe.load_quantized(lowrank_w4a16))),
                               atol=1e-5, rtol=0)
    # base + PEFT LoRA = qe's lowrank model
    torch.testing.assert_close(_logits(_peft(out)), _logits(reference.model), atol=1e-5, rtol=0)


def test_w8a8_int8_dynamic_tokens(lowrank_w8a8, tmp_path, monkeypatch):
    out, _ = export_checkpoint(lowrank_w8a8, "compressed-tensors", tmp_path / "x")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert group["format"] == "int-quantized"
    assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"]
    assert group["weights"]["strategy"] == "channel" and group["weights"]["num_bits"] == 8
    got = _logits(_hf(out, dequantize=False))  # compressed-tensors fake-quantizes the activations
    reference = _without_compensators(qe.load_quantized(lowrank_w8a8))
    as_is = _logits(reference.model)
    assert (got - as_is).abs().max() < 0.03 * as_is.abs().max()

    def ct_convention(x, bits, static_scale=None):  # compressed-tensors' reference: absmax / 127.5, [-128, 127]
        scale = (x.abs().amax(-1, keepdim=True) / ((2**bits - 1) / 2)).clamp_min(torch.finfo(x.dtype).eps)
        return (x / scale).round().clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale

    monkeypatch.setattr("qe.quantizers.qlinear.fake_quantize_activations", ct_convention)
    reference.model.apply(lambda m: setattr(m, "_dequantized", None) if isinstance(m, QuantLinear) else None)
    torch.testing.assert_close(got, _logits(reference.model), atol=1e-5, rtol=0)


def test_qe_shared_expert_as_lora_equals_qe_without_routed_experts(qe_w4a16, tmp_path):
    out, report = export_checkpoint(qe_w4a16, "peft-lora", tmp_path / "x", eval_tokens=512)
    ppl = report["perplexity"]
    assert ppl["with_routed_experts"] > 1 and ppl["without_routed_experts"] > 1 and ppl["tokens"] == 511
    assert any("routed" in n for n in report["notes"])
    assert all(d["num_experts"] == 2 for d in report["routed_experts_dropped"].values())
    reference = qe.load_quantized(qe_w4a16)
    for m in reference.model.modules():
        if isinstance(m, QuantExpertsAdapter):
            m.num_experts = 0  # the forward skips the routed experts and the router
    torch.testing.assert_close(_logits(_peft(out, dequantize=False)), _logits(reference.model), atol=1e-5, rtol=0)
    assert json.loads((out / "qe_export.json").read_text())["perplexity"] == ppl


def test_smoothing_folds_into_v_proj_and_up_proj(lowrank_w4a16, tmp_path):
    loaded = qe.load_quantized(lowrank_w4a16)
    gen = torch.Generator().manual_seed(1)
    block = "model.language_model.layers.0"
    down = loaded.model.get_submodule(f"{block}.mlp.down_proj")
    o = loaded.model.get_submodule(f"{block}.self_attn.o_proj")
    down.input_scale = torch.rand(down.in_features, generator=gen) + 0.5
    # 4 query heads share 2 key-value heads (head_dim 16): scales equal within each pair fold into v_proj
    o.input_scale = (torch.rand(2, 1, 16, generator=gen) + 0.5).expand(2, 2, 16).reshape(-1).clone()
    expected = _logits(loaded.model)
    out, report = export_checkpoint(lowrank_w4a16, "peft-lora", tmp_path / "x", loaded=loaded)
    assert report["folded"] == {f"{block}.mlp.down_proj": f"{block}.mlp.up_proj",
                                f"{block}.self_attn.o_proj": f"{block}.self_attn.v_proj"}
    torch.testing.assert_close(_logits(_peft(out)), expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- refusals


def _one_line(err):
    assert "\n" not in str(err.value)
    return str(err.value)


def test_unfoldable_smoothing_is_refused_naming_the_layer(lowrank_w4a16, tmp_path):
    loaded = qe.load_quantized(lowrank_w4a16)
    o = loaded.model.get_submodule("model.language_model.layers.1.self_attn.o_proj")
    o.input_scale = torch.linspace(0.5, 2, o.in_features)  # differs between heads sharing a kv head
    with pytest.raises(ConfigError, match=r"layers\.1\.self_attn\.o_proj: .*grouped-query") as err:
        export_checkpoint(lowrank_w4a16, "compressed-tensors", tmp_path / "x", loaded=loaded)
    _one_line(err)
    q = loaded.model.get_submodule("model.language_model.layers.1.self_attn.q_proj")
    o.input_scale = None
    q.input_scale = torch.ones(q.in_features)
    with pytest.raises(ConfigError, match=r"layers\.1\.self_attn\.q_proj: .*no linear") as err:
        export_checkpoint(lowrank_w4a16, "compressed-tensors", tmp_path / "x", loaded=loaded)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("change, words", [
    (lambda ql: setattr(ql, "a_bits", 6), "A6 activations"),
    (lambda ql: setattr(ql, "a_bits", 4), "A4 activations"),
    (lambda ql: (setattr(ql, "a_bits", 8), setattr(ql, "act_keep", torch.arange(ql.in_features) % 5 > 0)),
     "activation-exempt columns"),
    (lambda ql: setattr(ql, "group_size", 48), "group size 48 that does not divide the input width 64"),
])
def test_settings_the_format_cannot_express_are_refused(lowrank_w4a16, tmp_path, change, words):
    loaded = qe.load_quantized(lowrank_w4a16)
    change(loaded.model.get_submodule("model.language_model.layers.0.mlp.gate_proj"))
    with pytest.raises(ConfigError, match="layers.0.mlp.gate_proj: compressed-tensors cannot express") as err:
        export_checkpoint(lowrank_w4a16, "compressed-tensors", tmp_path / "x", loaded=loaded)
    message = _one_line(err)
    assert words in message and "it expresses W2-W8 integer weights" in message


def test_existing_out_and_unknown_format_are_refused(lowrank_w4a16, tmp_path, capsys):
    (tmp_path / "x").mkdir()
    with pytest.raises(QEError, match="exists"):
        export_checkpoint(lowrank_w4a16, "compressed-tensors", tmp_path / "x")
    with pytest.raises(ConfigError, match="unknown export format 'gguf'"):
        export_checkpoint(lowrank_w4a16, "gguf", tmp_path / "y")
    assert cli.main(["export", str(lowrank_w4a16), "--format", "compressed-tensors", "--out", str(tmp_path / "x"),
                     "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qe export: error: output directory") and "\n" not in err


def test_cli_writes_the_base(lowrank_w8a8, tmp_path, capsys):
    assert cli.main(["export", str(lowrank_w8a8), "--format", "compressed-tensors", "--out", str(tmp_path / "x"),
                     "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "int-quantized" in printed and "not in a compressed-tensors base" in printed
    assert (tmp_path / "x" / "model.safetensors").is_file() and not (tmp_path / "x" / "lora").exists()


# --------------------------------------------------------------------------- third-party compensator


class _SignCorrection(CompensatorModule):
    """Not a low-rank term: a per-output constant times the sign of the input's sum."""

    module_type = "test_sign_correction"

    def __init__(self, d_in, d_out):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.register_buffer("u", torch.zeros(d_out))

    def layout(self):
        return {"d_in": self.d_in, "d_out": self.d_out}

    @classmethod
    def from_layout(cls, layout):
        return cls(layout["d_in"], layout["d_out"])

    def forward(self, x):
        return torch.sign(x.sum(-1, keepdim=True)) * self.u.to(x.dtype)


class _Sign(Compensator):
    """A third party's compensator that is no low-rank term."""

    name = "sign"
    modules = (_SignCorrection,)

    def fit(self, layer, quantized, plan):
        m = _SignCorrection(layer.d_in, layer.d_out)
        m.u.copy_((layer.weight - quantized.dequantize()).mean(1))
        m.fit_figures = {}
        return m


class _SignPlugin:
    @qe.hookimpl
    def qe_compensators(self):
        return [_Sign]


def test_a_third_party_compensator_that_is_not_low_rank_is_refused(tmp_path_factory, tmp_path):
    manager = QEPluginManager(load_entry_points=False, extra_plugins=[_SignPlugin()])
    ckpt = _quantize(tmp_path_factory, "sign", "sign", "W4A16g32", manager=manager)
    with pytest.raises(ConfigError, match="'test_sign_correction' .* is not a fixed low-rank term") as err:
        export_checkpoint(ckpt, "peft-lora", tmp_path / "x", manager=manager)
    assert "export --format compressed-tensors" in _one_line(err)
    assert not (tmp_path / "x").exists()
    # the base alone exports
    _, report = export_checkpoint(ckpt, "compressed-tensors", tmp_path / "y", manager=manager)
    assert report["adapter"] is None and report["notes"]


def test_per_module_ranks_go_to_rank_pattern(lowrank_w4a16, tmp_path):
    from qe.compensators.modules import LowRankAdapter

    loaded = qe.load_quantized(lowrank_w4a16)
    name = "model.language_model.layers.1.self_attn.q_proj"
    ql = loaded.model.get_submodule(name)
    ql.compensator = LowRankAdapter.from_factors(ql.compensator.A[:, :2], ql.compensator.B[:2])
    expected = _logits(loaded.model)
    out, report = export_checkpoint(lowrank_w4a16, "peft-lora", tmp_path / "x", loaded=loaded)
    config = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] == {name: 2} and config["alpha_pattern"] == {name: 2}
    assert config["lora_dropout"] == 0 and report["adapter"]["ranks"][name] == 2
    torch.testing.assert_close(_logits(_peft(out)), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("setting, strategies", [
    ("W4A8", {"channel"}),  # int4 weights, int8 dynamic per-token activations
    ("W8A16chasym", {"channel"}),
    ("W3A16g32sym", {"group"}),
    ("W4A16g64sym", {"channel", "group"}),  # a group as wide as the row (64) is one scale per row
])
def test_other_settings_load_to_qe_weights(setting, strategies, tmp_path_factory, tmp_path):
    ckpt = _quantize(tmp_path_factory, setting, "none", setting)
    out, report = export_checkpoint(ckpt, "compressed-tensors", tmp_path / "x")
    groups = list(report["quantization_config"]["config_groups"].values())
    assert {g["weights"]["strategy"] for g in groups} == strategies
    assert {g["format"] for g in groups} == {"pack-quantized"}
    group = groups[0]
    reference = qe.load_quantized(ckpt)
    a8 = group["input_activations"] is not None
    hf = _hf(out, dequantize=not a8 and not group["weights"]["symmetric"])
    got = _logits(hf)  # the first forward decompresses a compressed base
    for name, ql in reference.model.named_modules():
        if isinstance(ql, QuantLinear):
            assert torch.equal(hf.get_submodule(name).weight.data, ql.dequantized_weight()), name
    expected = _logits(reference.model)
    if a8:
        assert (got - expected).abs().max() < 0.03 * expected.abs().max()
    else:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- the whole model through transformers


def test_transformers_from_pretrained_equals_load_quantized(qe_w4a16, tmp_path):
    from transformers import AutoModelForImageTextToText

    out, report = export_checkpoint(qe_w4a16, "transformers", tmp_path / "x")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "qe"
    hf = AutoModelForImageTextToText.from_pretrained(out)
    q = hf.get_submodule("model.language_model.layers.0.self_attn.q_proj")
    assert isinstance(q, QuantLinear) and isinstance(q.compensator, QuantExpertsAdapter)
    expected = _logits(qe.load_quantized(qe_w4a16))
    assert torch.equal(_logits(hf), expected)  # routed experts included
    assert torch.equal(_logits(qe.load_quantized(out)), expected)  # still a qe checkpoint


def test_import_qe_registers_the_method_before_transformers_loads(qe_w4a16, tmp_path):
    import subprocess
    import sys

    out, _ = export_checkpoint(qe_w4a16, "transformers", tmp_path / "x")
    code = ("import qe, sys; assert 'transformers.quantizers.auto' not in sys.modules; "
            "from transformers import AutoModelForImageTextToText as A; "
            f"m = A.from_pretrained({str(out)!r}); print(type(m.model.language_model.layers[0].mlp.up_proj).__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("QuantLinear")


def test_peft_lora_without_low_rank_terms_is_refused(tmp_path_factory, tmp_path):
    ckpt = _quantize(tmp_path_factory, "none", "none", "W4A16g32")
    with pytest.raises(ConfigError, match="no low-rank compensator term") as err:
        export_checkpoint(ckpt, "peft-lora", tmp_path / "x")
    _one_line(err)


def test_a_term_on_the_unsmoothed_input_divides_b_columns():
    from qe.export.lora import on_input
    from qe.export.plan import LowRankTerm

    gen = torch.Generator().manual_seed(2)
    A, B, x = torch.randn(6, 2, generator=gen), torch.randn(2, 5, generator=gen), torch.randn(3, 5, generator=gen)
    s = torch.rand(5, generator=gen) + 0.5
    term = on_input(LowRankTerm(A, B, "lowrank"), s)
    torch.testing.assert_close(x @ term.B.T @ term.A.T, (x / s) @ B.T @ A.T)
