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

import contextlib
import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from qe.errors import ConfigError, ModelError, NumericalError
from qe.plugins import QEPluginManager, default_manager
from qe.quantizers.qlinear import QuantLinear
from qe.transforms.hadamard import has_hadamard

FORMAT = "qe-quantized"
FORMAT_VERSION = 2  # 2: compensator modules recorded with the plugin that rebuilds them
READABLE_VERSIONS = (1, 2)
MANIFEST = "qe_manifest.json"
MAX_SHARD_BYTES = 2 * 1024**3
OFFLOADED_SHARD_BYTES = 256 * 1024**2  # a model too large for memory is written in smaller pieces


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensors_digest(directory: Path | str) -> str:
    """SHA-256 over a checkpoint's tensors, key by key in sorted order (each key, dtype, shape and
    bytes), whatever the shards: two checkpoints with equal tensors have equal digests however
    they were split (an offloaded run writes smaller shards than an in-memory one)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    h = hashlib.sha256()
    with contextlib.ExitStack() as stack:
        where: dict[str, Any] = {}
        shard_of: dict[str, str] = {}
        for name in manifest["shards"]:
            fh = stack.enter_context(safe_open(str(confined_file(directory, name)), framework="pt"))
            for key in fh.keys():
                if key in where:  # which copy counts would be arbitrary
                    raise ModelError(f"checkpoint {directory}: tensor {key} is in both {shard_of[key]} and {name}: "
                                     "the checkpoint is damaged; re-quantize")
                where[key], shard_of[key] = fh, name
        for key in sorted(where):
            t = where[key].get_tensor(key).contiguous()
            h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
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


def unique_tensors(state: dict[str, torch.Tensor | None]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``state`` with tensors sharing storage (tied embeddings) kept once; ``aliases`` maps each
    dropped key to the key kept for it."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, tensor in state.items():
        if tensor is None:
            continue
        if tensor.device.type == "meta":  # no storage to compare: only the same tensor object is tied
            ident: tuple = ("meta", id(tensor))
        else:
            ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() > 0 and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        unique[key] = tensor
    return unique, aliases


def adapter_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the compensators' tensors that follow ``--adapter-dtype`` (every floating
    tensor of a compensator module, except those of modules that fixed their own precision)."""
    return {f"{name}.compensator.{key}" for name, ql in quantized_layers(model).items() if ql.compensator is not None
            for key in _castable(ql.compensator)}


def _castable(module: nn.Module) -> set[str]:
    from qe.compensators.base import CompensatorModule  # lazy: qe.compensators imports the quantizers

    if isinstance(module, CompensatorModule):
        return module.castable_keys()
    return {k for k, t in module.state_dict().items() if t.is_floating_point()}


def layer_storage_bits(ql: QuantLinear, adapter_dtype: torch.dtype | None = None) -> tuple[int, int]:
    """Stored bits of one quantized linear, ``(base, compensator)``: every tensor the checkpoint
    writes for it (packed codes, scales, zero points, bias, smoothing scale, exemption mask; the
    compensator's factors, steps and router), the castable ones counted in ``adapter_dtype``."""
    base = 8 * ql.storage_bytes(include_compensator=False)
    comp = 0
    if ql.compensator is not None:
        castable = _castable(ql.compensator) if adapter_dtype is not None else set()
        size = torch.empty((), dtype=adapter_dtype).element_size() if adapter_dtype is not None else 0
        for key, t in ql.compensator.state_dict().items():
            comp += 8 * t.numel() * (size if key in castable else t.element_size())
    return base, comp


def split_into_shards(tensors: dict[str, torch.Tensor], max_bytes: int = MAX_SHARD_BYTES) -> list[dict[str, torch.Tensor]]:
    """Consecutive tensors grouped into shards of at most ``max_bytes`` (a larger tensor gets
    a shard of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
    return shards


def save_tensors(model: nn.Module, directory: Path, max_shard_bytes: int = MAX_SHARD_BYTES,
                 adapter_dtype: torch.dtype | None = None) -> tuple[list[str], dict[str, str]]:
    """Write the model's tensors as safetensors shards; return file names and aliases.

    With ``adapter_dtype``, the compensators' floating-point tensors are stored in that dtype
    (the model in memory is unchanged); loading casts them back into the modules' buffers.
    A model with offloaded parts is read one module at a time and written one shard at a time
    (shards of at most :data:`OFFLOADED_SHARD_BYTES`), so writing holds one shard in memory."""
    from qe.models.offload import is_offloaded, real_state_items

    adapters = adapter_keys(model)
    if is_offloaded(model):
        # Nothing is real yet, so ties are found by identity, and from the model's declared ties:
        # accelerate gives each offloaded module its own meta tensors, which breaks identity.
        state = model.state_dict(keep_vars=True)
        _, aliases = unique_tensors(state)
        aliases.update({k: v for k, v in declared_ties(model).items() if k in state and v in state and k not in aliases})
        items = ((k, t) for k, t in real_state_items(model) if k not in aliases)
        max_shard_bytes = min(max_shard_bytes, OFFLOADED_SHARD_BYTES)
    else:
        unique, aliases = unique_tensors(model.state_dict())
        items = ((k, t.detach().cpu()) for k, t in unique.items())
    pending: list[Path] = []
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        path = Path(directory) / f".model-{len(pending) + 1:05d}.pending.tmp"
        save_safetensors(shard, path, metadata={"format": "pt"})
        pending.append(path)

    for key, tensor in items:
        tensor = tensor.contiguous()
        if adapter_dtype is not None and key in adapters and tensor.is_floating_point():
            tensor = tensor.to(adapter_dtype)
        n = tensor.numel() * tensor.element_size()
        if shard and size + n > max_shard_bytes:
            flush()
            shard, size = {}, 0
        shard[key] = tensor
        size += n
    flush()
    names = [f"model-{i:05d}-of-{len(pending):05d}.safetensors" for i in range(1, len(pending) + 1)]
    for path, name in zip(pending, names):  # named once their count is known
        os.replace(path, Path(directory) / name)
    return names, aliases


def declared_ties(model: nn.Module) -> dict[str, str]:
    """``{tied key: key it shares}`` that a transformers model declares (tied word embeddings)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return {}
    return dict(model.get_expanded_tied_weights_keys(all_submodels=True))


def check_finite_tensors(tensors: dict[str, torch.Tensor], where: str = "") -> None:
    """Raise :class:`NumericalError` naming the first floating tensor that holds NaN or Inf."""
    for key, t in tensors.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise NumericalError(f"NaN or Inf in {where}{key}, which would be written to the checkpoint: "
                                 "check the model's dtype, the recipe's parameters and the calibration data")


def save_module(module: nn.Module, path: Path) -> None:
    """``module``'s state dict (on the CPU, contiguous) as the safetensors file ``path``: the file
    an offloaded quantized block is read back from."""
    save_safetensors({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, path)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """Write a safetensors file under a temporary name, then rename it into place, with the
    permissions of any file created under the user's umask; NaN or Inf is refused."""
    from qe.paths import apply_umask

    check_finite_tensors(tensors)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_records(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {n: {"bytes": (Path(directory) / n).stat().st_size, "sha256": sha256_file(Path(directory) / n)} for n in names}


_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def confined_file(directory: Path, name: Any) -> Path:
    """``directory / name`` for a plain file name that stays inside ``directory``; else refuse.

    Absolute names, ``..``, sub-folders and links that lead outside are refused without
    touching the file they name.
    """
    directory = Path(directory)
    if not isinstance(name, str) or not _FILE_NAME.match(name) or name in (".", ".."):
        raise ModelError(f"checkpoint {directory}: the manifest names the file {str(name)[:80]!r}, which is not a plain "
                         "file name inside the checkpoint: the manifest is damaged or hostile; re-quantize")
    path = directory / name
    if path.is_symlink() or not path.resolve().is_relative_to(directory.resolve()):
        raise ModelError(f"checkpoint {directory}: {name} leads outside the checkpoint (a link): "
                         "copy the checkpoint's real files, or re-quantize")
    return path


def _check_file_records(directory: Path, files: Any) -> None:
    if not isinstance(files, dict) or not files:
        raise ModelError(f"checkpoint {directory}: the manifest's \"files\" must map file names to their size and "
                         "SHA-256: the manifest is damaged; re-quantize")
    for name, rec in files.items():
        confined_file(directory, name)
        if (not isinstance(rec, dict) or type(rec.get("bytes")) is not int or rec["bytes"] < 0
                or not isinstance(rec.get("sha256"), str) or not _SHA256.match(rec["sha256"])):
            raise ModelError(f"checkpoint {directory}: the manifest's record of {name} needs \"bytes\" (an integer) "
                             "and \"sha256\" (64 hex digits): the manifest is damaged; re-quantize")


def verify_files(directory: Path, files: dict[str, dict[str, Any]]) -> None:
    directory = Path(directory)
    _check_file_records(directory, files)
    for name, rec in files.items():
        path = confined_file(directory, name)
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


def compensator_module_class(layer: str, record: dict[str, Any], modules: dict[str, tuple[Any, type]]) -> type:
    """The installed module class that rebuilds one layer's compensator record; one line naming
    the plugin and its distribution when none is installed."""
    module_type = record.get("module") if "module" in record else record.get("type")  # format 1: "type"
    if not isinstance(module_type, str) or module_type not in modules:
        plugin = str(record.get("plugin", module_type))[:80]
        dist = str(record.get("distribution") or "an unknown distribution")[:80]
        hint = f"pip install {dist.split()[0]}" if dist not in ("built-in", "an unknown distribution") else "install it"
        raise ModelError(f"{layer} needs compensator plugin {plugin!r} (module {str(module_type)[:80]!r}, from {dist}), which is "
                         f"not installed: {hint} so that it registers under the `qe` entry point group")
    return modules[module_type][1]


def compensator_module(layer: str, record: dict[str, Any], modules: dict[str, tuple[Any, type]]) -> nn.Module:
    """The empty compensator module of one layer's record (see :func:`module_layouts`)."""
    module_cls = compensator_module_class(layer, record, modules)
    module_type = module_cls.module_type
    layout = record["layout"] if "module" in record else record
    try:
        return module_cls.from_layout(layout)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{layer}: the {module_type!r} layout in the manifest is malformed ({type(e).__name__}: {e}): "
                         "the checkpoint is damaged; quantize again") from None


def load_tensors(model: nn.Module, directory: Path, shard_names: list[str], aliases: dict[str, str],
                 files: dict[str, dict[str, Any]] | None = None, only: set[str] | None = None) -> None:
    """Fill ``model`` shard by shard: one shard's tensors in memory at a time, assigned in place
    of the model's (so a model built on the meta device is materialised by the loading itself).
    With ``files`` (the manifest's hashed file records), every shard must be one of them: a
    shard left out of ``files`` is refused, not read. With ``only``, just those state-dict keys
    are read (the rest of the model stays where it is, e.g. offloaded)."""
    directory = Path(directory)
    if not isinstance(shard_names, list) or not shard_names:
        raise ModelError(f"checkpoint {directory}: the manifest's \"shards\" must be a list of file names: "
                         "the manifest is damaged; re-quantize")
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and _MODULE_NAME.match(k) and isinstance(v, str)
                                                and _MODULE_NAME.match(v) for k, v in aliases.items()):
        raise ModelError(f"checkpoint {directory}: the manifest's \"tied\" must map tensor names to tensor names: "
                         "the manifest is damaged; re-quantize")
    paths = []
    for name in shard_names:  # every shard checked before any is read
        path = confined_file(directory, name)
        if files is not None and name not in files:
            raise ModelError(f"checkpoint {directory}: shard {name} is not among the manifest's hashed files, so "
                             "it cannot be checked: the manifest is damaged or hostile; re-quantize")
        paths.append((name, path))
    current = model.state_dict()  # persistent tensors (rotary caches rebuild themselves); meta ones cost nothing
    expected = set(current) if only is None else set(current) & only
    loaded: set[str] = set()
    for name, path in paths:
        shard = _read_shard(path, None if only is None else only | {aliases[k] for k in only if k in aliases})
        for key, tensor in shard.items():  # adapters stored in a smaller dtype come back in the model's
            if key in current and tensor.is_floating_point() and tensor.dtype != current[key].dtype:
                shard[key] = tensor.to(current[key].dtype)
            elif tensor.data_ptr() % _ALIGNMENT:
                # safetensors places tensors at any byte offset; a matmul kernel may take another
                # path for an unaligned operand and round differently, so the reloaded model
                # would not give the saved one's outputs bit for bit: realign.
                shard[key] = tensor.clone()
        for alias, target in aliases.items():
            if target in shard and (only is None or alias in only):
                shard[alias] = shard[target]
        try:
            _, unexpected = model.load_state_dict(shard, strict=False, assign=True)
        except RuntimeError as e:  # a tensor of the wrong shape
            first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
            raise ModelError(f"checkpoint {directory} does not fit its model ({first[:200]}): the checkpoint is damaged; "
                             "re-quantize") from None
        if unexpected:
            raise ModelError(f"checkpoint {directory} does not fit its model: {name} holds {unexpected[:3]} that it lacks")
        loaded.update(shard)
        del shard
    for alias, target in aliases.items():
        if target not in loaded and (only is None or alias in only):
            raise ModelError(f"checkpoint {directory}: tied tensor {alias} points to {target}, which no shard holds: "
                             "the manifest is damaged; re-quantize")
    missing = sorted(expected - loaded)
    if missing:
        raise ModelError(f"checkpoint {directory} does not fit its model: missing {missing[:3]}")
    for alias, target in aliases.items():  # re-tie: point the alias at the target's parameter
        if only is not None and not {alias, target} <= only:
            continue
        try:
            _tie(model, alias, target)
        except AttributeError:
            raise ModelError(f"checkpoint {directory}: tied tensor {alias} or {target} is not in the model: "
                             "the manifest is damaged; re-quantize") from None


_ALIGNMENT = 64  # bytes: what torch's CPU allocator gives every tensor


def _read_shard(path: Path, keys: set[str] | None) -> dict[str, torch.Tensor]:
    if keys is None:
        return load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k in keys}


def shard_index(directory: Path, shard_names: list[str], aliases: dict[str, str],
                dtypes: dict[str, torch.dtype]) -> dict[str, dict[str, str]]:
    """Where each tensor lies in the shards, as accelerate's offload index (``safetensors_file``,
    ``weight_name``, ``dtype``): offloaded modules then read their tensors straight from the
    checkpoint, and nothing is copied into an offload folder."""
    index: dict[str, dict[str, str]] = {}
    for name in shard_names:
        path = confined_file(Path(directory), name)
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key in dtypes:
                    index[key] = {"safetensors_file": str(path), "weight_name": key,
                                  "dtype": str(dtypes[key]).removeprefix("torch.")}
    for alias, target in aliases.items():
        if target in index:
            index[alias] = {**index[target], "dtype": str(dtypes.get(alias, dtypes[target])).removeprefix("torch.")}
    return index


def _tie(model: nn.Module, alias: str, target: str) -> None:
    a_mod, _, a_name = alias.rpartition(".")
    t_mod, _, t_name = target.rpartition(".")
    tgt = getattr(model.get_submodule(t_mod) if t_mod else model, t_name)
    owner = model.get_submodule(a_mod) if a_mod else model
    if isinstance(tgt, nn.Parameter):
        setattr(owner, a_name, tgt)


_LINEAR_INTS = {"in_features", "out_features", "bits", "group_size", "a_bits"}
_LINEAR_BOOLS = {"symmetric", "bias", "input_scale", "act_keep", "static_act_scale", "input_rotation"}


def _int_in(value: Any, lo: int, hi: int) -> bool:
    return type(value) is int and lo <= value <= hi


def validate_layouts(model: nn.Module, layouts: Any, directory: Path | str = "",
                     manager: QEPluginManager | None = None) -> None:
    """Check a manifest's module layouts against ``model`` before any module is built from them.

    Every name must be a linear of the model, every size must equal that linear's, bits must
    be in range, and each compensator's layout must pass its module class's own check
    (:meth:`~qe.compensators.base.CompensatorModule.layout_problem`, ranks in range for the
    built-in ones): a damaged or hostile manifest gets one line, not a traceback or a huge
    allocation.
    """
    from qe.quantizers.grid import WEIGHT_BITS

    modules = (manager or default_manager()).compensator_modules()

    where = f"checkpoint {directory}" if directory else "checkpoint"

    def bad(name: str, what: str) -> ModelError:
        return ModelError(f"{where}: layout of {str(name)[:120]!r}: {what}: the manifest is damaged; re-quantize")

    if not isinstance(layouts, dict):
        raise ModelError(f"{where}: the manifest's \"layouts\" must map linear names to layouts: the manifest is "
                         "damaged; re-quantize")
    for name, layout in layouts.items():
        if not isinstance(name, str) or not _MODULE_NAME.match(name):
            raise bad(name, "not a module name")
        try:
            target = model.get_submodule(name)
        except AttributeError:
            raise bad(name, "the model has no such module") from None
        if not isinstance(target, (nn.Linear, QuantLinear)):
            raise bad(name, f"the model's module there is a {type(target).__name__}, not a linear")
        if not isinstance(layout, dict) or not isinstance(layout.get("linear"), dict):
            raise bad(name, "needs a \"linear\" object")
        lin = layout["linear"]
        missing = (_LINEAR_INTS | {"symmetric"}) - set(lin)
        if missing:
            raise bad(name, f"missing {sorted(missing)}")
        unknown = set(lin) - _LINEAR_INTS - _LINEAR_BOOLS
        if unknown:
            raise bad(name, f"unknown key(s) {sorted(unknown)}")
        if lin["in_features"] != target.in_features or lin["out_features"] != target.out_features \
                or type(lin["in_features"]) is not int or type(lin["out_features"]) is not int:
            raise bad(name, f"size {lin['in_features']!r}x{lin['out_features']!r} is not the model's "
                            f"{target.in_features}x{target.out_features}")
        if lin["bits"] not in WEIGHT_BITS or type(lin["bits"]) is not int:
            raise bad(name, f"bits {lin['bits']!r} not among {sorted(WEIGHT_BITS)}")
        if not _int_in(lin["a_bits"], 2, 16):
            raise bad(name, f"a_bits {lin['a_bits']!r} not in 2..16")
        if not _int_in(lin["group_size"], 0, target.in_features):
            raise bad(name, f"group_size {lin['group_size']!r} not in 0..{target.in_features}")
        for key in _LINEAR_BOOLS & set(lin):
            if not isinstance(lin[key], bool):
                raise bad(name, f"{key} must be true or false")
        if lin.get("input_rotation") and not has_hadamard(target.in_features):
            raise bad(name, f"an online rotation of width {target.in_features}, for which qe knows no Hadamard matrix")
        comp = layout.get("compensator")
        if comp is None:
            continue
        if not isinstance(comp, dict):
            raise bad(name, "compensator must be an object or null")
        module_cls = compensator_module_class(name, comp, modules)
        module_layout = comp.get("layout") if "module" in comp else comp
        if not isinstance(module_layout, dict):
            raise bad(name, "the compensator's layout must be an object")
        try:
            problem = module_cls.layout_problem(module_layout, target.in_features, target.out_features)
        except Exception as e:  # a plugin's own check that breaks on hostile input is still one line
            problem = f"{type(e).__name__}: {str(e)[:120]}"
        if problem:
            raise bad(name, problem)


def check_manifest(directory: Path, manifest: Any) -> None:
    """The manifest's structure (types of the keys loading reads), as one line on failure."""
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise ModelError(f"checkpoint {directory}: the manifest's {what}: the manifest is damaged; re-quantize")

    need(isinstance(manifest, dict), "top level must be an object")
    for key, typ, desc in (("files", dict, "an object"), ("shards", list, "a list"), ("layouts", dict, "an object"),
                           ("model", dict, "an object"), ("composition", dict, "an object")):
        need(key in manifest, f"\"{key}\" is missing")
        need(isinstance(manifest[key], typ), f"\"{key}\" must be {desc}")
    need(isinstance(manifest.get("tied", {}), dict), "\"tied\" must be an object")
    need(isinstance(manifest["model"].get("name"), str), "model.name must be a string")
    need(isinstance(manifest["model"].get("notes", []), list), "model.notes must be a list")
    for key in ("quantizer", "compensator", "setting"):
        need(isinstance(manifest["composition"].get(key), str), f"composition.{key} must be a string")
    need(all(isinstance(n, str) for n in manifest["shards"]), "\"shards\" must hold file names")


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ModelError(f"{directory} is not a qe checkpoint ({MANIFEST} missing): give a directory written by `qe quantize`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path} is not valid JSON ({getattr(e, 'msg', e.reason)}): the checkpoint is damaged") from None
    if not isinstance(manifest, dict):
        raise ModelError(f"{path} is not a JSON object: the checkpoint is damaged")
    if manifest.get("format") != FORMAT or manifest.get("format_version") not in READABLE_VERSIONS:
        raise ModelError(f"{path}: format {manifest.get('format')} v{manifest.get('format_version')} is not "
                         f"{FORMAT} v{FORMAT_VERSION}: re-quantize with this version of qe")
    return manifest


def is_checkpoint(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / MANIFEST).is_file()


def effective_bits(model: nn.Module, adapter_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Stored bits per quantized weight, without and with the compensators' tensors (counted
    in ``adapter_dtype`` when they are stored in it, see :func:`save_tensors`)."""
    layers = quantized_layers(model)
    weights = sum(q.in_features * q.out_features for q in layers.values())
    base = full = 0
    for q in layers.values():
        b, c = layer_storage_bits(q, adapter_dtype)
        base, full = base + b, full + b + c
    if weights == 0:
        return {"bits_per_weight": float("nan"), "bits_per_weight_with_adapters": float("nan")}
    return {"bits_per_weight": base / weights, "bits_per_weight_with_adapters": full / weights,
            "weights": weights, "bits": full}


def reference_record(path: str | None) -> dict | None:
    """Size and SHA-256 of a local reference model's config and weights (what ``layer-error``
    reloads later and must find unchanged); None when the model is not a local directory."""
    if not path or not Path(path).is_dir():
        return None
    d = Path(path)
    names = sorted(p.name for p in d.iterdir() if p.is_file() and (p.name == "config.json" or p.suffix == ".safetensors"))
    return {"path": str(d.resolve()), "files": file_records(d, names)}


def verified_reference(manifest: dict, directory: Path | str = "") -> str:
    """The reference model a checkpoint records, after checking its files against the
    manifest's hashes; one line asking for ``--reference`` when it cannot be verified."""
    ref = (manifest.get("model") or {}).get("reference")
    ask = "pass --reference with the full-precision model it was made from"
    if not isinstance(ref, dict) or not isinstance(ref.get("path"), str) or not isinstance(ref.get("files"), dict):
        raise ModelError(f"checkpoint {directory} records no verifiable reference model: {ask}")
    d = Path(ref["path"])
    if not d.is_dir():
        raise ModelError(f"checkpoint {directory}: its reference model {d} is gone: {ask}")
    try:
        verify_files(d, ref["files"])
    except ModelError:
        raise ModelError(f"checkpoint {directory}: its reference model {d} changed since quantization: {ask}") from None
    extra = [p.name for p in d.iterdir() if p.suffix == ".safetensors" and p.name not in ref["files"]]
    if "config.json" not in ref["files"] or extra:
        raise ModelError(f"checkpoint {directory}: its reference model {d} holds files not recorded: {ask}")
    return str(d)


def unlisted_files(directory: Path, files: dict) -> list[str]:
    """Files (and folders) of the checkpoint directory that the manifest does not hash."""
    return sorted(p.name for p in Path(directory).iterdir() if p.name != MANIFEST and p.name not in files)
