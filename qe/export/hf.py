"""qe checkpoints through transformers' ``from_pretrained``: a registered quantization method.

``register()`` (run by ``import qe`` when transformers is importable) registers the ``qe``
quantization method with transformers' public API (``register_quantization_config`` /
``register_quantizer``). A directory whose ``config.json`` carries
``"quantization_config": {"quant_method": "qe", "layouts": {...}}`` and whose tensors are
indexed by ``model.safetensors.index.json`` then loads with
``AutoModelForImageTextToText.from_pretrained(DIR)`` (or ``AutoModelForCausalLM``) to the
model ``qe.load_quantized`` gives: the quantizer installs the empty ``QuantLinear`` modules
(with their compensators, rebuilt only by installed compensator plugins) before the weights
load, and transformers fills their buffers. ``qe export CKPT --format transformers`` writes
such a directory from a qe checkpoint (the same tensors, the same file names).
"""

from __future__ import annotations

import sys
from typing import Any

METHOD = "qe"
_AUTO = "transformers.quantizers.auto"
_registered = False


class _RegisterAfterImport:
    """A meta-path finder that registers the ``qe`` method right after transformers imports its
    quantizer registry, so that ``import qe`` costs no transformers import of its own."""

    def find_spec(self, name, path, target=None):
        if name != _AUTO:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module):
            run(module)
            uninstall_import_hook()
            try:
                register()
            except Exception:  # never break transformers' import; qe.load_quantized still works
                pass

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


_HOOK = _RegisterAfterImport()


def install_import_hook() -> None:
    """Register now if transformers' quantizer registry is loaded, else as soon as it is."""
    if _AUTO in sys.modules:
        register()
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


def uninstall_import_hook() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def register() -> bool:
    """Register the ``qe`` method with transformers (once); False when transformers lacks the API."""
    global _registered
    if _registered:
        return True
    try:
        from transformers.quantizers.auto import register_quantization_config, register_quantizer
        from transformers.quantizers.base import HfQuantizer
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError:
        return False

    class QEQuantizationConfig(QuantizationConfigMixin):
        """The ``quantization_config`` of a qe checkpoint: per-layer layouts (qe_manifest.json's)."""

        def __init__(self, layouts: dict[str, Any] | None = None, format_version: int = 2, **kwargs):
            self.quant_method = METHOD
            self.layouts = layouts or {}
            self.format_version = format_version
            for k, v in kwargs.items():
                setattr(self, k, v)

        def to_dict(self) -> dict[str, Any]:
            return {"quant_method": METHOD, "format_version": self.format_version, "layouts": self.layouts}

    class QEHfQuantizer(HfQuantizer):
        """Installs qe's quantized modules before transformers loads a qe checkpoint's tensors."""

        requires_calibration = True  # only pre-quantized checkpoints: qe quantizes with `qe quantize`

        def validate_environment(self, *args, **kwargs):
            return None

        def _process_model_before_weight_loading(self, model, **kwargs):
            from qe.checkpoint import install_quantized_modules

            install_quantized_modules(model, self.quantization_config.layouts)

        def _process_model_after_weight_loading(self, model, **kwargs):
            model.eval()
            return model

        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            return False

        def is_serializable(self):
            return False

        @property
        def is_trainable(self):
            return False

    try:
        register_quantization_config(METHOD)(QEQuantizationConfig)
        register_quantizer(METHOD)(QEHfQuantizer)
    except ValueError:  # already registered (a reloaded module)
        pass
    _registered = True
    return True
