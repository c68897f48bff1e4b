"""Recipes: the choices of one quantization run, from a TOML file and/or command-line flags.

A recipe file holds the same things as the flags, plus per-layer overrides and skip lists::

    transform = "none"               # or "smoothquant[alpha=0.5]", "awq[grid=20]"
    quantizer = "gptq"
    compensator = "qe[k=32;num_experts=8]"
    estimator = "act-weight"
    setting = "W4A8"
    calib = "images"
    samples = 32
    propagation = "quantized"        # or "fp-inputs"
    seed = 0
    skip = ["*.layers.0.*"]          # fnmatch patterns (or regular expressions) of full linear names
    scope = "language"               # or "vision" (vision tower + projector), "all"

    [[override]]                     # first matching override wins
    pattern = "*.mlp.down_proj"
    compensator = "lowrank[rank=64]"
    quantizer = "rtn"

Flags given on the command line override the file. Everything is validated (plugin names,
parameters, settings) before any model loads. docs/recipes.md documents every key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from qe.composition import Composition, resolve_composition
from qe.errors import ConfigError
from qe.plugins import QEPluginManager, default_manager
from qe.settings import QuantSetting, parse_setting

_KEYS = {"transform", "quantizer", "compensator", "estimator", "setting", "calib", "samples", "propagation", "seed",
         "skip", "override", "max_tokens", "scope"}


@dataclass(frozen=True)
class LayerOverride:
    pattern: str
    quantizer: str | None = None
    compensator: str | None = None


@dataclass(frozen=True)
class Recipe:
    transform: str = "none"
    quantizer: str = "rtn"
    compensator: str = "none"
    estimator: str = "act-weight"
    setting: str = "W4A8"
    calib: str | None = None
    samples: int | None = 32
    propagation: str = "quantized"
    seed: int = 0
    max_tokens: int = 16384
    scope: str = "language"
    skip: tuple[str, ...] = ()
    overrides: tuple[LayerOverride, ...] = field(default_factory=tuple)

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        d["overrides"] = [dataclasses.asdict(o) for o in self.overrides]
        return d

    def hash(self, *extra: str) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True) + "|".join(extra)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def quant_setting(self) -> QuantSetting:
        return parse_setting(self.setting)

    def composition(self, manager: QEPluginManager | None = None) -> Composition:
        return resolve_composition(self.quantizer, self.compensator, self.setting, self.estimator, manager,
                                   transform=self.transform)

    def validate(self, manager: QEPluginManager | None = None) -> Composition:
        """Check everything that can be checked without a model."""
        manager = manager or default_manager()
        comp = self.composition(manager)
        from qe.models.stacks import check_scope

        check_scope(self.scope)
        if self.propagation not in ("quantized", "fp-inputs"):
            raise ConfigError(f"propagation {self.propagation!r} unknown: use quantized or fp-inputs")
        if self.samples is not None and self.samples < 1:
            raise ConfigError(f"samples must be at least 1, not {self.samples}")
        for o in self.overrides:
            if o.quantizer:
                manager.resolve("quantizer", o.quantizer)
            if o.compensator:
                manager.resolve("compensator", o.compensator)
        return comp


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} not found")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"recipe {path} is not valid TOML: {e}") from None
    unknown = set(data) - _KEYS
    if unknown:
        raise ConfigError(f"recipe {path}: unknown key(s) {sorted(unknown)}; keys are {sorted(_KEYS)}")
    overrides = []
    for i, o in enumerate(data.pop("override", []) or []):
        if not isinstance(o, dict) or "pattern" not in o:
            raise ConfigError(f"recipe {path}: override #{i + 1} needs a pattern")
        extra = set(o) - {"pattern", "quantizer", "compensator"}
        if extra:
            raise ConfigError(f"recipe {path}: override #{i + 1} has unknown key(s) {sorted(extra)}")
        overrides.append(LayerOverride(**o))
    skip = data.pop("skip", ())
    if isinstance(skip, str):
        skip = (skip,)
    try:
        return Recipe(**data, skip=tuple(skip), overrides=tuple(overrides))
    except TypeError as e:
        raise ConfigError(f"recipe {path}: {e}") from None
