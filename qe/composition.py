"""A composition: importance estimator + transform + quantizer + compensator + setting,
validated up front.

Everything that can be checked without a model is checked here, before any model loads:
plugin names, parameters, and the setting's compatibility with the plugins.
"""

from __future__ import annotations

from dataclasses import dataclass

from qe.errors import ConfigError
from qe.plugins import QEPluginManager, Resolved, default_manager, parse_plugin_ref
from qe.settings import QuantSetting, parse_setting


@dataclass
class Composition:
    estimator: Resolved
    quantizer: Resolved
    compensator: Resolved
    setting: QuantSetting
    transform: Resolved

    @property
    def transformed(self) -> bool:
        return self.transform.entry.name != "none"

    @property
    def label(self) -> str:
        """``[transform+]quantizer+compensator@setting``, e.g. ``awq+gptq+qe@W4A6``."""
        base = f"{self.quantizer.label}+{self.compensator.label}@{self.setting.short_name}"
        return f"{self.transform.label}+{base}" if self.transformed else base

    def describe(self) -> dict:
        return {
            "estimator": self.estimator.label,
            "transform": self.transform.label,
            "quantizer": self.quantizer.label,
            "compensator": self.compensator.label,
            "setting": self.setting.name,
        }

    def fingerprint(self) -> dict:
        """Plugin names with every resolved parameter, defaults included: ``gptq`` and
        ``gptq[clip=true]`` are one composition, and results keyed by it are not reused after
        a default changes. The identity transform is left out, so results of compositions
        without a transform keep their keys."""
        parts = {"estimator": self.estimator, "quantizer": self.quantizer, "compensator": self.compensator}
        if self.transformed:
            parts["transform"] = self.transform
        return {**{k: [r.entry.name, repr(r.config)] for k, r in parts.items()}, "setting": self.setting.name}


def resolve_composition(
    quantizer: str = "rtn",
    compensator: str = "none",
    setting: str | QuantSetting = "W4A8",
    estimator: str = "act-weight",
    manager: QEPluginManager | None = None,
    *,
    transform: str = "none",
) -> Composition:
    manager = manager or default_manager()
    name = parse_plugin_ref(quantizer).name
    if name in ("smoothquant", "awq") and name not in manager.entries("quantizer"):
        raise ConfigError(f"{name} is a transform, composed with any quantizer: write --transform {name} "
                          f"--quantizer rtn (or gptq) instead of --quantizer {name}")
    st = parse_setting(setting) if isinstance(setting, str) else setting
    if not st.quantizes_weights:
        raise ConfigError(f"setting {st} keeps 16-bit weights: choose 2 to 8 weight bits (e.g. W4A8)")
    comp = Composition(
        estimator=manager.resolve("estimator", estimator),
        quantizer=manager.resolve("quantizer", quantizer),
        compensator=manager.resolve("compensator", compensator),
        setting=st,
        transform=manager.resolve("transform", transform),
    )
    return comp
