"""Quantized checkpoints: a self-contained directory that reloads to the same model.

Layout of a checkpoint directory::

    qe_manifest.json          format version, recipe, versions, seed, calibration hash, per-layer
                              figures and module layouts, file sizes and SHA-256, effective bits
    model-0000k-of-0000n.safetensors   every tensor of the quantized model (packed weights, scales,
                              adapters, router, and the unquantized parts), shards of at most 2 GB
    config.json, tokenizer / processor files   as the original model's

Tensors that share storage (tied embeddings) are written once; the manifest records the
aliases and loading re-ties them. Loading checks each file's size and hash against the
manifest before reading it, so a truncated or tampered checkpoint is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qe.errors import ConfigError, ModelError
from qe.plugins import QEPluginManager, default_manager
from qe.quantizers.qlinear import QuantLinear

FORMAT = "qe-quantized"
FORMAT_VERSION = 2  # 2: compensator modules recorded with the plugin that rebuilds them
READABLE_VERSIONS = (1, 2)
MANIFEST = "qe_manifest.json"
MAX_SHARD_BYTES = 2 * 1024**3


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def module_layouts(model: nn.Module, manager: QEPluginManager | None = None) -> dict[str, dict[str, Any]]:
    """Per quantized linear: its QuantLinear layout and its compensator module's record
    (``module`` type, the ``plugin`` that declares it and that plugin's ``distribution``, and
    the module's own ``layout``)."""
    manager = manager or default_manager()
    declared = {cls: entry for entry, cls in manager.compensator_modules().values()}
    out = {}
    for name, ql in quantized_layers(model).items():
        comp = ql.compensator
        record = None
        if comp is not None:
            entry = declared.get(type(comp))
            if entry is None:
                raise ConfigError(f"{name}: no installed compensator plugin lists {type(comp).__name__} in its `modules`, "
                                  "so a checkpoint could not rebuild it: add the class to its compensator's modules")
            record = {"module": comp.module_type, "plugin": entry.name, "distribution": entry.origin,
                      "layout": comp.layout()}
        out[name] = {"linear": ql.layout(), "compensator": record}
    return out


def _dedup_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with tensors sharing storage written once; aliases point to the kept key."""
    state: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, tensor in model.state_dict(keep_vars=False).items():
        if tensor is None:
            continue
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() > 0 and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        state[key] = tensor.detach().cpu().contiguous()
    return state, aliases


def save_tensors(model: nn.Module, directory: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> tuple[list[str], dict[str, str]]:
    """Write the model's tensors as safetensors shards; return file names and aliases."""
    state, aliases = _dedup_state(model)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
    names = []
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(Path(directory) / name), metadata={"format": "pt"})
        names.append(name)
    return names, aliases


def file_records(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {n: {"bytes": (Path(directory) / n).stat().st_size, "sha256": sha256_file(Path(directory) / n)} for n in names}


def verify_files(directory: Path, files: dict[str, dict[str, Any]]) -> None:
    for name, rec in files.items():
        path = Path(directory) / name
        if not path.is_file():
            raise ModelError(f"checkpoint {directory} is missing {name}: copy the whole directory again")
        size = path.stat().st_size
        if size != rec["bytes"]:
            raise ModelError(f"checkpoint file {path} has {size} bytes, the manifest says {rec['bytes']}: "
                             "the copy is truncated or altered; copy it again")
        if sha256_file(path) != rec["sha256"]:
            raise ModelError(f"checkpoint file {path} does not match its SHA-256 in the manifest: "
                             "it was altered or corrupted; copy it again")


def install_quantized_modules(model: nn.Module, layouts: dict[str, dict[str, Any]],
                              manager: QEPluginManager | None = None) -> None:
    """Replace the named linears by empty QuantLinear modules (with compensators) to be filled.

    Compensator modules are rebuilt only by classes that installed compensator plugins
    declare (``Compensator.modules``): nothing named in the checkpoint is imported."""
    manager = manager or default_manager()
    modules = manager.compensator_modules()
    for name, layout in layouts.items():
        ql = QuantLinear.from_layout(layout["linear"])
        if layout.get("compensator") is not None:
            ql.compensator = compensator_module(name, layout["compensator"], modules)
        model.set_submodule(name, ql)


def compensator_module(layer: str, record: dict[str, Any], modules: dict[str, tuple[Any, type]]) -> nn.Module:
    """The empty compensator module of one layer's record (see :func:`module_layouts`)."""
    if "module" in record:
        module_type, layout = record["module"], record["layout"]
    else:  # format 1: the built-in adapters wrote their type into their layout
        module_type, layout = record.get("type"), record
    if module_type not in modules:
        plugin = record.get("plugin", module_type)
        dist = record.get("distribution") or "an unknown distribution"
        hint = f"pip install {dist.split()[0]}" if dist not in ("built-in", "an unknown distribution") else "install it"
        raise ModelError(f"{layer} needs compensator plugin {plugin!r} (module {module_type!r}, from {dist}), which is "
                         f"not installed: {hint} so that it registers under the `qe` entry point group")
    try:
        return modules[module_type][1].from_layout(layout)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{layer}: the {module_type!r} layout in the manifest is malformed ({type(e).__name__}: {e}): "
                         "the checkpoint is damaged; quantize again") from None


def load_tensors(model: nn.Module, directory: Path, shard_names: list[str], aliases: dict[str, str]) -> None:
    state: dict[str, torch.Tensor] = {}
    for name in shard_names:
        state.update(load_file(str(Path(directory) / name)))
    for alias, target in aliases.items():
        state[alias] = state[target]
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Non-persistent buffers (rotary caches) are rebuilt by the model itself.
    persistent = set(model.state_dict().keys())
    missing = [m for m in missing if m in persistent]
    if missing or unexpected:
        raise ModelError(f"checkpoint {directory} does not fit its model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for alias, target in aliases.items():  # re-tie: point the alias at the target's parameter
        _tie(model, alias, target)


def _tie(model: nn.Module, alias: str, target: str) -> None:
    a_mod, _, a_name = alias.rpartition(".")
    t_mod, _, t_name = target.rpartition(".")
    tgt = getattr(model.get_submodule(t_mod) if t_mod else model, t_name)
    owner = model.get_submodule(a_mod) if a_mod else model
    if isinstance(tgt, nn.Parameter):
        setattr(owner, a_name, tgt)


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ModelError(f"{directory} is not a qe checkpoint ({MANIFEST} missing): give a directory written by `qe quantize`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path} is not valid JSON ({e.msg}): the checkpoint is damaged") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") not in READABLE_VERSIONS:
        raise ModelError(f"{path}: format {manifest.get('format')} v{manifest.get('format_version')} is not "
                         f"{FORMAT} v{FORMAT_VERSION}: re-quantize with this version of qe")
    return manifest


def is_checkpoint(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / MANIFEST).is_file()


def effective_bits(model: nn.Module) -> dict[str, float]:
    """Stored bits per quantized weight, without and with the compensators' tensors."""
    layers = quantized_layers(model)
    weights = sum(q.in_features * q.out_features for q in layers.values())
    base = sum(q.storage_bytes(include_compensator=False) for q in layers.values())
    full = sum(q.storage_bytes(include_compensator=True) for q in layers.values())
    if weights == 0:
        return {"bits_per_weight": float("nan"), "bits_per_weight_with_adapters": float("nan")}
    return {"bits_per_weight": 8 * base / weights, "bits_per_weight_with_adapters": 8 * full / weights}


def load_quantized(directory: str | Path, *, device: str | None = None, manager=None):
    """Load a checkpoint written by ``qe quantize`` as a :class:`~qe.models.loading.LoadedModel`.

    The model's outputs equal those of the in-memory quantized model that was saved.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from qe.models.loading import LoadedModel, load_processor, select_adapter

    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_files(directory, manifest["files"])
    config = AutoConfig.from_pretrained(directory)
    try:
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    except ValueError:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    install_quantized_modules(model, manifest["layouts"], manager)
    load_tensors(model, directory, manifest["shards"], manifest.get("tied", {}))
    model.eval()
    if device is not None:
        model.to(device)
    adapter = select_adapter(model, manager)
    processor = load_processor(str(directory), adapter, config)
    info = manifest["model"]
    notes = list(info.get("notes", [])) + [f"quantized with {manifest['composition']['quantizer']} + "
                                           f"{manifest['composition']['compensator']} at {manifest['composition']['setting']}"]
    card = {"synthetic_vision_tower": info.get("synthetic_vision_tower", False)}
    return LoadedModel(model, processor, adapter, f"{info['name']}-quantized", str(directory), notes, card, manifest)
