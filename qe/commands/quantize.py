"""``qe quantize``: run a recipe over a model and write a self-contained, resumable checkpoint.

The output is built in ``.<name>.partial`` beside the final directory. After each decoder
block, that block's tensors (quantized linears, adapters, smoothed norms) and the run's
progress go there, so ``--resume`` continues from the last finished block and gives the same
tensors as an uninterrupted run. When every block is done, the whole model is written as
safetensors shards with a manifest, and the directory is renamed into place.

The finish is restartable at every point: the block files and ``progress.json`` stay until
the shards and the manifest are written (the manifest, written last and atomically, is the
commit point), so a run killed or out of disk at any moment of the finish continues with
``--resume``. A lock beside ``--out`` keeps a second run from writing the same directory,
and every output check (exists, kind, writable, free space), the recipe, the data file and
a saved partial run's options are checked before the model loads.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from qe import budget as qe_budget
from qe import checkpoint
from qe.data.calibration import calibration_set, data_hash, token_counts, tokens_by_source
from qe.errors import ConfigError, QEError
from qe.evaluation import before_after
from qe.models.loading import LoadedModel, Placement, load_model, parse_dtype
from qe.models.offload import execution_device, is_offloaded, offload_to_file
from qe.paths import atomic_write_json, check_output, json_safe, output_lock
from qe.pipeline import LayerRecord, PipelineOptions, PipelineResult, QuantizationPipeline, quantize_vision_stacks
from qe.plugins import default_manager
from qe.recipe import Recipe

PROGRESS = "progress.json"
BLOCK_FILES = "block-*.safetensors"
VISION_FILE = "block-vision.safetensors"  # the vision stacks (--scope vision|all), saved before the language model

log = logging.getLogger("qe")


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _old_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.old"



def _versions() -> dict[str, str]:
    import transformers

    from qe.version import __version__

    return {"qe": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _phase(name: str) -> None:
    """A named point of the finish (tests inject faults here; it does nothing)."""


def _dtype_name(dtype) -> str:
    return str(parse_dtype(dtype)).removeprefix("torch.")


def has_partial_run(out: Path) -> bool:
    work = partial_dir(Path(out))
    return (work / PROGRESS).is_file() or (work / checkpoint.MANIFEST).is_file()


def _saved_identity(work: Path) -> dict | None:
    """The identity (recipe, dtype, model, data) of the run saved in ``work``, if it recorded one."""
    for name, key in ((checkpoint.MANIFEST, "run"), (PROGRESS, "identity")):
        f = work / name
        if f.is_file():
            try:
                data = json.loads(f.read_text())
            except (OSError, ValueError):
                raise QEError(f"{f} is damaged: pass --force to start over") from None
            return data.get(key) if isinstance(data, dict) else None
    return None


def _differences(saved: dict, now: dict) -> list[str]:
    diffs = []
    old_recipe, new_recipe = saved.get("recipe") or {}, now.get("recipe") or {}
    for k in sorted(set(old_recipe) | set(new_recipe)):
        if old_recipe.get(k) != new_recipe.get(k):
            diffs.append(f"recipe {k} {old_recipe.get(k)!r} -> {new_recipe.get(k)!r}")
    for key, what in (("dtype", "dtype"), ("model", "model"), ("data", "calibration data (hash)")):
        if key in now and key in saved and saved[key] != now[key]:
            diffs.append(f"{what} {saved[key]!r} -> {now[key]!r}")
    return diffs


def _check_identity(work: Path, now: dict) -> None:
    saved = _saved_identity(work)
    if saved is None:
        return
    diffs = _differences(saved, now)
    if diffs:
        raise ConfigError(f"{work} holds an interrupted run of a different recipe, dtype, model or data "
                          f"({'; '.join(diffs)}): resume with the same options, or pass --force to start over")


def _expected_bytes(model) -> int:
    """About how much the run writes: the size of a local model's weights (0 when unknown)."""
    if not isinstance(model, (str, Path)) or not Path(model).is_dir():
        return 0
    return sum(p.stat().st_size for p in Path(model).glob("*.safetensors"))


def run_quantize(
    recipe: Recipe,
    model: str | None = None,
    *,
    out: str | Path,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    device: str = "cpu",
    dtype: str = "float32",
    loaded: LoadedModel | None = None,
    manager=None,
    trust_remote_code: bool = False,
    adapter_dtype: str | torch.dtype = "model",
    check_heldout: bool = True,
    placement: Placement | None = None,
    budget: float | None = None,
) -> tuple[Path, dict]:
    """Quantize with ``recipe`` and write the checkpoint to ``out``; return it and its manifest.

    ``adapter_dtype`` is the dtype the compensators' tensors are stored in: ``"model"`` (the
    default) is the dtype the model was loaded in, so a float16 or bfloat16 model gets
    half-size adapters. Only the stored copy changes: the model in memory is left as it is.
    ``check_heldout`` measures the model before and after (:mod:`qe.evaluation.before_after`):
    held-out perplexity and the calibration vs held-out error, recorded as ``heldout_check``.
    ``placement`` offloads what does not fit in memory (:class:`~qe.models.loading.Placement`):
    blocks are then quantized one at a time and written as they finish.
    ``budget`` (bits per weight, everything stored): allocate the compensator's options per layer
    within it (:mod:`qe.budget`); the recipe's overrides become the allocation."""
    from qe.data.sources import check_source

    manager = manager or default_manager()
    composition = recipe.validate(manager)  # before any model loads
    if recipe.scope != "language" and composition.transform.create().changes_model():
        raise ConfigError(f"transform {composition.transform.entry.name!r} rotates the language model's residual stream, "
                          f"which --scope {recipe.scope} does not combine with yet: use --scope language")
    if recipe.scope == "vision" and composition.setting.quantizes_kv_cache:
        raise ConfigError(f"setting {composition.setting} quantizes the language model's KV cache, and --scope vision "
                          "leaves the language model in full precision: use --scope all, or drop KV<bits>")
    out = Path(out)
    work = partial_dir(out)
    check_output(out, kind="dir", force=force, expected_bytes=2 * _expected_bytes(model if loaded is None else None))
    check_output(work, kind="dir", force=True, what="the partial run folder")
    check_source(recipe.calib)
    if adapter_dtype != "model":
        adapter_dtype = parse_dtype(adapter_dtype)  # a bad name fails before the model loads
    with output_lock(out):
        partial = has_partial_run(out)
        if partial and not resume and not force:
            raise QEError(f"a partial run of {out} exists in {work}: --resume to continue, --force to start over")
        dtype_name = _dtype_name(dtype) if loaded is None else _dtype_name(model_float_dtype(loaded.model))
        if resume and partial:
            _check_identity(work, {"recipe": recipe.to_dict(), "dtype": dtype_name})  # before the model loads
        elif resume:
            log.warning("qe quantize: nothing to resume for %s (no partial run in %s): starting from block 0", out, work)
        loaded = loaded or load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                      placement=placement)
        model_dtype = model_float_dtype(loaded.model)
        sizes = {"model_bytes": state_bytes(loaded.model), "model_dtype": str(model_dtype).removeprefix("torch.")}
        adapter_dtype = model_dtype if adapter_dtype == "model" else adapter_dtype
        if budget is not None:
            if recipe.overrides:
                raise ConfigError("--budget chooses every layer's compensator itself: drop the recipe's per-layer overrides")
            if recipe.scope != "language":
                raise ConfigError(f"--budget allocates over the language model's linears, not --scope {recipe.scope}: "
                                  "use --scope language (the default)")
            qe_budget.check_budget(budget, loaded, composition, manager, recipe.skip)  # before calibration
        source, encoded = calibration_set(loaded, recipe.calib, recipe.samples, progress)
        reference = before_after.measure_reference(loaded, encoded) if check_heldout else None
        budget_plan = None
        if budget is not None:
            _phase("budget")
            budget_plan = qe_budget.plan_budget(loaded, composition, encoded, budget, _options(recipe, device, progress),
                                                adapter_dtype=adapter_dtype, manager=manager)
            recipe = recipe.replace(overrides=budget_plan.overrides)
            composition = recipe.validate(manager)
        dhash = data_hash(encoded)
        model_id = str(loaded.path or loaded.name)
        identity = {"recipe": recipe.to_dict(), "dtype": dtype_name, "model": model_id, "data": dhash}
        run_hash = recipe.hash(model_id, dhash, dtype_name)
        return _run(recipe, composition, loaded, source, encoded, dhash, identity, run_hash, out, work,
                    resume=resume and partial, force=force, progress=progress, device=device, manager=manager,
                    adapter_dtype=adapter_dtype, sizes=sizes, reference=reference, budget_plan=budget_plan)


def _options(recipe: Recipe, device: str, progress: bool) -> PipelineOptions:
    return PipelineOptions(propagation=recipe.propagation, max_tokens=recipe.max_tokens, device=device,
                           seed=recipe.seed, progress=progress, skip=recipe.skip, overrides=recipe.overrides)


def _run(recipe, composition, loaded, source, encoded, dhash, identity, run_hash, out, work, *, resume, force,
         progress, device, manager, adapter_dtype, sizes, reference, budget_plan=None) -> tuple[Path, dict]:
    shutil.rmtree(_old_dir(out), ignore_errors=True)  # left by a run killed while replacing --out
    blocks = loaded.adapter.decoder_blocks(loaded.model)
    prefix = loaded.adapter.blocks_prefix(loaded.model)
    done = 0
    result = PipelineResult()
    options = _options(recipe, device, progress)
    if resume:
        _check_identity(work, identity)
        if (work / checkpoint.MANIFEST).is_file():  # killed after the commit point: only the last steps are left
            manifest = checkpoint.read_manifest(work)
            checkpoint.verify_files(work, manifest["files"])
            log.warning("qe quantize: resuming %s: every block and the checkpoint files were written; finishing", out)
            _complete(work, out, force)
            manager.hook.qe_run_end(command="quantize", output=str(out), figures=manifest["summary"])
            return out, manifest
        state = json.loads((work / PROGRESS).read_text())
        if state.get("run_hash") != run_hash:
            raise ConfigError(f"{work} holds an interrupted run of a different recipe, dtype, model or data: "
                              "rerun with the same options to --resume, or pass --force to start over")
        pipeline = _pipeline(recipe, composition, loaded, options, manager, work)
        if pipeline is not None:
            pipeline.prepare_model()  # a rotation changes the model the saved blocks were quantized in
        done = _restore_blocks(loaded, work, state, manager)
        if pipeline is not None:
            pipeline.restored(done)  # before run(), and also when every block is done and run() is skipped
        result.layers = [LayerRecord(**{**r, "shape": tuple(r["shape"])}) for r in state["layers"] if r["block"] < done]
        result.blocks = state["blocks"][:done]
        result.seconds = state["seconds"]
        result.warnings = state["warnings"]
        log.warning("qe quantize: resuming %s from block %d of %d (%d finished block(s) restored)", out, done,
                    len(blocks), done)
    else:
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        pipeline = _pipeline(recipe, composition, loaded, options, manager, work)

    def save_block(i: int, res: PipelineResult) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in blocks[i].state_dict().items()}
        checkpoint.check_finite_tensors(tensors, where=f"{prefix}.{i}.")
        checkpoint.save_safetensors(tensors, work / f"block-{i:05d}.safetensors")
        layouts = {k: v for k, v in checkpoint.module_layouts(blocks[i], manager).items()}
        state = json.loads((work / PROGRESS).read_text()) if (work / PROGRESS).is_file() else {"layouts": {}}
        state["layouts"][str(i)] = layouts
        state.update(run_hash=run_hash, identity=identity, finished=i + 1,
                     layers=[{**asdict(r), "shape": list(r.shape)} for r in res.layers],
                     blocks=res.blocks, seconds=res.seconds, warnings=res.warnings)
        atomic_write_json(work / PROGRESS, state)

    def save_vision(res: PipelineResult) -> None:
        prefixes = tuple(f"{p}." for p in _vision_prefixes(loaded, recipe.scope))
        tensors = {k: v.detach().cpu().contiguous() for k, v in loaded.model.state_dict().items()
                   if k.startswith(prefixes)}
        checkpoint.check_finite_tensors(tensors)
        checkpoint.save_safetensors(tensors, work / VISION_FILE)
        layouts = {k: v for k, v in checkpoint.module_layouts(loaded.model, manager).items() if k.startswith(prefixes)}
        state = json.loads((work / PROGRESS).read_text()) if (work / PROGRESS).is_file() else {
            "layouts": {}, "finished": 0, "layers": [], "blocks": [], "seconds": 0.0, "warnings": []}
        state.update(run_hash=run_hash, identity=identity, vision={
            "layouts": layouts, "layers": [{**asdict(r), "shape": list(r.shape)} for r in res.layers],
            "blocks": res.blocks, "seconds": res.seconds, "warnings": res.warnings})
        atomic_write_json(work / PROGRESS, state)

    vision: PipelineResult | None = None
    if recipe.scope != "language":
        if resume:
            vision = _restore_vision(loaded, work, manager)
        if vision is None:
            try:
                vision = quantize_vision_stacks(loaded, composition, encoded, recipe.scope, options, manager)
            except BaseException:
                _drop_if_empty(work)
                raise
            save_vision(vision)
    manager.hook.qe_run_start(command="quantize", info={"model": loaded.name, "composition": composition.label,
                                                       "num_blocks": len(blocks), "resumed_at": done,
                                                       "progress": progress})
    try:
        if pipeline is not None and done < len(blocks):
            try:
                result = pipeline.run(encoded, start_block=done, on_block_done=save_block, result=result,
                                      block_file=lambda i: work / f"block-{i:05d}.safetensors")
            except BaseException:
                _drop_if_empty(work)  # failed before its first block: nothing to resume from
                raise
        heldout = before_after.compare_with(reference, loaded.model) if reference is not None else None
        if vision is not None:
            result = PipelineResult(layers=vision.layers + result.layers, blocks=result.blocks,
                                    seconds=vision.seconds + result.seconds,
                                    warnings=vision.warnings + [w for w in result.warnings if w not in vision.warnings])
        manifest = _finish(loaded, work, out, recipe, composition, result, source, len(encoded),
                           token_counts(encoded), dhash, prefix, force, identity, manager,
                           adapter_dtype=adapter_dtype, sizes=sizes, heldout=heldout,
                           by_source=tokens_by_source(encoded),
                           stacks={"vision": {"blocks": vision.blocks}} if vision is not None else {},
                           budget_plan=budget_plan)
    except OSError as e:  # a full disk or a vanished folder: every finished block is still saved
        raise QEError(f"writing the checkpoint failed ({e.strerror or e}{': ' + str(e.filename) if e.filename else ''}): "
                      "every finished block is saved; fix the cause, then rerun with --resume") from None
    manager.hook.qe_run_end(command="quantize", output=str(out), figures=manifest["summary"])
    return out, manifest


def _pipeline(recipe, composition, loaded, options, manager, work) -> QuantizationPipeline | None:
    """The language model's pipeline; None for ``--scope vision``, which leaves the language
    model as it is (its linears are not checked either)."""
    if recipe.scope == "vision":
        return None
    try:
        return QuantizationPipeline(loaded, composition, options, manager)
    except BaseException:
        _drop_if_empty(work)
        raise


def _drop_if_empty(work: Path) -> None:
    """Remove a ``.NAME.partial`` directory that holds no finished block (nothing to resume)."""
    if work.is_dir() and not (work / PROGRESS).is_file() and not (work / checkpoint.MANIFEST).is_file():
        shutil.rmtree(work, ignore_errors=True)


def model_float_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters (the --dtype it was loaded in)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def state_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's tensors as stored (tensors sharing storage counted once)."""
    unique, _ = checkpoint.unique_tensors(model.state_dict(keep_vars=True))  # ties also found offloaded
    return sum(t.numel() * t.element_size() for t in unique.values())


def _restore_blocks(loaded: LoadedModel, work: Path, state: dict, manager) -> int:
    """Put the saved blocks back into the model; return how many. A block file that is
    missing or unreadable (a disk fault) ends the restore there: that block is quantized again."""
    blocks = loaded.adapter.decoder_blocks(loaded.model)
    done = int(state["finished"])
    for i in range(done):
        try:
            tensors = load_file(str(work / f"block-{i:05d}.safetensors"))
        except Exception as e:  # missing (OSError) or damaged (safetensors' own error type)
            log.warning("qe quantize: saved block %d is unreadable (%s): quantizing it again", i,
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
            return i
        offloaded = is_offloaded(blocks[i])
        checkpoint.install_quantized_modules(blocks[i], state["layouts"][str(i)], manager)
        if offloaded:  # read from its block file from now on, like a block this run quantized
            offload_to_file(blocks[i], work / f"block-{i:05d}.safetensors",
                            execution_device(blocks[i]) or torch.device("cpu"))
        else:
            blocks[i].load_state_dict(tensors, strict=True)
    return done


def _vision_prefixes(loaded: LoadedModel, scope: str) -> list[str]:
    """The full names of the vision stacks' blocks (--scope vision|all)."""
    from qe.models.stacks import scope_adapters

    out = []
    for adapter in scope_adapters(loaded.adapter, loaded.model, scope):
        if adapter is not loaded.adapter:
            out.extend(adapter.block_prefix(loaded.model, i) for i in range(len(adapter.decoder_blocks(loaded.model))))
    return out


def _restore_vision(loaded: LoadedModel, work: Path, manager) -> PipelineResult | None:
    """Put the saved vision stacks back into the model; None when the run saved none (or the
    file is unreadable: they are quantized again)."""
    state = json.loads((work / PROGRESS).read_text()) if (work / PROGRESS).is_file() else {}
    saved = state.get("vision")
    if not saved:
        return None
    try:
        tensors = load_file(str(work / VISION_FILE))
    except Exception as e:  # missing (OSError) or damaged (safetensors' own error type)
        log.warning("qe quantize: the saved vision stacks are unreadable (%s): quantizing them again",
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
    checkpoint.install_quantized_modules(loaded.model, saved["layouts"], manager)
    _, unexpected = loaded.model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise QEError(f"{work / VISION_FILE} does not fit the model ({unexpected[:3]}): pass --force to start over")
    layers = [LayerRecord(**{**r, "shape": tuple(r["shape"])}) for r in saved["layers"]]
    return PipelineResult(layers=layers, blocks=saved["blocks"], seconds=saved["seconds"], warnings=saved["warnings"])


def _summary(result: PipelineResult) -> dict[str, float]:
    def mean(key):
        vals = [r.figures[key] for r in result.layers if key in r.figures]
        return sum(vals) / len(vals) if vals else float("nan")

    return {"layers": len(result.layers), "mean_rel_error_base": mean("rel_error_base"),
            "mean_rel_error": mean("rel_error"), "seconds": result.seconds,
            "fit_seconds": sum(r.figures.get("fit_seconds", 0.0) for r in result.layers)}


def _finish(loaded, work, out, recipe, composition, result, source, n_samples, tokens, dhash, prefix, force,
            identity, manager, *, adapter_dtype: torch.dtype | None = None, sizes: dict | None = None,
            heldout: dict | None = None, by_source: dict | None = None, stacks: dict | None = None,
            budget_plan=None) -> dict:
    """Write the checkpoint files into ``work`` while the block files and progress stay, then
    the manifest (the commit point), then remove the block files and rename ``work`` to ``out``.
    Every step can be interrupted: ``--resume`` redoes or completes it."""
    _phase("shards")
    shard_names, aliases = checkpoint.save_tensors(loaded.model, work, adapter_dtype=adapter_dtype)
    _phase("config")
    loaded.model.config.save_pretrained(work)
    try:
        loaded.processor.save_pretrained(work)
    except Exception:  # some processors cannot save every part; the tokenizer is enough to reload
        loaded.tokenizer.save_pretrained(work)
    for extra in ("qe_model_card.json", "qe_tiny_model.json", "qe_processor.json"):
        src = Path(loaded.path or "") / extra
        if loaded.path and src.is_file():
            shutil.copy(src, work / extra)
    _phase("records")
    skip = {PROGRESS, checkpoint.MANIFEST}
    written = sorted(p.name for p in work.iterdir() if p.is_file() and p.name not in skip
                     and not p.match(BLOCK_FILES) and not p.name.startswith(".") and p.suffix != ".tmp")
    files = checkpoint.file_records(work, written)
    layouts = checkpoint.module_layouts(loaded.model, manager)
    bits = checkpoint.effective_bits(loaded.model, adapter_dtype)
    sizes = {**(sizes or {}), "checkpoint_bytes": sum((work / n).stat().st_size for n in written)}
    manifest = {
        "format": checkpoint.FORMAT,
        "format_version": checkpoint.FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "versions": _versions(),
        "model": {"name": loaded.name, "path": loaded.path, "adapter": loaded.adapter.name,
                  "class": type(loaded.model).__name__, "synthetic_vision_tower": loaded.synthetic_vision,
                  "notes": loaded.notes, "reference": checkpoint.reference_record(loaded.path)},
        "recipe": recipe.to_dict(),
        "composition": composition.describe(),
        "seed": recipe.seed,
        "calibration": {"source": source, "samples": n_samples, "tokens": tokens, "data_hash": dhash,
                        "tokens_by_source": by_source},
        "run": identity,
        "effective_bits": bits,
        "budget": _budget_record(budget_plan, bits, result),
        "adapter_dtype": str(adapter_dtype or torch.float32).removeprefix("torch."),
        "size": sizes,
        "heldout_check": heldout,
        "summary": _summary(result),
        "warnings": result.warnings,
        "layers": [{**asdict(r), "shape": list(r.shape)} for r in result.layers],
        "blocks": result.blocks,
        "scope": recipe.scope,
        "stacks": stacks or {},
        "layouts": layouts,
        "tied": aliases,
        "shards": shard_names,
        "files": files,
    }
    _phase("manifest")
    atomic_write_json(work / checkpoint.MANIFEST, json_safe(manifest))
    _complete(work, out, force)
    return manifest


def _budget_record(plan, bits: dict, result: PipelineResult) -> dict | None:
    """The manifest's ``budget``: the allocation and the checkpoint's exact bits against the target."""
    if plan is None:
        return None
    record = plan.record()
    record["bits"] = bits.get("bits")
    record["bits_per_weight"] = bits.get("bits_per_weight_with_adapters")
    record["within_budget"] = bool(bits.get("bits", 0) <= plan.budget * bits.get("weights", 0))
    if not record["within_budget"]:
        result.warnings.append(f"the checkpoint's {record['bits_per_weight']:.4f} bits per weight exceed the budget "
                               f"{plan.budget}: its bases took more bits than the planning pass measured")
    return record


def _complete(work: Path, out: Path, force: bool) -> None:
    """After the commit point: drop the block files and progress, then move ``work`` to ``out``."""
    _phase("cleanup")
    for f in sorted(work.glob(BLOCK_FILES)):
        f.unlink()
    (work / PROGRESS).unlink(missing_ok=True)
    for f in {*work.glob("*.tmp"), *work.glob(".*.tmp")}:  # left by writes that a fault cut short
        f.unlink(missing_ok=True)
    _phase("rename")
    old = None
    if out.exists():
        if not force:
            raise QEError(f"output directory {out} appeared while quantizing: pass --force to replace it")
        old = _old_dir(out)
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    _phase("swap")
    work.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

