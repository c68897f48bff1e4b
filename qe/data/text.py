"""The text benchmark protocol (shared/ANCHORS.md), shared by every perplexity figure.

Text: ``pydoc_data.topics.topics`` sorted by key, values joined by a blank line, tokenised
without special tokens. The first 60% of the tokens are for calibration (64 windows of 512
tokens, evenly spaced); the last 40% are held out and scored in non-overlapping 512-token
windows. The two parts never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

WINDOW = 512
CALIB_FRACTION = 0.6
CALIB_WINDOWS = 64


@lru_cache(maxsize=1)
def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@dataclass(frozen=True)
class TextSplit:
    calib_ids: np.ndarray  # first 60% of the token stream
    eval_ids: np.ndarray  # last 40%
    calib_offset: int  # index of calib_ids[0] in the full stream (always 0)
    eval_offset: int  # index of eval_ids[0] in the full stream


def tokenize_text(tokenizer, text: str) -> np.ndarray:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def split_tokens(ids: np.ndarray, calib_fraction: float = CALIB_FRACTION) -> TextSplit:
    cut = int(len(ids) * calib_fraction)
    return TextSplit(ids[:cut], ids[cut:], 0, cut)


def calibration_windows(calib_ids: np.ndarray, n: int = CALIB_WINDOWS, window: int = WINDOW) -> list[np.ndarray]:
    """``n`` windows of ``window`` tokens, evenly spaced over the calibration part."""
    if len(calib_ids) < window:
        raise ValueError(f"calibration text has {len(calib_ids)} tokens, fewer than one window of {window}")
    starts = np.linspace(0, len(calib_ids) - window, n).round().astype(int)
    return [calib_ids[s : s + window] for s in starts]


def eval_windows(eval_ids: np.ndarray, window: int = WINDOW, max_tokens: int | None = None) -> list[np.ndarray]:
    """Non-overlapping windows over the held-out part; a trailing partial window is dropped.

    ``max_tokens`` keeps only a prefix of the held-out part (a documented budget cut).
    """
    ids = eval_ids if max_tokens is None else eval_ids[:max_tokens]
    n = len(ids) // window
    return [ids[i * window : (i + 1) * window] for i in range(n)]
