"""Perplexity by the benchmark protocol (docs/protocol.md, text protocol).

Protocol: the held-out last 40% of the pydoc-topics token stream, cut into non-overlapping
512-token windows (a trailing partial window is dropped); each window predicts its 511
tokens after the first; logits are taken in fp32; the figure is exp of the mean negative
log-likelihood over all predicted tokens (not a mean of per-window perplexities).

Input is token ids only, through the top-level model's ``forward``: for a VLM this is a
text-only pass (no image), for a causal LM the usual one.

For ``qe eval --text-file``, :func:`perplexity_of_text_file` scores a user's text with
sliding windows: a window of ``window`` tokens every ``stride`` tokens, each token predicted
at most once, by the first window that reaches it with some context before it. With
``stride < window`` every token after the first is predicted, those past the first window
with at least ``window - stride`` tokens of context; with ``stride == window`` the windows do
not overlap and, as in the protocol, the first token of each window is context only.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qe.data.text import WINDOW, eval_windows, pydoc_text, split_tokens, tokenize_text
from qe.errors import ConfigError, DataError, NumericalError


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float  # exp(nll)
    nll: float  # mean negative log-likelihood per predicted token, nats
    tokens: int  # predicted tokens
    windows: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ScoredWindow:
    """Token ids of one forward pass; targets ``ids[first_target:]`` are scored.

    ``first_target >= 1``: the token at ``first_target`` is predicted from those before it.
    """

    ids: np.ndarray  # (L,)
    first_target: int = 1


def _model_and_tokenizer(model_or_loaded):
    from qe.models.loading import LoadedModel

    if isinstance(model_or_loaded, LoadedModel):
        return model_or_loaded.model, model_or_loaded.tokenizer
    if isinstance(model_or_loaded, nn.Module):
        return model_or_loaded, None
    raise ConfigError(f"perplexity needs a LoadedModel or an nn.Module, not {type(model_or_loaded).__name__}")


def input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and embeddings.weight.device.type != "meta":
        return embeddings.weight.device
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def heldout_windows(tokenizer, window: int = WINDOW, max_tokens: int | None = None) -> list[np.ndarray]:
    """The protocol's held-out windows: non-overlapping, over the last 40% of the pydoc text."""
    parts = split_tokens(tokenize_text(tokenizer, pydoc_text()))
    return eval_windows(parts.eval_ids, window, max_tokens)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits


@torch.no_grad()
def score_windows(
    model: nn.Module, windows: Sequence[ScoredWindow], *, batch_size: int = 8, progress: bool = False
) -> PerplexityResult:
    """Sum the NLL of every window's scored targets; batches group windows of equal length."""
    if not windows:
        raise DataError("perplexity needs at least one window of tokens")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, not {batch_size}")
    for w in windows:
        if len(w.ids) < 2 or not 1 <= w.first_target < len(w.ids):
            raise DataError(f"a perplexity window needs at least 2 tokens and 1 <= first_target < length "
                            f"(got length {len(w.ids)}, first_target {w.first_target})")
    was_training = model.training
    model.eval()
    device = input_device(model)
    nll_sum = 0.0  # float64 accumulator over all windows
    n_tokens = 0
    t0 = time.perf_counter()
    order = sorted(range(len(windows)), key=lambda i: len(windows[i].ids))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    # Split batches that mix lengths (only sliding windows of short texts can).
    even = []
    for b in batches:
        groups: dict[int, list[int]] = {}
        for i in b:
            groups.setdefault(len(windows[i].ids), []).append(i)
        even.extend(groups.values())
    try:
        for k, batch in enumerate(even):
            ids = torch.as_tensor(np.stack([windows[i].ids for i in batch]), dtype=torch.long, device=device)
            logits = _logits(model, ids)  # (B, L, V)
            if logits.shape[:2] != ids.shape:
                raise NumericalError(f"model returned logits of shape {tuple(logits.shape)} for inputs {tuple(ids.shape)}")
            for row, i in enumerate(batch):
                start = windows[i].first_target
                # position p predicts token p + 1: targets ids[start:], from logits[start - 1 : -1]
                pred = logits[row, start - 1 : -1].float()  # (n, V), fp32 as the protocol says
                target = ids[row, start:].to(pred.device)  # (n,)
                nll = F.cross_entropy(pred, target, reduction="sum")
                nll_sum += float(nll)
                n_tokens += int(target.numel())
            del logits
            if progress:
                done = sum(len(b) for b in even[: k + 1])
                print(f"\rperplexity: {done}/{len(windows)} windows, {time.perf_counter() - t0:.1f} s",
                      end="", file=sys.stderr, flush=True)
    finally:
        if progress:
            print(file=sys.stderr)
        model.train(was_training)
    mean_nll = nll_sum / n_tokens
    if not math.isfinite(mean_nll):
        raise NumericalError("perplexity is not finite: the model produced NaN or Inf logits")
    return PerplexityResult(math.exp(mean_nll), mean_nll, n_tokens, len(windows), time.perf_counter() - t0)


def perplexity(
    model_or_loaded,
    token_windows: list[np.ndarray] | None = None,
    *,
    batch_size: int = 8,
    progress: bool = True,
    max_tokens: int | None = None,
) -> PerplexityResult:
    """Perplexity over ``token_windows`` (each predicts its tokens after the first).

    Without windows: the built-in held-out text of the benchmark protocol (needs a
    :class:`~qe.models.loading.LoadedModel` for its tokenizer); ``max_tokens`` then keeps a
    prefix of the held-out part (whole windows only), a documented budget cut.
    """
    model, tokenizer = _model_and_tokenizer(model_or_loaded)
    if token_windows is None:
        if tokenizer is None:
            raise ConfigError("perplexity of the built-in held-out text needs the tokenizer: pass the LoadedModel "
                              "(qe.models.load_model) or token_windows")
        token_windows = heldout_windows(tokenizer, WINDOW, max_tokens)
        if not token_windows:
            raise DataError(f"max_tokens={max_tokens} is less than one window of {WINDOW} tokens")
    elif max_tokens is not None:
        raise ConfigError("max_tokens applies to the built-in held-out text; cut token_windows yourself")
    windows = [ScoredWindow(np.asarray(w, dtype=np.int64), 1) for w in token_windows]
    return score_windows(model, windows, batch_size=batch_size, progress=progress)


def sliding_windows(ids: np.ndarray, window: int = WINDOW, stride: int = WINDOW) -> list[ScoredWindow]:
    """Windows of ``window`` tokens every ``stride`` tokens; no token is scored twice.

    The first window scores its tokens 1..window-1; each later window scores the tokens past
    the previous window's end, except its own first token, which has no context (this only
    happens when ``stride == window``). The last window is moved back to end at the last
    token, so it keeps full length and more context, and scores only what is new.
    """
    if window < 2:
        raise ConfigError(f"window must be at least 2 tokens, not {window}")
    if not 1 <= stride <= window:
        raise ConfigError(f"stride must be between 1 and the window ({window}), not {stride}")
    n = len(ids)
    if n < window:
        raise DataError(f"the text has {n} tokens, fewer than one window of {window}: give a longer text or a smaller --window")
    out = [ScoredWindow(ids[:window], 1)]
    covered = window  # tokens [0, covered) are scored or are the first token
    start = stride
    while covered < n:
        end = min(start + window, n)
        begin = end - window
        out.append(ScoredWindow(ids[begin:end], max(1, window - (end - covered))))
        covered = end
        start += stride
    return out


def perplexity_of_text_file(
    model_or_loaded,
    path: str | Path,
    window: int = WINDOW,
    stride: int = WINDOW,
    *,
    tokenizer=None,
    batch_size: int = 8,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of a UTF-8 text file (``qe eval --text-file``), tokenised without special tokens.

    Sliding windows of ``window`` tokens every ``stride`` tokens (:func:`sliding_windows`);
    ``stride == window`` gives the protocol's non-overlapping windows, except that a trailing
    partial window is not dropped: the last window is moved back to end at the last token.
    """
    model, own_tokenizer = _model_and_tokenizer(model_or_loaded)
    tokenizer = tokenizer or own_tokenizer
    if tokenizer is None:
        raise ConfigError("perplexity of a text file needs a tokenizer: pass the LoadedModel or tokenizer=")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file {path} not found: give an existing UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    ids = tokenize_text(tokenizer, text)
    if len(ids) < window:
        raise DataError(f"{path}: the text has {len(ids)} tokens, fewer than one window of {window}; "
                        "give a longer text or a smaller window")
    return score_windows(model, sliding_windows(ids, window, stride), batch_size=batch_size, progress=progress)
