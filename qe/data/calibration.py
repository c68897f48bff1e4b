"""The calibration set of a run: samples from a source, encoded by the model's adapter, with
the hash and per-modality token counts that checkpoints and reports record."""

from __future__ import annotations

import hashlib

import torch
from tqdm.auto import tqdm

from qe.data.images import default_prompt
from qe.data.samples import Sample
from qe.data.sources import resolve_source, take_samples
from qe.errors import DataError
from qe.modality import MODALITIES
from qe.models.base import EncodedSample
from qe.models.loading import LoadedModel


def encode_samples(loaded: LoadedModel, samples: list[Sample], progress: bool = False) -> list[EncodedSample]:
    out = []
    for s in tqdm(samples, desc="tokenize", disable=not progress, leave=False):
        out.append(loaded.adapter.encode(loaded.processor, s, default_prompt(), loaded.model))
    if not out or sum(e.num_tokens for e in out) == 0:
        raise DataError("the calibration set gives no tokens: check the data")
    return out


# The default calibration when the model's vision tower is synthetic (the embedded default):
# its vision tokens are seeded random features, so with image-caption samples alone most
# calibration tokens would be unlike any text the model is scored on; half the samples are
# then 512-token real-text windows, which makes most calibration tokens real text.
SYNTHETIC_VISION_DEFAULT = "mixed"
DEFAULT = "images"


def default_calibration(loaded: LoadedModel) -> tuple[str, str]:
    """The calibration source used when none is given, and why."""
    if loaded.synthetic_vision:
        return SYNTHETIC_VISION_DEFAULT, ("the model's vision tower is synthetic, so half the samples are real text "
                                          "windows (most calibration tokens text)")
    return DEFAULT, "the built-in image-caption pairs, for a vision-language model"


def calibration_set(loaded: LoadedModel, calib: str | None, samples: int | None, progress: bool = False,
                    split: str = "calib") -> tuple[str, list[EncodedSample]]:
    """The encoded calibration samples and the source's description (the default's with why)."""
    reason = ""
    if calib is None:
        calib, why = default_calibration(loaded)
        reason = f" (default: {why})"
    source = resolve_source(calib)
    chosen = take_samples(source.samples(loaded.tokenizer, split), samples, source.describe())
    return source.describe() + reason, encode_samples(loaded, chosen, progress)


def data_hash(encoded: list[EncodedSample]) -> str:
    """A hash of the tokenized calibration data (ids, modality, pixels)."""
    h = hashlib.sha256()
    for e in encoded:
        for key in sorted(e.inputs):
            v = e.inputs[key]
            if isinstance(v, torch.Tensor):
                h.update(key.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
        h.update(e.modality.numpy().tobytes())
    return h.hexdigest()[:16]


def token_counts(encoded: list[EncodedSample]) -> dict[str, int]:
    counts = {m: 0 for m in MODALITIES}
    for e in encoded:
        for m, n in e.modality_counts().items():
            counts[m] += n
    return counts


def tokens_by_source(encoded: list[EncodedSample]) -> dict[str, int]:
    """Calibration tokens by where the samples came from (the origin's prefix: ``pydoc``,
    ``builtin`` images, or a JSONL file)."""
    counts: dict[str, int] = {}
    for e in encoded:
        origin = e.origin.split(":", 1)[0] if e.origin else "unknown"
        counts[origin] = counts.get(origin, 0) + e.num_tokens
    return counts
