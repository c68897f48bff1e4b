"""A composition: importance estimator + quantizer + compensator + setting, validated up front.

Everything that can be checked without a model is checked here, before any model loads:
plugin names, parameters, and the setting's compatibility with the plugins.
"""

from __future__ import annotations

from dataclasses import dataclass

from qe.errors import ConfigError
from qe.plugins import QEPluginManager, Resolved, default_manager
from qe.settings import QuantSetting, parse_setting


@dataclass
class Composition:
    estimator: Resolved
    quantizer: Resolved
    compensator: Resolved
    setting: QuantSetting

    @property
    def label(self) -> str:
        return f"{self.quantizer.label}+{self.compensator.label}@{self.setting.short_name}"

    def describe(self) -> dict:
        return {
            "estimator": self.estimator.label,
            "quantizer": self.quantizer.label,
            "compensator": self.compensator.label,
            "setting": self.setting.name,
        }

    def fingerprint(self) -> dict:
        """Plugin names with every resolved parameter, defaults included: ``gptq`` and
        ``gptq[clip=true]`` are one composition, and results keyed by it are not reused after
        a default changes."""
        parts = {"estimator": self.estimator, "quantizer": self.quantizer, "compensator": self.compensator}
        return {**{k: [r.entry.name, repr(r.config)] for k, r in parts.items()}, "setting": self.setting.name}


def resolve_composition(
    quantizer: str = "rtn",
    compensator: str = "none",
    setting: str | QuantSetting = "W4A8",
    estimator: str = "act-weight",
    manager: QEPluginManager | None = None,
) -> Composition:
    manager = manager or default_manager()
    st = parse_setting(setting) if isinstance(setting, str) else setting
    if not st.quantizes_weights:
        raise ConfigError(f"setting {st} keeps 16-bit weights: choose 2 to 8 weight bits (e.g. W4A8)")
    comp = Composition(
        estimator=manager.resolve("estimator", estimator),
        quantizer=manager.resolve("quantizer", quantizer),
        compensator=manager.resolve("compensator", compensator),
        setting=st,
    )
    return comp
