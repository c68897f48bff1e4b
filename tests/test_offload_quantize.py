"""Quantizing a model whose decoder blocks accelerate offloaded to disk: one block onloaded
at a time, each quantized block offloaded again to its block file, and the same checkpoint
tensors as the run on the model held in memory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import qe
from qe.commands.quantize import run_quantize
from qe.compensators.modules import FactorModule
from qe.models import tiny
from qe.models.loading import Placement, load_model, load_quantized
from qe.models.offload import is_offloaded, offload_to_file
from qe.models.tiny import LLAVA_BLOCKS_ON_DISK as DISK_MAP
from qe.plugins import QEPluginManager
from qe.quantizers.qlinear import QuantLinear
from qe.recipe import Recipe

# RTN alone is data-free; QE smooths (scales folded into the offloaded blocks' norms) and fits.
RECIPES = {
    "rtn+none": Recipe(quantizer="rtn", compensator="none", setting="W4A8", samples=3),
    "gptq+qe": Recipe(quantizer="gptq", compensator="qe[k=4;num_experts=2;shared_rank=4;expert_rank=2]",
                      setting="W4A8", samples=3),
    # integer factors: the compensator caches their dequantized values between forwards
    "gptq+qe-int8": Recipe(quantizer="gptq", compensator="qe[k=4;num_experts=2;shared_rank=4;expert_rank=2;adapter_bits=8]",
                           setting="W4A8", samples=3),
}


def _float_caches(modules) -> list[str]:
    """What offloaded quantized modules still hold in memory beside their (meta) buffers."""
    found = []
    for m in modules:
        if isinstance(m, QuantLinear):
            if m._dequantized is not None:
                found.append("dequantized weight")
            if isinstance(m.compensator, FactorModule) and m.compensator._cache:
                found.append("dequantized factors")
    return found


@pytest.mark.parametrize("name,placed", [("gptq+qe", "blocks on disk"), ("rtn+none", "max-memory"),
                                         ("gptq+qe-int8", "blocks on disk")])
def test_offloaded_quantization_equals_in_memory(name, placed, tmp_path, same_checkpoint_tensors):
    """Blocks offloaded by an explicit map, or by ``--max-memory`` (accelerate's automatic map,
    which offloads the whole language model of this tiny model, embeddings included)."""
    path = tiny.tiny_model_dir("llava")
    recipe = RECIPES[name]
    ref_dir, _ = run_quantize(recipe, str(path), out=tmp_path / "ref", progress=False)
    if placed == "max-memory":
        off = load_model(str(path), placement=Placement(offload_folder=str(tmp_path / "offload"),
                                                        max_memory={"cpu": "300KB"}))
    else:
        off = load_model(str(path), device_map=DISK_MAP, offload_folder=tmp_path / "offload")
    assert is_offloaded(off.adapter.decoder_blocks(off.model)[0])
    off_dir, manifest = run_quantize(recipe, out=tmp_path / "off", progress=False, loaded=off)
    same_checkpoint_tensors(ref_dir, off_dir)
    # The quantized blocks stay offloaded: nothing but meta tensors in the model's blocks.
    for block in off.adapter.decoder_blocks(off.model):
        assert any(isinstance(m, QuantLinear) for m in block.modules())
        assert all(t.device.type == "meta" for t in block.state_dict().values())
        # nor a dequantized float weight or factor cached by the forward that fed the next block
        assert _float_caches(block.modules()) == []
    # ... and the offloaded quantized model computes what the reloaded checkpoint computes.
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    with torch.no_grad():
        want = load_quantized(ref_dir).model(input_ids=ids).logits
        have = off.model(input_ids=ids).logits
    torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)
    assert manifest["heldout_check"]["ppl_quantized"] > 0


class _Interrupt:
    @qe.hookimpl
    def qe_block_end(self, block_index, num_blocks, figures):
        if block_index == 0:
            raise KeyboardInterrupt


def test_offloaded_run_resumes_to_the_same_tensors(tmp_path, same_checkpoint_tensors):
    path = tiny.tiny_model_dir("llava")
    recipe = RECIPES["gptq+qe"]
    ref_dir, _ = run_quantize(recipe, str(path), out=tmp_path / "ref", progress=False)
    out = tmp_path / "resumed"
    manager = QEPluginManager(load_entry_points=False, extra_plugins=[_Interrupt()])
    first = load_model(str(path), device_map=DISK_MAP, offload_folder=tmp_path / "offload-1")
    with pytest.raises(KeyboardInterrupt):
        run_quantize(recipe, out=out, progress=False, loaded=first, manager=manager)
    again = load_model(str(path), device_map=DISK_MAP, offload_folder=tmp_path / "offload-2")
    run_quantize(recipe, out=out, resume=True, progress=False, loaded=again)
    same_checkpoint_tensors(ref_dir, out)


def test_offloaded_checkpoint_is_written_in_small_shards(tmp_path, monkeypatch):
    """Writing an offloaded model holds one shard at a time: with a tiny shard limit every
    shard stays under it (or holds a single larger tensor), and the checkpoint still loads."""
    from qe import checkpoint

    monkeypatch.setattr(checkpoint, "OFFLOADED_SHARD_BYTES", 20_000)
    path = tiny.tiny_model_dir("llava")
    off = load_model(str(path), device_map=DISK_MAP, offload_folder=tmp_path / "offload")
    out, manifest = run_quantize(RECIPES["rtn+none"], out=tmp_path / "ckpt", progress=False, loaded=off,
                                 check_heldout=False)
    assert len(manifest["shards"]) > 3
    for name in manifest["shards"]:
        tensors = load_file(str(out / name))
        sizes = [t.numel() * t.element_size() for t in tensors.values()]
        assert sum(sizes) <= 20_000 or len(sizes) == 1
    ref_dir, _ = run_quantize(RECIPES["rtn+none"], str(path), out=tmp_path / "ref", progress=False,
                              check_heldout=False)
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(out).model(input_ids=ids).logits,
                                   load_quantized(ref_dir).model(input_ids=ids).logits, rtol=0, atol=0)
    # The tensors' digest does not see the sharding, and does see one changed value.
    assert checkpoint.tensors_digest(out) == checkpoint.tensors_digest(ref_dir)
    shard = ref_dir / json.loads((ref_dir / "qe_manifest.json").read_text())["shards"][0]
    tensors = load_file(str(shard))
    key = sorted(tensors)[len(tensors) // 2]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1
    save_file(tensors, str(shard))
    assert checkpoint.tensors_digest(out) != checkpoint.tensors_digest(ref_dir)
    # A tensor stored in two shards is damage, not a choice between copies.
    manifest = json.loads((ref_dir / "qe_manifest.json").read_text())
    save_file({key: tensors[key]}, str(ref_dir / "extra.safetensors"))
    manifest["shards"].append("extra.safetensors")
    (ref_dir / "qe_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(qe.errors.ModelError, match=f"tensor {key} is in both .* and extra.safetensors"):
        checkpoint.tensors_digest(ref_dir)


@pytest.fixture(scope="module")
def qe_checkpoint(tmp_path_factory):
    path = tiny.tiny_model_dir("llava")
    ckpt, _ = run_quantize(RECIPES["gptq+qe-int8"], str(path), out=tmp_path_factory.mktemp("ckpt") / "qe",
                           progress=False, check_heldout=False)
    return ckpt


def test_checkpoint_loads_with_its_blocks_left_on_disk(qe_checkpoint):
    """load_quantized with a device map: blocks mapped to disk are read from the shards on
    each forward (nothing copied, never allocated); the outputs equal a full load."""
    ckpt = qe_checkpoint
    full = load_quantized(ckpt)
    placed = load_quantized(ckpt, device_map=DISK_MAP)
    blocks = placed.adapter.decoder_blocks(placed.model)
    assert all(is_offloaded(b) for b in blocks)
    assert all(t.device.type == "meta" for b in blocks for t in b.state_dict().values())
    ids = torch.tensor([[1, 5, 9, 2, 7, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(placed.model(input_ids=ids).logits, full.model(input_ids=ids).logits,
                                   rtol=0, atol=0)
    assert _float_caches(placed.model.modules()) == []  # the forward left nothing of the disk blocks behind


@pytest.mark.parametrize("propagation", ["quantized", "fp-inputs"])
def test_compare_on_an_offloaded_model_gives_the_same_table(propagation, tmp_path):
    from qe.cli import main

    args = ["compare", "--model", "tiny:llava", "--quantizers", "rtn", "--compensators", "none,lowrank[rank=4]",
            "--settings", "W4A8", "--samples", "3", "--eval-tokens", "1024", "--propagation", propagation, "--quiet"]
    assert main([*args, "--out", str(tmp_path / "memory")]) == 0
    assert main([*args, "--out", str(tmp_path / "offloaded"), "--max-memory", "cpu=300KB",
                 "--offload-folder", str(tmp_path / "offload")]) == 0
    import csv

    columns = ("setting", "quantizer", "compensator", "status", "ppl", "caption_nll", "mean_rel_error")

    def rows(d):
        with (d / "results.csv").open() as fh:
            return [{k: r[k] for k in columns} for r in csv.DictReader(fh)]

    assert len(rows(tmp_path / "memory")) == 3
    assert rows(tmp_path / "memory") == rows(tmp_path / "offloaded")


def test_fp_inputs_compare_offloads_every_cells_quantized_blocks(tmp_path, monkeypatch):
    """Each cell's quantized blocks go to files as they are made (the table is the same: the
    test above), so a grid of cells does not hold the model several times over in memory."""
    from qe.cli import main
    from qe.commands import compare_cells

    spilled = []

    def spy(module, path, device):
        assert path.parent.parent == tmp_path / "offload"  # beside the offloaded weights, not in /tmp
        spilled.append(path.name)
        return offload_to_file(module, path, device)

    monkeypatch.setattr(compare_cells, "offload_to_file", spy)
    assert main(["compare", "--model", "tiny:llava", "--quantizers", "rtn", "--compensators", "none,lowrank[rank=4]",
                 "--settings", "W4A8", "--samples", "3", "--eval-tokens", "1024", "--propagation", "fp-inputs",
                 "--quiet", "--out", str(tmp_path / "grid"), "--max-memory", "cpu=300KB",
                 "--offload-folder", str(tmp_path / "offload")]) == 0
    blocks = len(load_model("tiny:llava").blocks)
    assert sorted(spilled) == sorted(f"cell-{c}-block-{b:05d}.safetensors" for c in range(2) for b in range(blocks))


def test_compare_spills_quantized_blocks_into_the_offload_folder(tmp_path):
    """Quantized propagation offloads each quantized block to a file; on a placed model the
    files go to its offload folder, which the user chose for its space."""
    from qe.commands.compare import CompareOptions, run_compare

    seen = []

    class Look:
        @qe.hookimpl
        def qe_block_end(self, block_index, num_blocks, figures):
            seen.extend(p.name for p in (tmp_path / "offload").glob("qe-offloaded-blocks-*/block-*.safetensors"))

    options = CompareOptions(samples=3, eval_tokens=1024, progress=False, caption_nll=False,
                             placement=Placement(max_memory={"cpu": "300KB"}, offload_folder=str(tmp_path / "offload")))
    run_compare("tiny:llava", "rtn", "lowrank[rank=4]", "W4A8", out=tmp_path / "grid", options=options,
                manager=QEPluginManager(extra_plugins=[Look()]))
    assert "block-00000.safetensors" in seen


def test_max_memory_is_checked_before_loading(capsys):
    from qe.cli import main

    assert main(["eval", "--model", "tiny:llava", "--max-memory", "cpu:4G"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--max-memory" in err and "cpu=4GiB" in err


def test_eval_of_a_checkpoint_within_max_memory_scores_the_same(qe_checkpoint, capsys):
    from qe.cli import main

    args = ["eval", "--model", str(qe_checkpoint), "--eval-tokens", "1024", "--quiet"]
    assert main(args) == 0
    in_memory = capsys.readouterr().out
    assert main([*args, "--max-memory", "cpu=100KB"]) == 0
    placed = capsys.readouterr().out
    # the placement the command used really left the blocks on disk
    loaded = load_model(str(qe_checkpoint), placement=Placement(max_memory={"cpu": "100KB"}))
    assert all(is_offloaded(b) for b in loaded.adapter.decoder_blocks(loaded.model))

    def figure(out: str) -> str:  # "perplexity 1022.0580 over 1022 tokens" without the time
        return next(ln for ln in out.splitlines() if ln.startswith("perplexity")).split(" in ")[0]

    assert figure(in_memory) == figure(placed)


def test_tied_embeddings_are_written_once_when_offloaded(tmp_path, same_checkpoint_tensors):
    """With everything on disk, each forward through the offloaded embedding gives it a new meta
    tensor, no longer the LM head's: the checkpoint still stores one (the model's declared tie)
    and equals the in-memory run."""
    path = tiny.tiny_model_dir("internvl")
    recipe = RECIPES["gptq+qe"]  # calibration runs the offloaded embedding, which unties it in accelerate
    ref_dir, ref = run_quantize(recipe, str(path), out=tmp_path / "ref", progress=False, check_heldout=False)
    off = load_model(str(path), placement=Placement(offload_folder=str(tmp_path / "offload"), max_memory={"cpu": "1KB"}))
    off_dir, got = run_quantize(recipe, out=tmp_path / "off", progress=False, loaded=off, check_heldout=False)
    assert got["tied"] == ref["tied"] and "lm_head.weight" in got["tied"]
    same_checkpoint_tensors(ref_dir, off_dir)


def test_quantizing_in_memory_keeps_no_dequantized_weight():
    """The quantized forward that feeds the next block dequantizes each weight; kept, those
    floats would be a second copy of every quantized block by the end of an in-memory run."""
    from qe.composition import resolve_composition
    from qe.data.calibration import calibration_set
    from qe.pipeline import PipelineOptions, QuantizationPipeline

    loaded = load_model(str(tiny.tiny_model_dir("llava")))
    _, encoded = calibration_set(loaded, None, 2)
    QuantizationPipeline(loaded, resolve_composition("gptq", "none", "W4A8"), PipelineOptions(progress=False)).run(encoded)
    quantized = [m for m in loaded.model.modules() if isinstance(m, QuantLinear)]
    assert quantized and all(m.keep_dequantized for m in quantized)  # a later forward still caches
    assert all(m._dequantized is None for m in quantized)
