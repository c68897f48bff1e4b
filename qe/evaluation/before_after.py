"""The before/after check that ends ``qe quantize``: is the quantized model still the model?

Before quantizing, the full-precision model's perplexity on a small slice of the built-in
held-out text and its last hidden states on that slice and on a few calibration samples are
kept; after, the quantized model is measured the same way. Two figures a person can read:

* held-out perplexity, full precision → quantized;
* the relative error of the last hidden state ``‖h_q − h‖² / ‖h‖²`` on calibration tokens
  and on held-out tokens. A compensator fitted to too few samples shows a calibration error
  far below its held-out one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from qe.errors import NumericalError
from qe.evaluation.perplexity import heldout_windows, perplexity
from qe.models.base import EncodedSample
from qe.models.loading import LoadedModel

HELDOUT_TOKENS = 1024  # two 512-token windows: a few seconds on the embedded default, on 2 cores
CALIBRATION_SAMPLES = 4


@dataclass
class Reference:
    """The full-precision side, measured before quantizing."""

    ppl: float
    tokens: int
    windows: list[np.ndarray]
    heldout_hidden: list[torch.Tensor]
    calibration: list[EncodedSample]
    calibration_hidden: list[torch.Tensor]
    seconds: float


@torch.no_grad()
def _ppl(model: nn.Module, windows: list[np.ndarray]) -> tuple[float, int]:
    """Perplexity and predicted tokens; NaN when the model's logits are not finite (the
    checks that name the damaged tensor come later, where tensors are written)."""
    try:
        result = perplexity(model, windows, progress=False)
    except NumericalError:
        return float("nan"), sum(len(w) - 1 for w in windows)
    return result.ppl, result.tokens


def _last_hidden(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs, output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1].detach().float().cpu()


def _window_inputs(window: np.ndarray, device) -> dict:
    ids = torch.as_tensor(window, dtype=torch.long, device=device)[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _device(model: nn.Module):
    from qe.evaluation.perplexity import input_device

    return input_device(model)


def _to(inputs: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def measure_reference(loaded: LoadedModel, calibration: list[EncodedSample],
                      heldout_tokens: int = HELDOUT_TOKENS) -> Reference:
    t0 = time.perf_counter()
    model = loaded.model
    windows = heldout_windows(loaded.tokenizer, max_tokens=heldout_tokens)
    ppl, tokens = _ppl(model, windows)
    dev = _device(model)
    heldout = [_last_hidden(model, _window_inputs(w, dev)) for w in windows]
    chosen = calibration[:CALIBRATION_SAMPLES]
    calib = [_last_hidden(model, _to(e.inputs, dev)) for e in chosen]
    return Reference(ppl, tokens, windows, heldout, chosen, calib, time.perf_counter() - t0)


def _relative(reference: list[torch.Tensor], now: list[torch.Tensor]) -> float:
    num = sum(float((r - n).double().pow(2).sum()) for r, n in zip(reference, now))
    den = sum(float(r.double().pow(2).sum()) for r in reference)
    return num / max(den, 1e-30)


def compare_with(reference: Reference, model: nn.Module) -> dict[str, float]:
    """The after side: the figures of the quantized ``model`` beside the reference's."""
    t0 = time.perf_counter()
    dev = _device(model)
    ppl, _ = _ppl(model, reference.windows)
    heldout = [_last_hidden(model, _window_inputs(w, dev)) for w in reference.windows]
    calib = [_last_hidden(model, _to(e.inputs, dev)) for e in reference.calibration]
    return {
        "heldout_tokens": reference.tokens,
        "ppl_full_precision": reference.ppl,
        "ppl_quantized": ppl,
        "hidden_rel_error_calibration": _relative(reference.calibration_hidden, calib),
        "hidden_rel_error_heldout": _relative(reference.heldout_hidden, heldout),
        "seconds": reference.seconds + time.perf_counter() - t0,
    }


def describe(figures: dict[str, float]) -> str:
    """The one line ``qe quantize`` ends with."""
    return (f"held-out perplexity {figures['ppl_full_precision']:.3f} → {figures['ppl_quantized']:.3f} "
            f"(full precision → quantized, {figures['heldout_tokens']} predicted tokens of built-in text); relative error of "
            f"the last hidden state {figures['hidden_rel_error_calibration']:.4g} on calibration samples, "
            f"{figures['hidden_rel_error_heldout']:.4g} on held-out text")
