"""--scope vision|all: the vision tower's blocks and the projector go through the same
pipeline, reload equal, and are read by qe analyze; the stack adapters replay the tower."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qe
from qe.capture import BlockWalker
from qe.commands.quantize import run_quantize
from qe.data.calibration import calibration_set
from qe.errors import ConfigError
from qe.modality import Modality
from qe.models.loading import load_model
from qe.models.stacks import ProjectorStackAdapter, VisionStackAdapter, scope_adapters
from qe.quantizers.qlinear import QuantLinear
from qe.recipe import Recipe, load_recipe
from qe.transforms.smoothing import fold_into_norm

QE_SMALL = "qe[k=4;num_experts=2;shared_rank=4;expert_rank=4]"
VISION_FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "internvl", "gemma3", "llava_onevision",
                   "mistral3")

_CACHE: dict = {}


def _loaded(family):
    if family not in _CACHE:
        _CACHE[family] = load_model(f"tiny:{family}")
    return _CACHE[family]


def _view(loaded, adapter):
    import dataclasses

    return dataclasses.replace(loaded, adapter=adapter)


def _quant_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("family,scope", [("llava", "vision"), ("qwen2_vl", "all")])
def test_scope_quantizes_the_tower_and_reloads_equal(family, scope, tmp_path):
    loaded = load_model(f"tiny:{family}")  # quantized in place: not the shared cache
    lm_prefix = loaded.adapter.blocks_prefix(loaded.model)
    recipe = Recipe(quantizer="rtn", compensator=QE_SMALL, setting="W4A8", calib="images", samples=4, scope=scope)
    path, manifest = run_quantize(recipe, out=tmp_path / "q", loaded=loaded, progress=False, check_heldout=False)
    names = _quant_names(loaded.model)
    vision_paths = [a.path for a in scope_adapters(loaded.adapter, loaded.model, scope)
                    if isinstance(a, VisionStackAdapter)]
    assert len(vision_paths) == 2  # the tower's blocks and the projector
    for p in vision_paths:
        assert any(n.startswith(p + ".") for n in names), p
    assert any(n.startswith(lm_prefix + ".") for n in names) == (scope == "all")
    m = json.loads((path / "qe_manifest.json").read_text())
    assert m["scope"] == scope and m["recipe"]["scope"] == scope
    assert {r["name"] for r in m["layers"]} == names == set(m["layouts"])
    assert len(m["stacks"]["vision"]["blocks"]) == len(loaded.model.get_submodule(vision_paths[0])) + 1
    reloaded = qe.load_quantized(path)
    assert _quant_names(reloaded.model) == names
    _, encoded = calibration_set(loaded, "images", 2, False)
    with torch.no_grad():
        for e in encoded:
            assert torch.equal(loaded.model(**e.inputs).logits, reloaded.model(**e.inputs).logits)


def test_data_free_vision_scope_rtn(tmp_path):
    loaded = load_model("tiny:llava")
    recipe = Recipe(quantizer="rtn", setting="W4A16ch", calib="images", samples=2, scope="vision")
    path, manifest = run_quantize(recipe, out=tmp_path / "q", loaded=loaded, progress=False, check_heldout=False)
    assert manifest["summary"]["layers"] == 2 * 6 + 2
    reloaded = qe.load_quantized(path)
    _, encoded = calibration_set(loaded, "images", 1, False)
    with torch.no_grad():
        assert torch.equal(loaded.model(**encoded[0].inputs).logits, reloaded.model(**encoded[0].inputs).logits)


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_walker_replays_the_vision_tower(family):
    """Captured at the tower's first block and run block by block, the stack gives the tower's
    own block outputs (positional arguments such as CLIP's attention mask are replayed)."""
    loaded = _loaded(family)
    vision = scope_adapters(loaded.adapter, loaded.model, "vision")[0]
    _, encoded = calibration_set(loaded, "images", 2, False)
    walker = BlockWalker(_view(loaded, vision), vision.calibration_samples(encoded), progress=False)
    blocks = vision.decoder_blocks(loaded.model)
    seen: list[torch.Tensor] = []
    handle = blocks[-1].register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            for e in vision.calibration_samples(encoded):
                loaded.model(**e.inputs)
    finally:
        handle.remove()
    outs = None
    for step in walker.walk():
        outs = step.run()
        step.next_hidden = outs
        modality = torch.cat([b.modality for b in step.inputs.batches])
        assert bool((modality == int(Modality.VISION)).all())
    assert outs is not None and len(outs) == len(seen)
    for a, b in zip(outs, seen):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", VISION_FAMILIES)
@settings(max_examples=5)
@given(seed=st.integers(0, 2**16))
def test_vision_smoothing_groups_fold_exactly(family, seed):
    """Each group's norm feeds exactly its linears: dividing the norm's output by s and
    multiplying the linears' input columns by s leaves the block's output unchanged."""
    loaded = _loaded(family)
    vision = scope_adapters(loaded.adapter, loaded.model, "vision")[0]
    block = vision.decoder_blocks(loaded.model)[0]
    import copy

    folded = copy.deepcopy(block)
    g = torch.Generator().manual_seed(seed)
    groups = [grp for grp in vision.smoothing_groups(folded) if grp.norm is not None]
    assert groups, "the vision blocks' norms should take the fold"
    for grp in groups:
        lin0 = folded.get_submodule(grp.linears[0])
        s = torch.rand(lin0.in_features, generator=g) * 1.5 + 0.5
        assert fold_into_norm(folded.get_submodule(grp.norm), s)
        for n in grp.linears:
            lin = folded.get_submodule(n)
            lin.weight.data *= s
    _, encoded = calibration_set(loaded, "images", 1, False)
    walker = BlockWalker(_view(loaded, vision), vision.calibration_samples(encoded), progress=False)
    batch = walker.inputs().batches[0]
    with torch.no_grad():
        ref = block(batch.hidden, **batch.kwargs)
        out = folded(batch.hidden, **batch.kwargs)
    ref = ref[0] if isinstance(ref, tuple) else ref
    out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_projector_tokens_are_the_rows_its_linears_read():
    loaded = _loaded("qwen2_vl")
    projector = scope_adapters(loaded.adapter, loaded.model, "vision")[1]
    assert isinstance(projector, ProjectorStackAdapter)
    _, encoded = calibration_set(loaded, "images", 1, False)
    walker = BlockWalker(_view(loaded, projector), projector.calibration_samples(encoded), progress=False)
    batch = walker.inputs().batches[0]
    merge = loaded.model.config.vision_config.spatial_merge_size
    assert batch.num_tokens * merge * merge == batch.hidden.shape[0]


def test_scope_needs_images_and_a_known_tower(tmp_path):
    loaded = _loaded("llava")
    recipe = Recipe(quantizer="rtn", compensator="lowrank[rank=4]", setting="W4A8", calib="pydoc", samples=2,
                    scope="vision")
    with pytest.raises(ConfigError, match="needs image calibration samples"):
        run_quantize(recipe, out=tmp_path / "q", loaded=load_model("tiny:llava"), progress=False, check_heldout=False)
    assert not (tmp_path / "q").exists()
    with pytest.raises(ConfigError, match="--scope 'eyes' unknown"):
        Recipe(scope="eyes").validate()
    text = load_model("tiny:llava")
    type(text.adapter).vision_blocks_paths, saved = (), type(text.adapter).vision_blocks_paths
    try:
        with pytest.raises(ConfigError, match="knows no vision tower blocks"):
            scope_adapters(text.adapter, text.model, "all")
    finally:
        type(text.adapter).vision_blocks_paths = saved
    assert scope_adapters(loaded.adapter, loaded.model, "language") == [loaded.adapter]


def test_recipe_file_reads_scope(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('scope = "all"\nquantizer = "rtn"\n')
    assert load_recipe(f).scope == "all"


def test_analyze_scope_vision_reports_tower_channels(tmp_path):
    from qe.commands.analyze import analyze

    path, summary = analyze("tiny:llava", calib="images", samples=4, out=tmp_path / "a", k=4, num_experts=2,
                            progress=False, scope="all")
    stacks = {s["stack"] for s in summary["layers"]}
    assert stacks == {"vision", "projector", "language"}
    vision = [s for s in summary["layers"] if s["stack"] == "vision"]
    assert len(vision) == 12 and all(s["name"].startswith("model.vision_tower.") for s in vision)
    assert summary["run"]["scope"] == "all"
    assert any(p.name.startswith("freq_vision-") for p in path.iterdir())
    _, only = analyze("tiny:llava", calib="images", samples=4, out=tmp_path / "b", k=4, num_experts=2,
                      progress=False, scope="vision", layers=r"fc1")
    assert {s["name"].rsplit(".", 1)[-1] for s in only["layers"]} == {"fc1"}
    assert {s["stack"] for s in only["layers"]} == {"vision"}


def test_cli_scope_flags():
    from qe.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["quantize", "--scope", "all"]).scope == "all"
    assert parser.parse_args(["analyze", "--scope", "vision"]).scope == "vision"
    assert parser.parse_args(["analyze"]).scope == "language"



def test_pixtral_processor_writes_rows_of_image_tokens():
    """Mistral 3's processor (rebuilt without torchvision): a 32 x 32 image in 8-pixel patches
    merged 2 x 2 is 2 rows of 2 [IMG], each row ended by [IMG_BREAK], the last by [IMG_END]."""
    from PIL import Image

    loaded = _loaded("mistral3")
    assert type(loaded.processor).__name__ == "PixtralImageOnlyProcessor"
    out = loaded.processor(text=["a [IMG] b"], images=[Image.new("RGB", (32, 32))], return_tensors="pt")
    tok = loaded.tokenizer
    ids = out["input_ids"][0].tolist()
    start = ids.index(tok.convert_tokens_to_ids("[IMG]"))
    assert tok.convert_ids_to_tokens(ids[start:start + 6]) == ["[IMG]", "[IMG]", "[IMG_BREAK]", "[IMG]", "[IMG]",
                                                               "[IMG_END]"]
    assert out["image_sizes"].tolist() == [[32, 32]]


class _InterruptAt:
    """Interrupt the run at its n-th finished block (vision stacks count first)."""

    def __init__(self, n: int):
        self.n, self.seen = n, 0

    @qe.hookimpl
    def qe_block_end(self, block_index, num_blocks, figures):
        self.seen += 1
        if self.seen == self.n:
            raise KeyboardInterrupt


def test_resume_restores_the_vision_stacks(tmp_path, same_checkpoint_tensors):

    from qe.commands.quantize import VISION_FILE, partial_dir
    from qe.plugins import QEPluginManager

    recipe = Recipe(quantizer="gptq", compensator="lowrank[rank=4]", setting="W4A8", calib="images", samples=3,
                    scope="all")
    full, _ = run_quantize(recipe, "tiny:llava", out=tmp_path / "full", progress=False, check_heldout=False)
    out = tmp_path / "resumed"
    # vision blocks 0, 1 and the projector, then language block 0: interrupted after it
    manager = QEPluginManager(extra_plugins=[_InterruptAt(4)])
    with pytest.raises(KeyboardInterrupt):
        run_quantize(recipe, "tiny:llava", out=out, progress=False, manager=manager, check_heldout=False)
    progress = json.loads((partial_dir(out) / "progress.json").read_text())
    assert progress["finished"] == 1 and len(progress["vision"]["layers"]) == 14
    assert (partial_dir(out) / VISION_FILE).is_file()
    run_quantize(recipe, "tiny:llava", out=out, resume=True, progress=False, check_heldout=False)
    same_checkpoint_tensors(full, out)
    ma = json.loads((full / "qe_manifest.json").read_text())
    mb = json.loads((out / "qe_manifest.json").read_text())
    assert [r["name"] for r in ma["layers"]] == [r["name"] for r in mb["layers"]]
    assert [r["figures"]["rel_error"] for r in ma["layers"]] == [r["figures"]["rel_error"] for r in mb["layers"]]


@pytest.mark.parametrize("family", [f for f in VISION_FAMILIES if f not in ("llava", "qwen2_vl", "mistral3")]
                         + ["llava_siglip", "qwen3_vl_moe"])
def test_every_family_quantizes_all_and_reloads_equal(family, tmp_path):
    loaded = load_model(f"tiny:{family}")
    recipe = Recipe(quantizer="rtn", compensator="lowrank[rank=4]", setting="W4A8", calib="images", samples=2,
                    scope="all")
    path, manifest = run_quantize(recipe, out=tmp_path / "q", loaded=loaded, progress=False, check_heldout=False)
    stacks = {a.stack for a in scope_adapters(loaded.adapter, loaded.model, "vision")}
    assert {"vision"} <= stacks
    reloaded = qe.load_quantized(path)
    assert _quant_names(reloaded.model) == _quant_names(loaded.model) == set(manifest["layouts"])
    _, encoded = calibration_set(loaded, "images", 1, False)
    with torch.no_grad():
        assert torch.equal(loaded.model(**encoded[0].inputs).logits, reloaded.model(**encoded[0].inputs).logits)
