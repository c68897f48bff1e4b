"""``qe export``: a qe checkpoint as a compressed-tensors base, optionally with a PEFT LoRA adapter.

Output directory (written under a temporary name and renamed when complete)::

    config.json              the model's config with ``quantization_config`` (compressed-tensors)
    model.safetensors        the compressed base (``weight_packed`` / ``weight`` int8, ``weight_scale``,
                             ``weight_zero_point``, ``weight_shape``) and the unquantized tensors
    tokenizer / processor files   copied from the checkpoint
    lora/adapter_config.json, lora/adapter_model.safetensors   with ``--format peft-lora``
    qe_export.json           what was folded, kept and dropped, sizes, and (QE) the perplexity
                             with and without the routed experts

See docs/export-format.md for tensor names, shapes and dtypes.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from qe.errors import ConfigError, QEError
from qe.export.plan import check_base, check_kv_cache, fold_plan, lowrank_term
from qe.paths import atomic_directory, json_safe

FORMATS = ("compressed-tensors", "peft-lora", "transformers")
REPORT = "qe_export.json"
ADAPTER_DIR = "lora"
_SKIP_FILES = {"qe_manifest.json", "config.json"}
DEFAULT_EVAL_TOKENS = 8192


def require(fmt: str) -> None:
    """The optional dependencies of ``fmt``, or a one-line error naming the extra."""
    needed = {"compressed-tensors": ["compressed_tensors"], "peft-lora": ["compressed_tensors", "peft"]}.get(fmt, [])
    for module in needed:
        try:
            __import__(module)
        except ImportError:
            dist = module.replace("_", "-")
            raise ConfigError(f"qe export --format {fmt} needs {dist}, which is not installed: "
                              "pip install 'qe-quant[export]'") from None


def dir_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in Path(path).rglob(pattern) if p.is_file())


def export_checkpoint(
    checkpoint: str | Path,
    fmt: str,
    out: str | Path,
    *,
    force: bool = False,
    eval_tokens: int | None = DEFAULT_EVAL_TOKENS,
    evaluate: bool = True,
    manager=None,
    progress: bool = False,
    loaded=None,
) -> tuple[Path, dict[str, Any]]:
    """Export ``checkpoint`` (a ``qe quantize`` directory) as ``fmt`` into ``out``.

    ``fmt``: ``compressed-tensors`` (the base alone; compensators are left out and the report
    says so), ``peft-lora`` (the base plus a PEFT LoRA adapter in ``out/lora``) or
    ``transformers`` (the whole qe model, routed experts included, loadable with
    ``from_pretrained`` after ``import qe``: :func:`export_transformers`). With
    ``evaluate`` and a checkpoint whose compensators route experts, the perplexity of qe's
    model with and without its routed experts is measured on the held-out text
    (``eval_tokens`` tokens; None = all of it) and written to the report. ``loaded``: the
    checkpoint already loaded (``qe.load_quantized``); it is rewritten in place.
    """
    from qe import checkpoint as ckpt_mod
    from qe.models.loading import load_quantized

    t0 = time.perf_counter()
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and not force:
        raise QEError(f"output directory {out} exists: choose another --out or pass --force")
    source = Path(checkpoint)
    if not ckpt_mod.is_checkpoint(source):
        raise QEError(f"{source} is not a qe checkpoint (qe_manifest.json missing): give a directory written by "
                      "`qe quantize`")
    require(fmt)
    if fmt == "transformers":
        return export_transformers(source, out, force=force, manager=manager)
    check_kv_cache(loaded.manifest if loaded is not None else ckpt_mod.read_manifest(source))  # before loading it
    loaded = loaded if loaded is not None else load_quantized(source, manager=manager)
    model = loaded.model
    layers = ckpt_mod.quantized_layers(model)
    if not layers:
        raise ConfigError(f"{source} has no quantized linears: nothing to export")
    for name, ql in layers.items():
        check_base(name, ql)
    folds = fold_plan(model, layers)

    terms: dict[str, Any] = {}
    report: dict[str, Any] = {"format": fmt, "source": str(source.resolve()), "notes": []}
    with_comp = [n for n, ql in layers.items() if ql.compensator is not None]
    if fmt == "peft-lora":
        for name, ql in layers.items():
            term = lowrank_term(name, ql, loaded.manifest)
            if term is not None:
                terms[name] = term
    elif with_comp:
        report["notes"].append(f"{len(with_comp)} layers' compensators are not in a compressed-tensors base: "
                               "export --format peft-lora to keep their low-rank terms")

    if fmt == "peft-lora" and not any(t.rank > 0 for t in terms.values()):
        raise ConfigError(f"{source} has no low-rank compensator term to write as PEFT LoRA: export "
                          "--format compressed-tensors for the base alone")
    routed = {n: t.dropped for n, t in terms.items() if t.dropped.get("num_experts")}
    if routed:
        report["notes"].append(
            f"{len(routed)} layers' routed low-rank experts and routers are not expressible as PEFT LoRA "
            "(a token-dependent choice of adapter) and are dropped; the adapter holds each layer's shared expert")
        report["routed_experts_dropped"] = routed
        if evaluate:
            report["perplexity"] = _routing_cost(loaded, terms, eval_tokens, progress)

    # From here on the model is rewritten: the QuantLinears become compressed-tensors linears.
    from qe.export.compressed import state_to_shards, to_compressed
    from qe.export.lora import divide_rows, write_adapter

    for producer, (_consumer, divisor) in folds.items():
        if producer in terms:
            terms[producer] = divide_rows(terms[producer], divisor)
    compressor = to_compressed(model, layers, folds, progress)

    with atomic_directory(out, force=force) as tmp:
        shards = state_to_shards(model.state_dict(), tmp)
        model.config.save_pretrained(tmp)
        compressor.update_config(str(tmp))
        for f in source.iterdir():
            if f.is_file() and f.name not in _SKIP_FILES and f.suffix != ".safetensors":
                shutil.copy(f, tmp / f.name)
        adapter = None
        if fmt == "peft-lora":
            adapter = write_adapter(terms, tmp / ADAPTER_DIR)
        report.update(
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(),
            composition=(loaded.manifest or {}).get("composition"),
            quantization_config=json.loads((tmp / "config.json").read_text()).get("quantization_config"),
            folded={consumer: producer for producer, (consumer, _) in folds.items()},
            layers=len(layers),
            shards=shards,
            adapter=None if adapter is None else {
                "directory": ADAPTER_DIR, "modules": len([t for t in terms.values() if t.rank > 0]),
                "ranks": {n: t.rank for n, t in terms.items()}, "sources": sorted({t.source for t in terms.values()}),
            },
            bytes={"checkpoint": dir_bytes(source), "base": dir_bytes(tmp) - dir_bytes(tmp / ADAPTER_DIR),
                   "adapter": dir_bytes(tmp / ADAPTER_DIR)},
            seconds=time.perf_counter() - t0,
        )
        (tmp / REPORT).write_text(json.dumps(json_safe(report), indent=1))
    return out, report


def export_transformers(source: Path, out: Path, *, force: bool = False, manager=None) -> tuple[Path, dict[str, Any]]:
    """A copy of the qe checkpoint that transformers' ``from_pretrained`` loads (qe.export.hf):
    the same shards and manifest (so ``qe.load_quantized`` reads it too), ``config.json`` with
    ``quantization_config = {"quant_method": "qe", "layouts": ...}`` and a
    ``model.safetensors.index.json`` naming the shard of every tensor."""
    from safetensors import safe_open

    from qe import checkpoint as ckpt_mod
    from qe.plugins import default_manager

    t0 = time.perf_counter()
    manifest = ckpt_mod.read_manifest(source)
    ckpt_mod.verify_files(source, manifest["files"])
    check_kv_cache(manifest)
    modules = (manager or default_manager()).compensator_modules()
    for name, layout in manifest["layouts"].items():  # every compensator must be rebuildable at load
        if (layout.get("linear") or {}).get("input_rotation"):
            raise ConfigError(f"{name}: its input is rotated online (the rotate transform), which the transformers "
                              "export does not carry: load the checkpoint with qe.load_quantized instead")
        if layout.get("compensator") is not None:
            ckpt_mod.compensator_module(name, layout["compensator"], modules)
    with atomic_directory(out, force=force) as tmp:
        for f in source.iterdir():
            if f.is_file():
                shutil.copy(f, tmp / f.name)
        config = json.loads((source / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "qe", "format_version": manifest["format_version"],
                                         "layouts": manifest["layouts"]}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        weight_map = {}
        for shard in manifest["shards"]:
            with safe_open(str(tmp / shard), "pt") as fh:
                weight_map.update({key: shard for key in fh.keys()})
        total = sum(rec["bytes"] for rec in manifest["files"].values())
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        report = {"format": "transformers", "source": str(source.resolve()), "notes": [
            "load with AutoModelForImageTextToText/AutoModelForCausalLM.from_pretrained(DIR) after `import qe`"],
            "composition": manifest.get("composition"), "layers": len(manifest["layouts"]), "shards": manifest["shards"],
            "bytes": {"checkpoint": dir_bytes(source), "base": dir_bytes(tmp), "adapter": 0},
            "seconds": time.perf_counter() - t0}
        (tmp / REPORT).write_text(json.dumps(json_safe(report), indent=1))
        # the copy stays a qe checkpoint: its manifest hashes the files this export changed or added
        manifest["files"].update(ckpt_mod.file_records(tmp, ["config.json", "model.safetensors.index.json", REPORT]))
        (tmp / ckpt_mod.MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out, report


def keep_only_lowrank_terms(model, terms: dict[str, Any]) -> None:
    """Replace each listed layer's compensator by its exported low-rank term (routing dropped):
    the model then computes what base + PEFT adapter compute."""
    from qe.checkpoint import quantized_layers
    from qe.compensators.modules import LowRankAdapter

    for name, ql in quantized_layers(model).items():
        if name in terms:
            t = terms[name]
            ql.compensator = LowRankAdapter.from_factors(t.A, t.B) if t is not None and t.rank > 0 else None


def _routing_cost(loaded, terms, eval_tokens: int | None, progress: bool) -> dict[str, Any]:
    """Perplexity of qe's model with its routed experts and without them (what the adapter keeps)."""
    from qe.evaluation.perplexity import perplexity

    t0 = time.perf_counter()
    with torch.no_grad():
        full = perplexity(loaded, progress=progress, max_tokens=eval_tokens)
        keep_only_lowrank_terms(loaded.model, terms)
        shared = perplexity(loaded, progress=progress, max_tokens=eval_tokens)
    return {"with_routed_experts": full.ppl, "without_routed_experts": shared.ppl,
            "increase": shared.ppl / full.ppl - 1.0, "tokens": full.tokens,
            "seconds": time.perf_counter() - t0,
            "protocol": "held-out pydoc text, 512-token windows" + (f", first {eval_tokens} tokens" if eval_tokens else "")}

