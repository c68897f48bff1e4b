"""Loading a model by name or path, and choosing its adapter."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qe.errors import ModelError
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

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def synthetic_vision(self) -> bool:
        return bool(self.card and self.card.get("synthetic_vision_tower"))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.adapter.decoder_blocks(self.model)


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


def load_processor(path: str, adapter: ModelAdapter, config=None):
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
        return AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError, ImportError):
        try:
            return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load a processor or tokenizer from {path}: {str(e).splitlines()[0]}") from None


def load_model(
    name_or_path: str | None = None,
    *,
    dtype: str | torch.dtype | None = "float32",
    device: str | None = None,
    device_map: Any = None,
    max_memory: dict | None = None,
    offload_folder: str | None = None,
    manager=None,
) -> LoadedModel:
    """Load a VLM (or text LM) from a local path or hub id; ``None`` means the embedded default.

    ``tiny:<family>`` (or ``tiny:<family>@<seed>``) names a tiny random model of a supported
    family (:mod:`qe.models.tiny`), written once to the cache and loaded like any checkpoint.
    ``device_map``, ``max_memory`` and ``offload_folder`` go to accelerate unchanged, so a
    model larger than one device is spread over devices or offloaded to disk (see
    :mod:`qe.models.offload` for reading offloaded blocks).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from qe import checkpoint
    from qe.models import default_model, tiny

    if isinstance(name_or_path, (str, Path)) and checkpoint.is_checkpoint(name_or_path):
        return load_quantized(name_or_path, device=device, manager=manager)
    torch_dtype = parse_dtype(dtype)
    notes: list[str] = []
    tiny_spec = tiny.parse_tiny_name(name_or_path) if isinstance(name_or_path, str) else None
    if name_or_path in DEFAULT_MODEL_NAMES:
        path = str(default_model.ensure_default_model())
        name = default_model.NAME
    elif tiny_spec is not None:
        path = str(tiny.tiny_model_dir(*tiny_spec))
        name = str(name_or_path)
    else:
        path = str(name_or_path)
        name = Path(path).name if Path(path).exists() else path
    card = default_model.read_model_card(Path(path)) if Path(path).is_dir() else None
    if card and card.get("note"):
        notes.append(card["note"])
    marker = tiny.read_marker(path) if Path(path).is_dir() else None
    if marker:
        notes.append(f"tiny:{marker['family']}: {marker['note']}")
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {path!r}: {str(e).splitlines()[0]}") from None
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except ValueError:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    if device is not None and device_map is None:
        model.to(device)
    adapter = select_adapter(model, manager)
    processor = load_processor(path, adapter, config)
    return LoadedModel(model, processor, adapter, name, path, notes, card)


def load_quantized(directory: str | Path, *, device: str | None = None, manager=None):
    """Load a checkpoint written by ``qe quantize`` as a :class:`~qe.models.loading.LoadedModel`.

    The model's outputs equal those of the in-memory quantized model that was saved.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from qe import checkpoint

    directory = Path(directory)
    manifest = checkpoint.read_manifest(directory)
    checkpoint.verify_files(directory, manifest["files"])
    config = AutoConfig.from_pretrained(directory)
    # Parameters on the meta device: the shards' tensors replace them, so the model's random
    # initial weights are never allocated (buffers, rotary caches among them, stay real).
    with init_empty_weights(include_buffers=False):
        try:
            model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
        except ValueError:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    checkpoint.install_quantized_modules(model, manifest["layouts"], manager)
    checkpoint.load_tensors(model, directory, manifest["shards"], manifest.get("tied", {}))
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
