"""The text benchmark protocol (docs/protocol.md, text protocol), shared by every perplexity figure.

Text: ``pydoc_data.topics.topics`` sorted by key, values joined by a blank line, tokenised
without special tokens. The first 60% of the tokens are for calibration (64 windows of 512
tokens, evenly spaced); the last 40% are held out and scored in non-overlapping 512-token
windows. The two parts never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from qe.errors import DataError

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


def calibration_starts(n_calib: int, n: int = CALIB_WINDOWS, window: int = WINDOW) -> np.ndarray:
    """Start positions of ``n`` windows evenly spaced over ``n_calib`` calibration tokens."""
    if n < 1:
        raise DataError(f"need at least one calibration window, not {n}")
    if n_calib < window:
        raise DataError(f"calibration text has {n_calib} tokens, fewer than one window of {window}")
    return np.linspace(0, n_calib - window, n).round().astype(int)


def calibration_windows(calib_ids: np.ndarray, n: int = CALIB_WINDOWS, window: int = WINDOW) -> list[np.ndarray]:
    """``n`` windows of ``window`` tokens, evenly spaced over the calibration part."""
    return [calib_ids[s : s + window] for s in calibration_starts(len(calib_ids), n, window)]


def eval_starts(n_eval: int, window: int = WINDOW, max_tokens: int | None = None) -> np.ndarray:
    """Start positions (within the held-out part) of its non-overlapping windows."""
    if window < 2:
        raise DataError(f"a perplexity window needs at least 2 tokens, not {window}")
    n_used = n_eval if max_tokens is None else min(n_eval, max_tokens)
    return np.arange(n_used // window) * window


def eval_windows(eval_ids: np.ndarray, window: int = WINDOW, max_tokens: int | None = None) -> list[np.ndarray]:
    """Non-overlapping windows over the held-out part; a trailing partial window is dropped.

    ``max_tokens`` keeps only a prefix of the held-out part (a documented budget cut).
    """
    return [eval_ids[s : s + window] for s in eval_starts(len(eval_ids), window, max_tokens)]
