"""qe: analysis-first post-training quantization of vision-language models (Quant Experts)."""

from qe.errors import QEError
from qe.hookspecs import hookimpl
from qe.settings import QuantSetting, parse_setting
from qe.version import __version__


def load_quantized(directory, *, device=None):
    """Load a checkpoint written by ``qe quantize``; returns a ``LoadedModel`` (``.model``
    is the transformers model, ready for ``generate``)."""
    from qe.models.loading import load_quantized as _load

    return _load(directory, device=device)


def analyze(*args, **kwargs):
    """``qe analyze`` from Python: see :func:`qe.commands.analyze.analyze`."""
    from qe.commands.analyze import analyze as _analyze

    return _analyze(*args, **kwargs)


def quantize(recipe, model=None, **kwargs):
    """``qe quantize`` from Python: see :func:`qe.commands.quantize.run_quantize`."""
    from qe.commands.quantize import run_quantize

    return run_quantize(recipe, model, **kwargs)


def _register_transformers_method() -> None:
    """qe checkpoints exported with ``qe export --format transformers`` load through
    ``from_pretrained`` (qe.export.hf): registered when transformers loads its quantizers."""
    try:
        from qe.export.hf import install_import_hook

        install_import_hook()
    except Exception:  # an optional integration must never break `import qe`
        pass


_register_transformers_method()

__all__ = ["QEError", "QuantSetting", "analyze", "hookimpl", "load_quantized", "parse_setting", "quantize", "__version__"]
