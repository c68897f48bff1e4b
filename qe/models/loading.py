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
    from qe.plugins import default_manager

    manager = manager or default_manager()
    entries = sorted(manager.entries("model_adapter").values(), key=lambda e: -getattr(e.cls, "priority", 0))
    for entry in entries:
        if entry.cls.matches(model):
            return entry.cls()
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    raise ModelError(
        f"no model adapter reads {type(model).__name__} (model_type {model_type!r}): adapters are "
        f"{', '.join(e.name for e in entries)}; none found decoder blocks (a ModuleList of blocks with nn.Linear layers)"
    )


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

    ``device_map``, ``max_memory`` and ``offload_folder`` go to accelerate unchanged, so a
    model larger than one device is spread over devices or offloaded to disk.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    from qe.models import default_model

    torch_dtype = parse_dtype(dtype)
    notes: list[str] = []
    if name_or_path in DEFAULT_MODEL_NAMES:
        path = str(default_model.ensure_default_model())
        name = default_model.NAME
    else:
        path = str(name_or_path)
        name = Path(path).name if Path(path).exists() else path
    card = default_model.read_model_card(Path(path)) if Path(path).is_dir() else None
    if card and card.get("note"):
        notes.append(card["note"])
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = offload_folder
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
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError, ImportError):
        processor = AutoTokenizer.from_pretrained(path)
    del config
    adapter = select_adapter(model, manager)
    return LoadedModel(model, processor, adapter, name, path, notes, card)
