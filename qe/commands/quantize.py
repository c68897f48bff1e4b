"""``qe quantize``: run a recipe over a model and write a self-contained, resumable checkpoint.

The output is built in ``.<name>.partial`` beside the final directory. After each decoder
block, that block's tensors (quantized linears, adapters, smoothed norms) and the run's
progress go there, so ``--resume`` continues from the last finished block and gives the same
tensors as an uninterrupted run. When every block is done, the whole model is written as
safetensors shards with a manifest, and the directory is renamed into place.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from qe import checkpoint
from qe.data.calibration import calibration_set, data_hash, token_counts
from qe.errors import ConfigError, QEError
from qe.models.loading import LoadedModel, load_model
from qe.pipeline import LayerRecord, PipelineOptions, PipelineResult, QuantizationPipeline
from qe.plugins import default_manager
from qe.recipe import Recipe

PROGRESS = "progress.json"


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _versions() -> dict[str, str]:
    import transformers

    import qe

    return {"qe": qe.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


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
) -> tuple[Path, dict]:
    """Quantize with ``recipe`` and write the checkpoint to ``out``; return it and its manifest."""
    manager = manager or default_manager()
    composition = recipe.validate(manager)  # before any model loads
    out = Path(out)
    if out.exists() and not force:
        raise QEError(f"output directory {out} exists: choose another --out or pass --force")
    work = partial_dir(out)
    loaded = loaded or load_model(model, dtype=dtype, device=device)
    source, encoded = calibration_set(loaded, recipe.calib, recipe.samples, progress)
    dhash = data_hash(encoded)
    model_id = str(loaded.path or loaded.name)
    run_hash = recipe.hash(model_id, dhash)

    done = 0
    result = PipelineResult()
    if resume and (work / PROGRESS).is_file():
        state = json.loads((work / PROGRESS).read_text())
        if state["run_hash"] != run_hash:
            raise ConfigError(f"{work} holds an interrupted run of a different recipe, model or data: "
                              "rerun without --resume to start over")
        done = _restore_blocks(loaded, work, state, manager)
        result.layers = [LayerRecord(**{**r, "shape": tuple(r["shape"])}) for r in state["layers"]]
        result.blocks = state["blocks"]
        result.seconds = state["seconds"]
        result.warnings = state["warnings"]
    else:
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)

    options = PipelineOptions(propagation=recipe.propagation, max_tokens=recipe.max_tokens, device=device,
                              seed=recipe.seed, progress=progress, skip=recipe.skip, overrides=recipe.overrides)
    pipeline = QuantizationPipeline(loaded, composition, options, manager)
    blocks = loaded.adapter.decoder_blocks(loaded.model)
    prefix = loaded.adapter.blocks_prefix(loaded.model)

    def save_block(i: int, res: PipelineResult) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in blocks[i].state_dict().items()},
                  str(work / f"block-{i:05d}.safetensors"))
        layouts = {k: v for k, v in checkpoint.module_layouts(blocks[i], manager).items()}
        state = json.loads((work / PROGRESS).read_text()) if (work / PROGRESS).is_file() else {"layouts": {}}
        state["layouts"][str(i)] = layouts
        state.update(run_hash=run_hash, finished=i + 1,
                     layers=[{**asdict(r), "shape": list(r.shape)} for r in res.layers],
                     blocks=res.blocks, seconds=res.seconds, warnings=res.warnings)
        _write_json(work / PROGRESS, state)

    manager.hook.qe_run_start(command="quantize", info={"model": loaded.name, "composition": composition.label,
                                                       "num_blocks": len(blocks), "resumed_at": done})
    if done < len(blocks):
        result = pipeline.run(encoded, start_block=done, on_block_done=save_block, result=result)

    manifest = _finish(loaded, work, out, recipe, composition, result, source, len(encoded), token_counts(encoded),
                       dhash, prefix, force, manager)
    manager.hook.qe_run_end(command="quantize", output=str(out), figures=manifest["summary"])
    return out, manifest


def _restore_blocks(loaded: LoadedModel, work: Path, state: dict, manager) -> int:
    blocks = loaded.adapter.decoder_blocks(loaded.model)
    done = int(state["finished"])
    for i in range(done):
        checkpoint.install_quantized_modules(blocks[i], state["layouts"][str(i)], manager)
        tensors = load_file(str(work / f"block-{i:05d}.safetensors"))
        blocks[i].load_state_dict(tensors, strict=True)
    return done


def _summary(result: PipelineResult) -> dict[str, float]:
    def mean(key):
        vals = [r.figures[key] for r in result.layers if key in r.figures]
        return sum(vals) / len(vals) if vals else float("nan")

    return {"layers": len(result.layers), "mean_rel_error_base": mean("rel_error_base"),
            "mean_rel_error": mean("rel_error"), "seconds": result.seconds,
            "fit_seconds": sum(r.figures.get("fit_seconds", 0.0) for r in result.layers)}


def _finish(loaded, work, out, recipe, composition, result, source, n_samples, tokens, dhash, prefix, force, manager) -> dict:
    for f in work.glob("block-*.safetensors"):
        f.unlink()
    shard_names, aliases = checkpoint.save_tensors(loaded.model, work)
    loaded.model.config.save_pretrained(work)
    try:
        loaded.processor.save_pretrained(work)
    except Exception:  # some processors cannot save every part; the tokenizer is enough to reload
        loaded.tokenizer.save_pretrained(work)
    for extra in ("qe_model_card.json", "qe_tiny_model.json", "qe_processor.json"):
        src = Path(loaded.path or "") / extra
        if loaded.path and src.is_file():
            shutil.copy(src, work / extra)
    files = checkpoint.file_records(work, shard_names)
    layouts = checkpoint.module_layouts(loaded.model, manager)
    bits = checkpoint.effective_bits(loaded.model)
    manifest = {
        "format": checkpoint.FORMAT,
        "format_version": checkpoint.FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "versions": _versions(),
        "model": {"name": loaded.name, "path": loaded.path, "adapter": loaded.adapter.name,
                  "class": type(loaded.model).__name__, "synthetic_vision_tower": loaded.synthetic_vision,
                  "notes": loaded.notes},
        "recipe": recipe.to_dict(),
        "composition": composition.describe(),
        "seed": recipe.seed,
        "calibration": {"source": source, "samples": n_samples, "tokens": tokens, "data_hash": dhash},
        "effective_bits": bits,
        "summary": _summary(result),
        "warnings": result.warnings,
        "layers": [{**asdict(r), "shape": list(r.shape)} for r in result.layers],
        "blocks": result.blocks,
        "layouts": layouts,
        "tied": aliases,
        "shards": shard_names,
        "files": files,
    }
    (work / PROGRESS).unlink(missing_ok=True)
    _write_json(work / checkpoint.MANIFEST, _json_safe(manifest))
    if out.exists():
        if not force:
            raise QEError(f"output directory {out} appeared while quantizing: pass --force to replace it")
        shutil.rmtree(out)
    work.rename(out)
    return manifest


def _json_safe(value):
    import math

    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
