"""Low-rank compensators as a standard PEFT LoRA adapter.

PEFT computes ``lora_B(lora_A(dropout(x))) · scaling`` on the layer's input ``x``; qe's
compensator computes ``A (B x̃)`` on the smoothed input ``x̃ = x / input_scale``. So
``lora_A.weight = B`` ``(r, d_in)``, ``lora_B.weight = A`` ``(d_out, r)``, ``lora_alpha = r``
(scaling 1, per module through ``rank_pattern`` / ``alpha_pattern``) and dropout 0. The base
export folds every explicit smoothing scale into the preceding linear, so the exported layer's
input already is ``x̃``; a layer whose input stayed ``x`` would need ``B``'s columns divided by
``input_scale`` (:func:`on_input`). The producer of a fold has its output rows divided, and
so its adapter's ``A`` rows too.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from qe.export.plan import LowRankTerm

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def on_input(term: LowRankTerm, input_scale: torch.Tensor) -> LowRankTerm:
    """The same term read on ``x`` instead of ``x̃ = x / input_scale``: ``B ← B · diag(1/s)``."""
    return LowRankTerm(term.A, term.B / input_scale.float()[None, :], term.source, term.dropped)


def divide_rows(term: LowRankTerm, divisor: torch.Tensor) -> LowRankTerm:
    """The term with its output rows divided (its layer's output is divided by ``divisor``)."""
    return LowRankTerm(term.A / divisor.float()[:, None], term.B, term.source, term.dropped)


def write_adapter(terms: dict[str, LowRankTerm], directory: Path) -> dict:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors``; return the config."""
    from peft import LoraConfig

    terms = {n: t for n, t in terms.items() if t.rank > 0}
    ranks = {n: t.rank for n, t in terms.items()}
    default = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    pattern = {n: r for n, r in ranks.items() if r != default}
    config = LoraConfig(
        r=default, lora_alpha=default, lora_dropout=0.0, bias="none", target_modules=sorted(terms),
        rank_pattern=pattern, alpha_pattern=dict(pattern), init_lora_weights=True,
    )
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    tensors = {}
    for name, t in terms.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = t.B.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = t.A.contiguous()
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return json.loads((directory / ADAPTER_CONFIG).read_text())
