"""Calibration sources: named data sets (plugins) and user JSONL files.

``--calib`` takes a source name (``images``, ``pydoc``, or a third party's) or the path of a
JSONL file whose records are ``{"image": path, "text": caption}``,
``{"image": path, "prompt": ..., "text": ...}`` or ``{"text": ...}``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from qe.data.images import builtin_image_captions
from qe.data.samples import Sample, file_origin, require_nonempty
from qe.data.text import (
    CALIB_WINDOWS,
    WINDOW,
    calibration_windows,
    eval_windows,
    pydoc_text,
    split_tokens,
    tokenize_text,
)
from qe.errors import ConfigError, DataError
from qe.hookspecs import hookimpl
from qe.plugins import Plugin

Split = Literal["calib", "eval"]

log = logging.getLogger("qe")


class CalibrationSource(Plugin):
    """A named data set. ``samples`` returns records of the calibration or held-out split."""

    kind: ClassVar[str] = "calibration_source"
    name: ClassVar[str]


    def samples(self, tokenizer, split: Split = "calib") -> list[Sample]:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class BuiltinImages(CalibrationSource):
    """Built-in offline image-caption pairs (26 real images, 2 captions each, split by image)."""

    name = "images"

    def samples(self, tokenizer, split: Split = "calib") -> list[Sample]:
        return builtin_image_captions(split)


@dataclass(frozen=True)
class PydocConfig:
    window: int = WINDOW
    windows: int = CALIB_WINDOWS

    def __post_init__(self):
        if self.window < 2 or self.windows < 1:
            raise ConfigError("pydoc needs window >= 2 and windows >= 1")


class PydocText(CalibrationSource):
    """The text benchmark protocol: 512-token windows from the first 60% of the pydoc topics."""

    name = "pydoc"
    Config = PydocConfig

    def samples(self, tokenizer, split: Split = "calib") -> list[Sample]:
        parts = split_tokens(tokenize_text(tokenizer, pydoc_text()))
        if split == "calib":
            wins = calibration_windows(parts.calib_ids, self.config.windows, self.config.window)
        else:
            wins = eval_windows(parts.eval_ids, self.config.window)
        return [Sample(text="", token_ids=tuple(int(t) for t in w), origin=f"pydoc:{split}#{i}") for i, w in enumerate(wins)]


@dataclass(frozen=True)
class MixedConfig:
    text_share: float = 0.5  # share of the samples that are text windows (the rest image-caption pairs)
    window: int = WINDOW  # tokens per text window

    def __post_init__(self):
        if not 0.0 <= self.text_share <= 1.0:
            raise ConfigError(f"mixed text_share={self.text_share} is outside 0..1")
        if self.window < 2:
            raise ConfigError("mixed needs window >= 2")


class MixedCalibration(CalibrationSource):
    """Real text windows (pydoc) interleaved with the built-in image-caption pairs."""

    name = "mixed"
    Config = MixedConfig

    def samples(self, tokenizer, split: Split = "calib") -> list[Sample]:
        text = PydocText(PydocConfig(window=self.config.window)).samples(tokenizer, split)
        images = builtin_image_captions(split)
        return interleave(text, images, self.config.text_share)

    def describe(self) -> str:
        return f"mixed ({self.config.text_share:.0%} pydoc text windows of {self.config.window} tokens, the rest image-caption pairs)"


def interleave(first: list[Sample], second: list[Sample], share: float) -> list[Sample]:
    """Both lists in one, so that every prefix of length n holds ``round(n · share)`` (as near as
    the lists allow) samples of ``first``: taking the first n samples keeps the proportion."""
    out: list[Sample] = []
    i = j = 0
    while i < len(first) or j < len(second):
        want_first = round((len(out) + 1) * share) > i
        if (want_first and i < len(first)) or j >= len(second):
            out.append(first[i])
            i += 1
        else:
            out.append(second[j])
            j += 1
    return out


class JsonlSource(CalibrationSource):
    """A user's JSONL file of image-caption or text records."""

    name = "jsonl"

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)

    def samples(self, tokenizer=None, split: Split = "calib") -> list[Sample]:
        return read_jsonl(self.path)

    def describe(self) -> str:
        return str(self.path)


def read_jsonl(path: Path) -> list[Sample]:
    """Read and check a JSONL calibration file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"calibration file {path} not found: give an existing JSONL file or a source name (images, pydoc)")
    samples = []
    base = path.parent
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as e:
        raise DataError(f"cannot read calibration file {path}: {e.strerror}") from None
    for lineno, raw in enumerate(lines, 1):
        where = file_origin(path, lineno)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{where}: not UTF-8 text; save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(rec, dict):
            raise DataError(f"{where}: a record must be a JSON object with a \"text\" field")
        unknown = set(rec) - {"image", "prompt", "text"}
        if unknown:
            raise DataError(f"{where}: unknown field(s) {sorted(unknown)}; records hold image, prompt and text")
        text = rec.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: \"text\" must be a non-empty string")
        image = rec.get("image")
        if image is not None:
            if not isinstance(image, str) or not image:
                raise DataError(f"{where}: \"image\" must be a file path")
            p = Path(image)
            image = str(p if p.is_absolute() else base / p)
            if not Path(image).is_file():
                raise DataError(f"{where}: image file {image} not found; fix the path or remove the record")
            _check_image(image, where)
        prompt = rec.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise DataError(f"{where}: \"prompt\" must be a string")
        if prompt is not None and image is None:
            raise DataError(f"{where}: \"prompt\" needs an \"image\"; text-only records hold only \"text\"")
        samples.append(Sample(text=text, image=image, prompt=prompt, origin=where))
    return require_nonempty(samples, f"calibration file {path}")


def _check_image(image: str, where: str) -> None:
    """Fail now, naming the record, on an image PIL cannot identify (reads the header only)."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(image) as im:
                im.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{where}: image {image} has more than {Image.MAX_IMAGE_PIXELS} pixels (a decompression "
                        "bomb?); shrink or remove it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{where}: cannot read image {image} ({e.__class__.__name__}); replace or remove the record") from None


def resolve_source(spec: str | None, manager=None) -> CalibrationSource:
    """A calibration source from ``--calib``: a JSONL path or a source plugin name."""
    from qe.plugins import default_manager

    if spec is None:
        spec = "images"
    if spec.endswith(".jsonl") or Path(spec).exists() or "/" in spec:
        return JsonlSource(spec)
    manager = manager or default_manager()
    return manager.create("calibration_source", spec)


def check_source(spec: str | None, manager=None) -> CalibrationSource:
    """Resolve ``--calib`` and read a JSONL file now, before any model loads (a bad name, a
    missing file or a bad record fails in one line at once)."""
    source = resolve_source(spec, manager)
    if isinstance(source, JsonlSource):
        source.samples()
    return source


def take_samples(samples: list[Sample], n: int | None, what: str = "calibration set") -> list[Sample]:
    """The first ``n`` samples; all of them when ``n`` is None or larger than the set."""
    require_nonempty(samples, what)
    if n is None:
        return samples
    if n < 1:
        raise ConfigError(f"--samples must be at least 1, not {n}")
    if n > len(samples):
        log.warning("qe: --samples %d asked, but %s has %d: using all %d", n, what, len(samples), len(samples))
    return samples[:n]


@hookimpl
def qe_calibration_sources():
    return [BuiltinImages, PydocText, MixedCalibration]
