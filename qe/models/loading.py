"""Loading a model by name or path, and choosing its adapter."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qe.activations import ActivationStore, parse_size
from qe.errors import ConfigError, ModelError
from qe.models.base import ModelAdapter

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAMES = (None, "", "default", "embedded-default")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype:
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ModelError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}") from None


@dataclass
class LoadedModel:
    """A model with its processor, adapter and the facts every report repeats."""

    model: nn.Module
    processor: Any
    adapter: ModelAdapter
    name: str
    path: str | None = None
    notes: list[str] = field(default_factory=list)
    card: dict | None = None
    manifest: dict | None = None  # set for checkpoints written by `qe quantize`
    # Where the block walker keeps captured calibration activations (host memory and files
    # for a model placed by a Placement; the run device otherwise).
    activations: ActivationStore = field(default_factory=ActivationStore)
    # Where qe puts large temporary files for this model (quantized blocks of an offloaded
    # model): its offload folder when it is placed, the system's temporary folder otherwise.
    scratch_folder: str | None = None

    def copy(self) -> LoadedModel:
        """The same model loaded twice: a deep copy of the weights, everything else shared (an
        offloaded model's offloaded weights too: they are read, never written)."""
        from qe.models.offload import copy_sharing_offload

        return dataclasses.replace(self, model=copy_sharing_offload(self.model))

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def synthetic_vision(self) -> bool:
        return bool(self.card and self.card.get("synthetic_vision_tower"))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.adapter.decoder_blocks(self.model)


_CODE_CONFIGS = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json",
                 "image_processor_config.json", "video_preprocessor_config.json")


def check_remote_code(path: str | Path, trust_remote_code: bool = False) -> None:
    """Refuse a local model or checkpoint that asks transformers to run its own code
    (``auto_map`` in one of its configs), unless the user passed ``--trust-remote-code``."""
    import json

    path = Path(path)
    if trust_remote_code or not path.is_dir():
        return
    for name in _CODE_CONFIGS:
        f = path / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue  # transformers reports unreadable configs itself
        if isinstance(data, dict) and data.get("auto_map"):
            raise ModelError(f"{path} asks to run its own Python code (auto_map in {name}): qe runs no code from a "
                             "model directory unless you pass --trust-remote-code")


def _looks_like_path(name: str) -> bool:
    return (name.startswith((".", "/", "~")) or name.endswith("/") or "\\" in name or name.count("/") > 1
            or Path(name).is_absolute())


def check_model_name(name_or_path: Any) -> None:
    """Fail at once, in one line, on a local model path that does not exist or holds nothing qe can load."""
    from qe import checkpoint
    from qe.models import tiny

    if name_or_path in DEFAULT_MODEL_NAMES or not isinstance(name_or_path, (str, Path)):
        return
    name = str(name_or_path)
    if isinstance(name_or_path, str) and tiny.parse_tiny_name(name) is not None:
        return
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"--model {name} is a file: give a model directory or a hub id")
        if checkpoint.is_checkpoint(path):
            return
        if not (path / "config.json").is_file():
            raise ModelError(f"--model {name} holds no config.json: give a Hugging Face model directory or a qe checkpoint")
        weights = [p.name for p in path.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json")]
        pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
        if not weights and pickles:
            raise ModelError(f"--model {name} holds only pickle weights ({pickles[0]}): qe reads safetensors only "
                             "(pickle files can run code); convert the weights to safetensors")
        return
    if isinstance(name_or_path, Path) or _looks_like_path(name):
        raise ModelError(f"cannot load model {name}: the path does not exist; give an existing model directory "
                         "or a hub id (org/name)")


def select_adapter(model: nn.Module, manager=None) -> ModelAdapter:
    """The highest-priority adapter that reads ``model``; a one-line error naming what was tried."""
    from qe.plugins import default_manager

    manager = manager or default_manager()
    entries = sorted(manager.entries("model_adapter").values(), key=lambda e: -e.cls.priority)
    for entry in entries:
        if entry.cls.matches(model):
            return entry.cls()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    known = sorted({t for e in entries for t in e.cls.model_types})
    raise ModelError(
        f"no model adapter reads {type(model).__name__} (model_type {model_type!r}): the family adapters serve "
        f"model types {', '.join(known)}, and the generic fallback found no ModuleList of decoder blocks holding "
        "nn.Linear layers outside the vision tower; write a model adapter plugin (qe_model_adapters hook)"
    )


def load_processor(path: str, adapter: ModelAdapter, config=None, trust_remote_code: bool = False):
    """The model's processor: the adapter's own loader where it has one, else ``AutoProcessor``.

    Some families' stock processors need torchvision for a video processor; their adapters
    rebuild an image-only processor (:meth:`ModelAdapter.load_processor`, None to defer to
    ``AutoProcessor``). Text-only checkpoints fall back to their tokenizer.
    """
    from transformers import AutoProcessor, AutoTokenizer

    processor = adapter.load_processor(path, config)
    if processor is not None:
        return processor
    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, ImportError):
        try:
            return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load a processor or tokenizer from {path}: {str(e).splitlines()[0]}") from None


@dataclass(frozen=True)
class Placement:
    """Where a model larger than memory goes: accelerate's ``device_map="auto"`` within
    ``max_memory`` (``{"cpu": "2GiB", 0: "20GiB"}``), the rest offloaded to ``offload_folder``
    (a temporary folder when only ``max_memory`` is given). Inactive when both are None.

    Captured calibration activations of a placed model live in host memory, and past
    ``max_activation_memory`` bytes (which works on its own too) in files in the offload
    folder (:mod:`qe.activations`)."""

    offload_folder: str | None = None
    max_memory: dict | None = None
    max_activation_memory: int | None = None

    def activation_store(self) -> ActivationStore:
        return ActivationStore(host=self.active, limit_bytes=self.max_activation_memory, folder=self.offload_folder)

    @property
    def active(self) -> bool:
        return self.offload_folder is not None or self.max_memory is not None

    def load_kwargs(self) -> dict[str, Any]:
        if not self.active:
            return {}
        folder = self.offload_folder
        if folder is None:
            import atexit
            import shutil
            import tempfile

            folder = tempfile.mkdtemp(prefix="qe-offload-")
            atexit.register(shutil.rmtree, folder, True)
        return {"device_map": "auto", "max_memory": self.max_memory, "offload_folder": folder}


def parse_activation_memory(text: str | None) -> int | None:
    """``--max-activation-memory`` (``4GiB``) as bytes."""
    return None if not text else parse_size(text, "--max-activation-memory")


def parse_max_memory(text: str | None) -> dict | None:
    """``cpu=2GiB,0=20GiB`` (or ``cuda:0=20GiB``) as accelerate's ``max_memory`` dict."""
    if not text:
        return None
    from accelerate.utils import convert_file_size_to_int

    limits: dict[Any, str] = {}
    for part in text.split(","):
        device, sep, size = part.strip().partition("=")
        device = device.strip().removeprefix("cuda:")
        try:
            if not sep or not device:
                raise ValueError
            convert_file_size_to_int(size.strip())
        except ValueError:
            raise ConfigError(f"--max-memory {text!r}: give DEVICE=SIZE pairs separated by commas, e.g. "
                              "cpu=4GiB or 0=20GiB,cpu=60GiB") from None
        limits[int(device) if device.isdigit() else device] = size.strip()
    return limits


def load_model(
    name_or_path: str | None = None,
    *,
    dtype: str | torch.dtype | None = "float32",
    device: str | None = None,
    device_map: Any = None,
    max_memory: dict | None = None,
    offload_folder: str | None = None,
    manager=None,
    trust_remote_code: bool = False,
    placement: Placement | None = None,
) -> LoadedModel:
    """Load a VLM (or text LM) from a local path or hub id; ``None`` means the embedded default.

    ``tiny:<family>`` (or ``tiny:<family>@<seed>``) names a tiny random model of a supported
    family (:mod:`qe.models.tiny`), written once to the cache and loaded like any checkpoint.
    ``device_map``, ``max_memory`` and ``offload_folder`` go to accelerate unchanged, so a
    model larger than one device is spread over devices or offloaded to disk (see
    :mod:`qe.models.offload` for reading offloaded blocks). Weights load from safetensors
    only, and no code shipped with a model runs unless ``trust_remote_code``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from qe import checkpoint
    from qe.models import default_model, tiny

    if device is not None:
        check_device(device)
    check_model_name(name_or_path)
    if placement is not None and placement.active:
        placed = placement.load_kwargs()
        device_map, max_memory = placed["device_map"], placed["max_memory"]
        offload_folder = placed["offload_folder"]
    if isinstance(name_or_path, (str, Path)) and checkpoint.is_checkpoint(name_or_path):
        loaded = load_quantized(name_or_path, device=device, manager=manager, dtype=dtype,
                                trust_remote_code=trust_remote_code, device_map=device_map, max_memory=max_memory)
        if placement is not None:
            loaded.activations = placement.activation_store()
            loaded.scratch_folder = offload_folder
        return loaded
    torch_dtype = parse_dtype(dtype)
    notes: list[str] = []
    tiny_spec = tiny.parse_tiny_name(name_or_path) if isinstance(name_or_path, str) else None
    if name_or_path in DEFAULT_MODEL_NAMES or tiny_spec is not None:
        from qe.paths import cache_dir

        try:
            if tiny_spec is None:
                path = str(default_model.ensure_default_model())
                name = default_model.NAME
            else:
                path = str(tiny.tiny_model_dir(*tiny_spec))
                name = str(name_or_path)
        except OSError as e:
            raise ModelError(f"cannot write the model cache {cache_dir()} ({e.strerror or e}): set QE_CACHE_DIR to a "
                             "writable directory") from None
    else:
        path = str(name_or_path)
        name = Path(path).name if Path(path).exists() else path
    card = default_model.read_model_card(Path(path)) if Path(path).is_dir() else None
    if card and card.get("note"):
        notes.append(card["note"])
    marker = tiny.read_marker(path) if Path(path).is_dir() else None
    if marker:
        notes.append(f"tiny:{marker['family']}: {marker['note']}")
    check_remote_code(path, trust_remote_code)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "Repo id must" in first or "repo_name" in first:
            raise ModelError(f"model {path!r} is neither an existing local directory nor a hub id (org/name)") from None
        raise ModelError(f"cannot load model {path!r}: {first}") from None
    try:
        try:
            model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        except ValueError as e:
            if "trust_remote_code" in str(e):
                raise
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"cannot load model {path!r}: {first[:300]}") from None
    model.eval()
    if device is not None and device_map is None:
        model.to(device)
    adapter = select_adapter(model, manager)
    adapter.prepare_model(model)
    processor = load_processor(path, adapter, config, trust_remote_code=trust_remote_code)
    activations = placement.activation_store() if placement is not None else ActivationStore()
    return LoadedModel(model, processor, adapter, name, path, notes, card, activations=activations,
                       scratch_folder=offload_folder)


def load_quantized(directory: str | Path, *, device: str | None = None, manager=None, dtype=None,
                   trust_remote_code: bool = False, device_map: Any = None, max_memory: dict | None = None):
    """Load a checkpoint written by ``qe quantize`` as a :class:`LoadedModel`.

    The model's outputs equal those of the in-memory quantized model that was saved. Every
    file read is inside ``directory`` and checked against the manifest's size and SHA-256
    first; a checkpoint that asks for custom code (``auto_map``) is refused unless
    ``trust_remote_code``. Compensator modules are rebuilt only by installed plugins. The
    model is built with its parameters on the meta device and filled shard by shard, so
    loading holds one shard beside the model, never the whole checkpoint twice.

    With ``device_map`` (``"auto"`` with ``max_memory``, or an explicit map), modules placed
    on ``"disk"`` are never loaded: accelerate reads their tensors straight from the
    checkpoint's shards for each forward, so loading needs no more memory than the modules
    kept on devices (see :func:`_dispatch_from_shards`).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from qe import checkpoint

    directory = Path(directory)
    manifest = checkpoint.read_manifest(directory)
    checkpoint.check_manifest(directory, manifest)
    checkpoint.verify_files(directory, manifest["files"])
    extra = checkpoint.unlisted_files(directory, manifest["files"])
    if extra:
        raise ModelError(f"checkpoint {directory} holds files its manifest does not hash ({', '.join(extra[:3])}"
                         f"{', ...' if len(extra) > 3 else ''}): qe reads only hashed files; remove them or re-quantize")
    if "config.json" not in manifest["files"]:
        raise ModelError(f"checkpoint {directory} has no config.json among its hashed files: copy the whole "
                         "directory again, or re-quantize")
    check_remote_code(directory, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"checkpoint {directory}: cannot read config.json ({str(e).splitlines()[0][:200]}): "
                         "the checkpoint is damaged; re-quantize") from None
    # Parameters on the meta device: the shards' tensors replace them, so the model's random
    # initial weights are never allocated (buffers, rotary caches among them, stay real).
    with init_empty_weights(include_buffers=False):
        try:
            model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32,
                                                            trust_remote_code=trust_remote_code)
        except ValueError:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    # The adapter restructures the model as it did before quantizing (unfused experts), so the
    # manifest's layer names exist.
    adapter = select_adapter(model, manager)
    adapter.prepare_model(model)
    checkpoint.validate_layouts(model, manifest["layouts"], directory, manager)
    placed = device_map is not None or max_memory is not None
    try:
        # Placed models build their quantized modules on the meta device too: the parts that
        # stay offloaded are never allocated.
        with init_empty_weights(include_buffers=True) if placed else contextlib.nullcontext():
            checkpoint.install_quantized_modules(model, manifest["layouts"], manager)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"checkpoint {directory}: a module layout cannot be built ({str(e).splitlines()[0][:200]}): "
                         "the manifest is damaged; re-quantize") from None
    if placed:
        _dispatch_from_shards(model, directory, manifest, device_map or "auto", max_memory, dtype, device)
    else:
        checkpoint.load_tensors(model, directory, manifest["shards"], manifest.get("tied", {}),
                                files=manifest["files"])
        if dtype is not None and parse_dtype(dtype) != torch.float32:
            model.to(parse_dtype(dtype))
        if device is not None:
            model.to(device)
    model.eval()
    _restore_kv_cache(model, adapter, manifest, directory)
    processor = load_processor(str(directory), adapter, config)
    info = manifest["model"]
    notes = list(info.get("notes", [])) + [f"quantized with {manifest['composition']['quantizer']} + "
                                           f"{manifest['composition']['compensator']} at {manifest['composition']['setting']}"]
    card = {"synthetic_vision_tower": info.get("synthetic_vision_tower", False)}
    return LoadedModel(model, processor, adapter, f"{info['name']}-quantized", str(directory), notes, card, manifest)


def _restore_kv_cache(model, adapter, manifest: dict, directory: Path) -> None:
    """A setting with ``KV<bits>`` quantizes every decoder block's KV cache, as when it was saved."""
    from qe.quantizers import kv_cache
    from qe.settings import parse_setting

    try:
        setting = parse_setting(manifest["composition"]["setting"])
    except ConfigError as e:
        raise ModelError(f"checkpoint {directory}: composition.setting: {e}: the manifest is damaged; re-quantize") from None
    if not setting.quantizes_kv_cache:
        return
    attentions = [adapter.block_attention(block, adapter.block_prefix(model, i))
                  for i, block in enumerate(adapter.decoder_blocks(model))]
    kv_cache.enable(adapter.language_model(model), attentions[0])
    for attention in attentions:
        kv_cache.mark_attention(attention, setting.kv_bits)


def _dispatch_from_shards(model, directory: Path, manifest: dict, device_map: Any, max_memory: dict | None,
                          dtype, device: str | None) -> None:
    """Place a meta-device model built from a checkpoint: modules mapped to a device are
    loaded from the shards, modules mapped to ``"disk"`` read the shards on each forward."""
    from accelerate import dispatch_model, infer_auto_device_map

    from qe import checkpoint

    if dtype is not None and parse_dtype(dtype) != torch.float32:
        model.to(parse_dtype(dtype))  # on the meta device: only the dtypes change
    if device_map == "auto":
        device_map = infer_auto_device_map(model, max_memory=max_memory,
                                           no_split_module_classes=list(model._no_split_modules or []))
    state = model.state_dict()
    on_disk = {k for k in state if _placement(device_map, k) == "disk"}
    aliases = manifest.get("tied", {})
    checkpoint.load_tensors(model, directory, manifest["shards"], aliases, files=manifest["files"],
                            only=set(state) - on_disk)
    index = checkpoint.shard_index(directory, manifest["shards"], aliases, {k: state[k].dtype for k in on_disk})
    main = device or next((d for d in device_map.values() if d not in ("cpu", "disk")), "cpu")
    dispatch_model(model, device_map, main_device=main, offload_index=index, offload_buffers=True)
    from qe.quantizers.qlinear import QuantLinear

    for m in model.modules():
        if isinstance(m, QuantLinear) and m.qweight.device.type == "meta":  # offloaded between forwards
            m.keep_dequantized = False


def _placement(device_map: dict, key: str) -> Any:
    """The device ``device_map`` gives the module holding ``key`` (its longest matching prefix)."""
    best, where = -1, None
    for name, place in device_map.items():
        if (name == "" or key == name or key.startswith(name + ".")) and len(name) > best:
            best, where = len(name), place
    return where


def check_device(device: str) -> str:
    """A device torch can use on this machine, or one line saying why not (before any work)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ModelError(f"--device {device!r} is not a device: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"--device {device}: this machine has no CUDA device (or torch was built without CUDA): "
                             "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0: use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ModelError(f"--device {device}: MPS is not available on this machine: use --device cpu")
    elif dev.type not in ("cpu", "meta"):
        raise ModelError(f"--device {device!r}: qe runs on cpu, cuda or mps")
    return device
