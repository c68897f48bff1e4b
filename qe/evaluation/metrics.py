"""Evaluation metrics beyond text perplexity: caption likelihood and per-layer error.

* :func:`caption_nll` — mean negative log-likelihood per answer token of held-out captions
  given their image and prompt (the built-in set's ``eval`` split by default): how well the
  model still describes images.
* :func:`layer_errors` — per linear layer of the decoder, the relative output error of a
  (quantized) model against the full-precision model on the same samples, overall and split
  by modality. Each model runs on its own propagated inputs, as deployed, so the figure at
  depth d includes what the layers before d already changed.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qe.errors import DataError
from qe.modality import MODALITIES, Modality
from qe.models.base import EncodedSample


@dataclass(frozen=True)
class CaptionNLLResult:
    nll: float  # mean NLL per answer token (nats)
    ppl: float  # exp(nll)
    tokens: int
    samples: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def caption_nll(model: nn.Module, encoded: list[EncodedSample]) -> CaptionNLLResult:
    """NLL of the answer tokens of each sample, given everything before them."""
    t0 = time.perf_counter()
    total, count = 0.0, 0
    for e in encoded:
        answer = (e.modality == int(Modality.ANSWER)).nonzero().flatten()
        if answer.numel() == 0:
            continue
        out = model(**e.inputs, use_cache=False)
        logits = (out.logits if hasattr(out, "logits") else out[0])[0].float()  # (T, V)
        ids = e.inputs["input_ids"][0]
        answer = answer[answer > 0]  # position p is predicted by logits[p - 1]
        total += float(F.cross_entropy(logits[answer - 1], ids[answer].to(logits.device), reduction="sum"))
        count += int(answer.numel())
    if count == 0:
        raise DataError("caption NLL needs samples with answer tokens (image-caption pairs); the set has none")
    nll = total / count
    return CaptionNLLResult(nll, math.exp(nll), count, len(encoded), time.perf_counter() - t0)


def _linear_like(module: nn.Module) -> bool:
    from qe.quantizers.qlinear import QuantLinear

    return isinstance(module, (nn.Linear, QuantLinear))


@torch.no_grad()
def _layer_outputs(model: nn.Module, names: list[str], e: EncodedSample) -> dict[str, torch.Tensor]:
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for n in names:
        def hook(module, args, output, _n=n):
            outputs[_n] = output.detach().reshape(-1, output.shape[-1]).float()
        handles.append(model.get_submodule(n).register_forward_hook(hook))
    try:
        model(**e.inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return outputs


@torch.no_grad()
def layer_errors(reference, candidate, encoded: list[EncodedSample]) -> list[dict]:
    """Per decoder linear: ``‖Y_ref − Y‖² / ‖Y_ref‖²`` over the samples, and per modality.

    ``reference`` and ``candidate`` are :class:`~qe.models.loading.LoadedModel` of the same
    architecture (the candidate's linears may be quantized).
    """
    adapter = reference.adapter
    prefix = adapter.blocks_prefix(reference.model)
    names = [f"{prefix}.{i}.{n}" for i, b in enumerate(adapter.decoder_blocks(reference.model))
             for n in adapter.block_linears(b)]
    missing = [n for n in names if not _has(candidate.model, n)]
    if missing:
        raise DataError(f"the candidate model has no layer {missing[0]}: compare models of the same architecture")
    num = {n: torch.zeros(len(MODALITIES), dtype=torch.float64) for n in names}
    den = {n: torch.zeros(len(MODALITIES), dtype=torch.float64) for n in names}
    for e in encoded:
        ref = _layer_outputs(reference.model, names, e)
        cand = _layer_outputs(candidate.model, names, e)
        mod = e.modality.long()
        onehot = F.one_hot(mod, len(MODALITIES)).double()  # (T, M)
        for n in names:
            diff = (ref[n] - cand[n]).double().pow(2).sum(1)  # (T,)
            base = ref[n].double().pow(2).sum(1)
            num[n] += diff @ onehot
            den[n] += base @ onehot
    rows = []
    for n in names:
        row = {"layer": n, "rel_error": float(num[n].sum() / den[n].sum().clamp_min(1e-30))}
        for m, name in enumerate(MODALITIES):
            row[f"rel_error_{name}"] = float(num[n][m] / den[n][m]) if den[n][m] > 0 else None
        rows.append(row)
    return rows


def _has(model: nn.Module, name: str) -> bool:
    try:
        return _linear_like(model.get_submodule(name))
    except AttributeError:
        return False
