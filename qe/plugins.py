"""The plugin manager, plugin naming (``NAME[key=value;...]``) and typed plugin configs.

Built-in plugins register through the same hooks as third-party ones: each built-in module
below implements registration hooks and is registered on the manager like any entry-point
plugin. Third parties declare ``[project.entry-points.qe]``.

A plugin class follows :class:`Plugin`: ``name``, ``kind``, a frozen dataclass ``Config``
and ``__init__(self, config)``. Parameters given as strings are converted to the config's
field types and checked *before* any model loads, so a typo costs a second, not a model load.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar, Literal

import pluggy

from qe import hookspecs
from qe.errors import ConfigError

KINDS: dict[str, str] = {
    # kind -> registration hook name
    "estimator": "qe_estimators",
    "quantizer": "qe_quantizers",
    "transform": "qe_transforms",
    "compensator": "qe_compensators",
    "model_adapter": "qe_model_adapters",
    "calibration_source": "qe_calibration_sources",
}

# Hooks that let plugins watch the pipeline (see qe.hookspecs), in the order they fire.
EVENT_HOOKS = ("qe_run_start", "qe_block_start", "qe_layer_start", "qe_layer_end", "qe_block_end", "qe_run_end")

# The base class every plugin of a kind subclasses ("module:Class", imported when the registry
# is built: the base modules import this one).
KIND_BASES: dict[str, str] = {
    "estimator": "qe.analysis.estimators:Estimator",
    "quantizer": "qe.quantizers.base:Quantizer",
    "transform": "qe.transforms.base:Transform",
    "compensator": "qe.compensators.base:Compensator",
    "model_adapter": "qe.models.base:ModelAdapter",
    "calibration_source": "qe.data.sources:CalibrationSource",
}

# Modules holding the built-in hook implementations, registered explicitly (not by import
# side effects) when a manager is built.
BUILTIN_MODULES = (
    "qe.analysis.estimators",
    "qe.quantizers.builtin",
    "qe.transforms.builtin",
    "qe.compensators.builtin",
    "qe.models.builtin",
    "qe.data.sources",
)

BUILTIN_ORIGIN = "built-in"


@dataclass(frozen=True)
class NoConfig:
    """Config of a plugin without parameters."""


class Plugin:
    """What every plugin class provides: ``name`` (unique within its kind), ``kind``, a frozen
    dataclass ``Config`` with the parameters and their defaults, and ``__init__(config)``.
    Plugins subclass their kind's base class (:data:`KIND_BASES`), which declares the rest of
    the contract with defaults."""

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()


# --------------------------------------------------------------------------- naming


@dataclass(frozen=True)
class PluginRef:
    """A parsed ``NAME[key=value;key=value]``."""

    name: str
    params: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return f"{self.name}[{';'.join(f'{k}={v}' for k, v in self.params)}]"


def parse_plugin_ref(text: str) -> PluginRef:
    """Parse ``NAME`` or ``NAME[key=value;key=value]``."""
    text = text.strip()
    if not text:
        raise ConfigError("empty plugin name: write NAME or NAME[key=value;key=value]")
    if "[" not in text:
        if "]" in text or "=" in text:
            raise ConfigError(f"cannot read plugin {text!r}: write NAME[key=value;key=value]")
        return PluginRef(text)
    if not text.endswith("]") or text.count("[") != 1 or text.count("]") != 1:
        raise ConfigError(f"cannot read plugin {text!r}: write NAME[key=value;key=value]")
    name, body = text[:-1].split("[", 1)
    params = []
    for item in body.split(";"):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ConfigError(f"parameter {item!r} of {name!r} has no value: write key=value")
        key, value = item.split("=", 1)
        params.append((key.strip().replace("-", "_"), value.strip()))
    return PluginRef(name.strip(), tuple(params))


def split_plugin_list(text: str) -> list[str]:
    """Split ``a,b[x=1;y=2,3],c`` at the commas that are outside brackets."""
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    items.append("".join(current).strip())
    return [i for i in items if i]


# --------------------------------------------------------------------------- typed configs


def _convert(value: str, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if type(None) in args and value.lower() in ("none", "null", ""):
            return None
        errors = []
        for a in non_none:
            try:
                return _convert(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot read {value!r}")
    if origin is Literal:
        for a in args:
            if str(a).lower() == value.lower():
                return a
        raise ConfigError(f"{where}={value!r} is not allowed: choose one of {', '.join(map(str, args))}")
    if origin in (tuple, list):
        inner = args[0] if args else str
        parts = [p for p in value.replace("/", ",").split(",") if p.strip()]
        return tuple(_convert(p.strip(), inner, where) for p in parts)
    if hint is bool:
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}={value!r} is not a boolean: use true or false")
    if hint is int:
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}={value!r} is not an integer") from None
    if hint is float:
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}={value!r} is not a number") from None
    if hint is str or hint is Any:
        return value
    raise ConfigError(f"{where}: parameters of type {hint} cannot be given as text")


def config_fields(config_type: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config_type) if not f.name.startswith("_")]


def build_config(config_type: type, params: Sequence[tuple[str, Any]], owner: str) -> Any:
    """Build a typed config from (key, value) pairs; values may be strings or typed."""
    hints = typing.get_type_hints(config_type)
    known = {f.name: f for f in config_fields(config_type)}
    kwargs = {}
    for key, value in params:
        if key not in known:
            listing = ", ".join(known) or "none"
            raise ConfigError(f"{owner} has no parameter {key!r}: its parameters are {listing}")
        kwargs[key] = _convert(value, hints[key], f"{owner}.{key}") if isinstance(value, str) else value
    for key, value in kwargs.items():  # inf and nan parse as floats but are never a usable parameter
        values = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"{owner}.{key}={value!r} is not a finite number: give a finite value")
    try:
        return config_type(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{owner}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{owner}: {e}") from None


def describe_config(config_type: type) -> str:
    """``key=default (type); ...`` for listings."""
    parts = []
    for f in config_fields(config_type):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "required"
        if isinstance(default, tuple):
            default = ",".join(str(d) for d in default)
        parts.append(f"{f.name}={default}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- manager


@dataclass(frozen=True)
class PluginEntry:
    kind: str
    name: str
    cls: type[Any]  # a subclass of the kind's base class (KIND_BASES)
    origin: str  # "built-in" or "<distribution> <version>"

    @property
    def summary(self) -> str:
        doc = (self.cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @property
    def parameters(self) -> str:
        return describe_config(self.cls.Config)


@dataclass
class Resolved:
    """A plugin class with a validated config, ready to instantiate."""

    entry: PluginEntry
    config: Any
    ref: PluginRef

    def create(self) -> Any:
        return self.entry.cls(self.config)

    @property
    def label(self) -> str:
        return str(self.ref)


class QEPluginManager:
    """Registers built-ins and entry points and answers "which plugin is NAME"."""

    def __init__(self, load_entry_points: bool = True, extra_plugins: Sequence[object] = ()):
        self._arguments = (load_entry_points, tuple(extra_plugins))
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        for modname in BUILTIN_MODULES:
            module = importlib.import_module(modname)
            self.pm.register(module, name=modname)
        self._origins: dict[int, str] = {}
        if load_entry_points:
            self.pm.load_setuptools_entrypoints(hookspecs.PROJECT)
            for plugin, dist in self.pm.list_plugin_distinfo():
                self._origins[id(plugin)] = f"{dist.project_name} {dist.version}"
        for plugin in extra_plugins:
            self.pm.register(plugin)
        from qe.progress import PLUGIN_NAME, ProgressReporter

        self.pm.register(ProgressReporter(), name=PLUGIN_NAME)  # event hooks only; idle unless a run asks
        self._registry: dict[str, dict[str, PluginEntry]] | None = None

    def __reduce__(self):
        # Pickled as the arguments that build it (a Ray task gets a manager made in code, with
        # its extra plugins, rebuilt in the worker): pluggy's own state does not pickle.
        return (QEPluginManager, self._arguments)

    @property
    def hook(self):
        return self.pm.hook

    def _build_registry(self) -> dict[str, dict[str, PluginEntry]]:
        registry: dict[str, dict[str, PluginEntry]] = {kind: {} for kind in KINDS}
        for kind, hookname in KINDS.items():
            caller = getattr(self.pm.hook, hookname)
            module_name, _, class_name = KIND_BASES[kind].partition(":")
            base: type[Plugin] = getattr(importlib.import_module(module_name), class_name)
            # Call implementations one by one to know where each class came from.
            for impl in reversed(caller.get_hookimpls()):  # registration order
                origin = self._origins.get(id(impl.plugin), BUILTIN_ORIGIN)
                if origin == BUILTIN_ORIGIN and not str(impl.plugin_name).startswith("qe."):
                    origin = f"registered object {impl.plugin_name}"
                for cls in impl.function() or ():
                    if not (isinstance(cls, type) and issubclass(cls, base)):
                        raise ConfigError(f"{kind} plugin {cls!r} from {origin} does not subclass "
                                          f"{base.__module__}.{base.__name__}: derive it from that class")
                    name = cls.name
                    if not name:
                        raise ConfigError(f"plugin class {cls!r} from {origin} has no name")
                    if name in registry[kind]:
                        prev = registry[kind][name]
                        raise ConfigError(
                            f"{kind} {name!r} is registered twice ({prev.origin} and {origin}): rename one"
                        )
                    registry[kind][name] = PluginEntry(kind, name, cls, origin)
        return registry

    def entries(self, kind: str) -> dict[str, PluginEntry]:
        if kind not in KINDS:
            raise ConfigError(f"unknown plugin kind {kind!r}: kinds are {', '.join(KINDS)}")
        if self._registry is None:
            self._registry = self._build_registry()
        return self._registry[kind]

    def names(self, kind: str) -> list[str]:
        return list(self.entries(kind))

    def resolve(self, kind: str, text: str | PluginRef) -> Resolved:
        """Find plugin ``NAME[...]`` of a kind and validate its parameters (no model needed)."""
        ref = text if isinstance(text, PluginRef) else parse_plugin_ref(text)
        entries = self.entries(kind)
        if ref.name not in entries:
            label = kind.replace("_", " ")
            raise ConfigError(f"unknown {label} {ref.name!r}: available are {', '.join(entries) or 'none'}")
        entry = entries[ref.name]
        config = build_config(entry.cls.Config, ref.params, f"{kind} {ref.name}")
        return Resolved(entry, config, ref)

    def create(self, kind: str, text: str | PluginRef) -> Any:
        return self.resolve(kind, text).create()

    def event_hooks(self) -> list[tuple[str, str, list[str]]]:
        """``(hook name, summary, names of the plugins implementing it)`` for every event hook."""
        out = []
        for name in EVENT_HOOKS:
            caller = getattr(self.pm.hook, name)
            paragraph = " ".join((getattr(hookspecs, name).__doc__ or "").strip().split("\n\n")[0].split())
            implementers = [f"{impl.plugin_name} ({self._origins.get(id(impl.plugin), BUILTIN_ORIGIN)})"
                            for impl in caller.get_hookimpls()]
            out.append((name, paragraph.split("; ")[0], implementers))
        return out

    def compensator_modules(self) -> dict[str, tuple[PluginEntry, type[Any]]]:
        """``module_type`` → (the compensator plugin that declares it, the module class), over
        every installed compensator's ``modules``: the only classes a checkpoint can rebuild."""
        out: dict[str, tuple[PluginEntry, type[Any]]] = {}
        for entry in self.entries("compensator").values():
            for module_cls in entry.cls.modules:
                module_type = module_cls.module_type
                if module_type in out and out[module_type][1] is not module_cls:
                    raise ConfigError(f"compensator module type {module_type!r} is declared by {out[module_type][0].name} "
                                      f"({out[module_type][0].origin}) and {entry.name} ({entry.origin}): rename one")
                out[module_type] = (entry, module_cls)
        return out


@lru_cache(maxsize=1)
def default_manager() -> QEPluginManager:
    """The manager with built-ins and installed entry points (built once per process)."""
    return QEPluginManager()
