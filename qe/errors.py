"""User-facing errors.

A :class:`QEError` carries one line that names the problem and the fix. The CLI prints it
without a traceback; library callers can catch it. Anything else that escapes is a bug.
"""

from __future__ import annotations


class QEError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ConfigError(QEError):
    """A bad plugin name, parameter, setting string or recipe."""


class DataError(QEError):
    """Calibration or evaluation data that cannot be used (missing, empty, corrupt)."""


class ModelError(QEError):
    """A model that cannot be loaded or read by any adapter."""


class NumericalError(QEError):
    """NaN or Inf in weights, activations or statistics."""
