"""Calibration and evaluation samples: what a data source yields before tokenisation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qe.errors import DataError


@dataclass(frozen=True)
class Sample:
    """One calibration or evaluation record.

    ``text`` is the answer (a caption) for image samples and the whole text otherwise;
    ``image`` is a file path or a built-in reference such as ``skimage:astronaut``;
    ``prompt`` overrides the source's instruction prompt; ``token_ids`` holds an already
    tokenised window (the text benchmark protocol); ``origin`` names the file and line (or
    built-in id) so errors can point at it.
    """

    text: str
    image: str | None = None
    prompt: str | None = None
    token_ids: tuple[int, ...] | None = None
    origin: str = ""

    @property
    def has_image(self) -> bool:
        return self.image is not None


def require_nonempty(samples: list[Sample], what: str) -> list[Sample]:
    if not samples:
        raise DataError(f"{what} holds no samples: give a file with at least one record")
    return samples


def file_origin(path: Path | str, line: int) -> str:
    return f"{path}:{line}"
