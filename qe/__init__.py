"""qe: analysis-first post-training quantization of vision-language models (Quant Experts)."""

from qe.errors import QEError
from qe.hookspecs import hookimpl
from qe.settings import QuantSetting, parse_setting

__version__ = "0.1.0"

__all__ = ["QEError", "QuantSetting", "hookimpl", "parse_setting", "__version__"]
