"""Token modalities: every calibration token is text (prompt), vision or answer."""

from __future__ import annotations

from enum import IntEnum


class Modality(IntEnum):
    TEXT = 0  # text prompt (and plain text)
    VISION = 1
    ANSWER = 2


MODALITIES = tuple(m.name.lower() for m in Modality)
