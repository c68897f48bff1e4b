"""qe quantize: checkpoints reload to the same model, resume gives the same tensors, bad input
is refused with one line."""

import json
from pathlib import Path

import pytest
import torch

import qe
from qe.commands.quantize import partial_dir, run_quantize
from qe.errors import ConfigError, ModelError, QEError
from qe.models.loading import load_model
from qe.plugins import QEPluginManager
from qe.recipe import LayerOverride, Recipe, load_recipe


def _logits(loaded, encoded):
    with torch.no_grad():
        return [loaded.model(**e.inputs).logits for e in encoded]


@pytest.fixture(scope="module")
def quantized_tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "ckpt"
    loaded = load_model("tiny:llava")
    recipe = Recipe(quantizer="gptq", compensator="lowrank[rank=8]", setting="W4A8", samples=4)
    path, manifest = run_quantize(recipe, out=out, loaded=loaded, progress=False)
    return loaded, path, manifest


def test_checkpoint_is_self_contained(quantized_tiny):
    _, path, manifest = quantized_tiny
    names = {p.name for p in path.iterdir()}
    assert {"qe_manifest.json", "config.json", "model-00001-of-00001.safetensors"} <= names
    assert any(n.startswith("tokenizer") for n in names)
    assert not partial_dir(path).exists()
    m = json.loads((path / "qe_manifest.json").read_text())
    assert m["format_version"] == 2 and m["recipe"]["quantizer"] == "gptq"
    assert m["calibration"]["data_hash"] and m["calibration"]["samples"] == 4
    assert len(m["layers"]) == 14 and all("rel_error" in r["figures"] for r in m["layers"])
    assert m["effective_bits"]["bits_per_weight"] < 6 < m["effective_bits"]["bits_per_weight_with_adapters"]
    for rec in m["files"].values():
        assert rec["bytes"] > 0 and len(rec["sha256"]) == 64


def test_reload_equals_in_memory_model_and_generates(quantized_tiny):
    from qe.data.calibration import calibration_set

    loaded, path, _ = quantized_tiny
    reloaded = qe.load_quantized(path)
    _, encoded = calibration_set(loaded, None, 3)
    for a, b in zip(_logits(loaded, encoded), _logits(reloaded, encoded)):
        assert torch.equal(a, b)
    e = encoded[0]
    n = int((e.modality != 2).sum())
    inputs = {k: (v[:, :n] if isinstance(v, torch.Tensor) and v.dim() == 2 else v) for k, v in e.inputs.items()}
    out = reloaded.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == n + 3
    # load_model recognises a checkpoint directory too
    assert load_model(str(path)).manifest is not None


def test_tampered_and_truncated_checkpoints_are_refused(quantized_tiny, tmp_path):
    import shutil

    _, path, manifest = quantized_tiny
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    shard = copy / manifest["shards"][0]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="SHA-256"):
        qe.load_quantized(copy)
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(ModelError, match="truncated"):
        qe.load_quantized(copy)


def test_existing_output_is_refused_before_loading(quantized_tiny):
    _, path, _ = quantized_tiny
    with pytest.raises(QEError, match="exists"):
        run_quantize(Recipe(), "no/such/model", out=path, progress=False)


def _deep_tiny(tmp_path) -> Path:
    """A tiny LLaVA with 4 decoder blocks (the stock tiny models have 2)."""
    from qe.models import tiny

    config = tiny.tiny_config("llava")
    config.text_config.num_hidden_layers = 4
    torch.manual_seed(0)
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration(config).eval()
    _, processor = tiny.build_tiny_vlm("llava")
    path = tmp_path / "deep"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


class _Interrupt:
    def __init__(self, after: int):
        self.after = after

    @qe.hookimpl
    def qe_block_end(self, block_index, num_blocks, figures):
        if block_index == self.after:
            raise KeyboardInterrupt


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, same_checkpoint_tensors):
    model_dir = _deep_tiny(tmp_path)
    recipe = Recipe(quantizer="gptq", compensator="lowrank[rank=4]", setting="W4A6", samples=3)
    full, _ = run_quantize(recipe, str(model_dir), out=tmp_path / "full", progress=False)

    out = tmp_path / "resumed"
    manager = QEPluginManager(load_entry_points=False, extra_plugins=[_Interrupt(after=2)])
    with pytest.raises(KeyboardInterrupt):
        run_quantize(recipe, str(model_dir), out=out, progress=False, manager=manager)
    assert not out.exists()
    progress = json.loads((partial_dir(out) / "progress.json").read_text())
    assert progress["finished"] == 3
    run_quantize(recipe, str(model_dir), out=out, resume=True, progress=False)


    same_checkpoint_tensors(full, out)
    ma = json.loads((full / "qe_manifest.json").read_text())
    mb = json.loads((out / "qe_manifest.json").read_text())
    assert [r["figures"]["rel_error"] for r in ma["layers"]] == [r["figures"]["rel_error"] for r in mb["layers"]]


def test_resume_refuses_a_different_recipe(tmp_path):
    model_dir = _deep_tiny(tmp_path)
    out = tmp_path / "r"
    manager = QEPluginManager(load_entry_points=False, extra_plugins=[_Interrupt(after=0)])
    with pytest.raises(KeyboardInterrupt):
        run_quantize(Recipe(samples=2), str(model_dir), out=out, progress=False, manager=manager)
    with pytest.raises(ConfigError, match="different recipe"):
        run_quantize(Recipe(samples=2, setting="W4A6"), str(model_dir), out=out, resume=True, progress=False)


def test_recipe_file_overrides_and_skips(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('''
quantizer = "rtn"
compensator = "lowrank[rank=4]"
setting = "W4A8"
samples = 2
skip = ["*.layers.1.mlp.*"]

[[override]]
pattern = "*.self_attn.o_proj"
compensator = "none"
''')
    recipe = load_recipe(path)
    assert recipe.overrides == (LayerOverride("*.self_attn.o_proj", None, "none"),)
    out, manifest = run_quantize(recipe, "tiny:llava", out=tmp_path / "o", progress=False)
    names = [r["name"] for r in manifest["layers"]]
    assert not any(".layers.1.mlp." in n for n in names) and len(names) == 11
    layouts = manifest["layouts"]
    assert all(v["compensator"] is None for k, v in layouts.items() if k.endswith("o_proj"))
    assert all(v["compensator"] is not None for k, v in layouts.items() if k.endswith("q_proj"))


def test_bad_recipes_fail_before_loading(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('quantizer = "rtn"\ncolour = "blue"\n')
    with pytest.raises(ConfigError, match="unknown key"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="unknown compensator"):
        run_quantize(Recipe(compensator="bogus"), "no/such/model", out=tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match="unknown quantizer"):
        Recipe(overrides=(LayerOverride("*", quantizer="nope"),)).validate()


def test_rank_override_above_layer_width_is_an_error(tmp_path):
    recipe = Recipe(compensator="lowrank[rank=8]", samples=2,
                    overrides=(LayerOverride("*.k_proj", compensator="lowrank[rank=100]"),))
    with pytest.raises(ConfigError, match="per-layer rank 100"):
        run_quantize(recipe, "tiny:llava", out=tmp_path / "x", progress=False)


def test_global_rank_is_capped_with_one_warning(tmp_path):
    recipe = Recipe(compensator="lowrank[rank=100]", samples=2)
    _, manifest = run_quantize(recipe, "tiny:llava", out=tmp_path / "x", progress=False)
    warnings = [w for w in manifest["warnings"] if "rank capped" in w]
    assert len(warnings) == 1 and "14 layers" in warnings[0]


@pytest.mark.parametrize("transform,quantizer", [("awq", "rtn"), ("smoothquant[alpha=0.5]", "gptq"), ("awq[grid=4]", "gptq")])
def test_smoothing_transforms_run_through_the_pipeline(tmp_path, transform, quantizer):
    recipe = Recipe(transform=transform, quantizer=quantizer, setting="W4A8", samples=2)
    _, manifest = run_quantize(recipe, "tiny:llava", out=tmp_path / "x", progress=False)
    modes = {r["name"].rsplit(".", 1)[-1]: r["smoothing"] for r in manifest["layers"]}
    assert modes["q_proj"] == "folded" and modes["o_proj"] == "explicit"
    assert all(r["figures"]["rel_error"] < 0.5 for r in manifest["layers"])


def test_data_free_composition_skips_calibration(tmp_path, monkeypatch):
    """RTN without a compensator reads no calibration data: no capture, no figures."""
    import qe.capture as capture

    def no_capture(*a, **k):
        raise AssertionError("a data-free composition must not run calibration forwards")

    monkeypatch.setattr(capture, "capture_block_inputs", no_capture)
    _, manifest = run_quantize(Recipe(setting="W4A8", samples=2), "tiny:llava", out=tmp_path / "x", progress=False)
    assert len(manifest["layers"]) == 14
    assert all("rel_error" not in r["figures"] for r in manifest["layers"])


def test_alpha_choice_quantization_is_reused_and_changes_nothing(tmp_path, monkeypatch):
    """Choosing α quantizes each candidate; the chosen one is the base (no extra GPTQ run per
    linear), and the checkpoint equals one where every base is quantized afresh."""
    from safetensors.torch import load_file

    import qe.transforms.smoothing as smoothing
    from qe.quantizers.gptq import GPTQ

    calls = []
    for method in ("quantize", "quantize_spending_hessian"):  # a search's last use of a candidate spends it
        real = getattr(GPTQ, method)
        monkeypatch.setattr(GPTQ, method, lambda self, *a, real=real, **k: calls.append(k["layer_name"]) or real(self, *a, **k))
    recipe = Recipe(quantizer="gptq", compensator="qe[k=4;num_experts=2;shared_rank=4;expert_rank=4]", setting="W4A8", samples=2)
    _, manifest = run_quantize(recipe, "tiny:llava", out=tmp_path / "reused", progress=False)
    candidates = 4  # QE's grid: None, 0.25, 0.5, 0.75
    assert len(calls) == candidates * len(manifest["layers"])
    # every linear is quantized once per candidate under its own name (GPTQ's warnings name it)
    assert sorted(calls) == sorted(r["name"] for r in manifest["layers"] for _ in range(candidates))

    real_choose = smoothing.choose_alpha
    monkeypatch.setattr(smoothing, "choose_alpha",
                        lambda *a, **k: real_choose(*a, **k)._replace(quantized=[]))  # nothing to reuse
    calls.clear()
    _, fresh = run_quantize(recipe, "tiny:llava", out=tmp_path / "fresh", progress=False)
    assert len(calls) == (candidates + 1) * len(fresh["layers"])
    a = load_file(tmp_path / "reused" / manifest["shards"][0])
    b = load_file(tmp_path / "fresh" / fresh["shards"][0])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_refinement_runs_through_the_pipeline_and_reports_per_layer(tmp_path):
    loaded = load_model("tiny:llava")
    qe_spec = "qe[k=4;num_experts=2;shared_rank=4;expert_rank=4;refine=true;refine_epochs=2;refine_iterations=3]"
    recipe = Recipe(quantizer="rtn", compensator=qe_spec, setting="W4A8", samples=2)
    path, _ = run_quantize(recipe, out=tmp_path / "refined", loaded=loaded, progress=False)
    figures = [r["figures"] for r in json.loads((path / "qe_manifest.json").read_text())["layers"]]
    assert figures and all("refine_kept" in f for f in figures)
    for f in figures:  # kept exactly when the router's calibration objective fell
        assert (f["refine_kept"] == 1.0) == (f["refine_residual_after"] < f["refine_residual_before"])
        kept_value = f["refine_residual_after"] if f["refine_kept"] else f["refine_residual_before"]
        assert f["residual_router"] == pytest.approx(kept_value, rel=1e-12)
