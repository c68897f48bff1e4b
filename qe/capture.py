"""Block-wise capture: run a language model's decoder one block at a time.

The calibration samples go through the model once, up to the first decoder block, where a
hook records each batch's block inputs (hidden states and the keyword arguments the model
passes every block: position embeddings, masks, position ids). From then on each block runs
on its own, from those captured inputs, so only one block's activations are alive at a time
and a block's weights need to be on the device only while it runs.

Statistics are streamed by forward pre-hooks on the block's linears (:func:`attach_stats`),
each batch tagged with its modality mask and its global token offset.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qe.analysis.statistics import ImportanceStats, InputStats, LinearStats
from qe.errors import ModelError, NumericalError
from qe.models.base import EncodedSample, ModelAdapter
from qe.models.loading import LoadedModel


class _StopForward(Exception):
    pass


@dataclass
class CapturedBatch:
    """One batch of block inputs: ``hidden`` ``(B, T, d)`` plus the block's keyword arguments."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]
    modality: torch.Tensor  # (B*T,) int8
    offset: int  # global position of this batch's first token

    @property
    def num_tokens(self) -> int:
        return int(self.modality.numel())


@dataclass
class BlockInputs:
    batches: list[CapturedBatch] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(b.num_tokens for b in self.batches)

    def with_hidden(self, hidden: list[torch.Tensor]) -> BlockInputs:
        """The same batches with new hidden states (the next block's inputs)."""
        return BlockInputs([CapturedBatch(h, b.kwargs, b.modality, b.offset) for h, b in zip(hidden, self.batches)])


def _batches(encoded: list[EncodedSample], batch_size: int) -> list[list[EncodedSample]]:
    """Consecutive samples of equal length share a batch (no padding, so no pad tokens in statistics)."""
    out: list[list[EncodedSample]] = []
    for e in encoded:
        if out and len(out[-1]) < batch_size and out[-1][0].num_tokens == e.num_tokens and _stackable(out[-1][0], e):
            out[-1].append(e)
        else:
            out.append([e])
    return out


def _stackable(a: EncodedSample, b: EncodedSample) -> bool:
    return a.inputs.keys() == b.inputs.keys() and all(
        not isinstance(v, torch.Tensor) or v.shape == b.inputs[k].shape for k, v in a.inputs.items()
    )


def _collate(group: list[EncodedSample], device) -> dict[str, Any]:
    if len(group) == 1:
        inputs = group[0].inputs
    else:
        inputs = {k: torch.cat([g.inputs[k] for g in group], 0) for k in group[0].inputs}
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _to(value: Any, device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def capture_block_inputs(
    loaded: LoadedModel,
    encoded: list[EncodedSample],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    storage_device: str | torch.device | None = None,
    progress: bool = True,
) -> BlockInputs:
    """Run the samples up to the first decoder block and record that block's inputs.

    ``storage_device`` keeps the captured activations elsewhere (e.g. CPU while blocks run on
    an accelerator); by default they stay on ``device``.
    """
    storage = storage_device or device
    issue = loaded.adapter.blockwise_issue(loaded.model)
    if issue:
        raise ModelError(issue)
    blocks = loaded.adapter.decoder_blocks(loaded.model)
    captured: dict[str, Any] = {}

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "cache", "use_cache")}
        captured["hidden"], captured["kwargs"] = hidden, kw
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    out = BlockInputs()
    offset = 0
    try:
        for group in tqdm(_batches(encoded, batch_size), desc="capture", disable=not progress, leave=False):
            inputs = _collate(group, device)
            try:
                loaded.model(**inputs, use_cache=False)
            except _StopForward:
                pass
            else:  # pragma: no cover - the hook always fires
                raise RuntimeError("the first decoder block was never called")
            modality = torch.cat([g.modality for g in group])
            hidden = captured["hidden"].detach()
            if not torch.isfinite(hidden).all():
                raise NumericalError("NaN or Inf in the inputs of decoder block 0: check the model's dtype and the data")
            out.batches.append(CapturedBatch(hidden.to(storage), _to(captured["kwargs"], storage), modality, offset))
            offset += modality.numel()
    finally:
        handle.remove()
    return out


def block_output(result: Any) -> torch.Tensor:
    """Hidden states from a decoder block's return value (tensor or tuple)."""
    return result[0] if isinstance(result, (tuple, list)) else result


class StreamContext:
    """The batch being streamed: hooks read its modality and token offset."""

    def __init__(self):
        self.modality: torch.Tensor | None = None
        self.offset = 0


@torch.no_grad()
def run_block(
    block: nn.Module,
    inputs: BlockInputs,
    *,
    device: str | torch.device = "cpu",
    context: StreamContext | None = None,
    keep_outputs: bool = True,
    block_index: int = 0,
) -> list[torch.Tensor]:
    """Run one block over every captured batch; return the outputs (on the storage device)."""
    from qe.models.offload import onloaded

    outputs = []
    # An offloaded block is loaded once for all batches (and its weights are real when the
    # statistics hooks read them), then dropped again.
    with onloaded(block, device):
        for b in inputs.batches:
            outputs.extend(_run_batch(block, b, device, context, keep_outputs, block_index))
    return outputs


def _run_batch(block, b: CapturedBatch, device, context, keep_outputs: bool, block_index: int) -> list[torch.Tensor]:
    if context is not None:
        context.modality, context.offset = b.modality, b.offset
    y = block_output(block(b.hidden.to(device), **_to(b.kwargs, device)))
    # One reduction instead of an elementwise mask; a non-finite sum is then checked exactly.
    if not torch.isfinite(y.sum()) and not torch.isfinite(y).all():
        raise NumericalError(f"NaN or Inf in the outputs of decoder block {block_index}: check the model's dtype and the data")
    return [y.to(b.hidden.device)] if keep_outputs else []


@contextlib.contextmanager
def attach_stats(
    block: nn.Module,
    adapter: ModelAdapter,
    *,
    prefix: str,
    context: StreamContext,
    sample_positions: torch.Tensor | None,
    hessian: bool,
    moments: bool = True,
    estimator=None,
    k: int = 32,
    keep_topk: bool = True,
    linears: set[str] | None = None,
    record_range: tuple[int, int] | None = None,
) -> Iterator[dict[str, LinearStats]]:
    """Stream statistics of the block's linears while it runs inside the ``with``.

    Linears of one smoothing group share one :class:`InputStats`. With an ``estimator`` each
    linear also gets :class:`ImportanceStats` (top-k counts, per-token top-k indices).
    """
    stats: dict[str, LinearStats] = {}
    handles = []
    block_linears = adapter.block_linears(block)
    for group in adapter.smoothing_groups(block):
        members = [n for n in group.linears if linears is None or n in linears]
        if not members:
            continue
        d_in = block_linears[members[0]].in_features
        shared = InputStats(d_in, sample_positions, hessian=hessian, moments=moments, where=f"{prefix}.{members[0]}")
        for pos, name in enumerate(members):
            lin = block_linears[name]
            importance = None
            if estimator is not None:
                importance = ImportanceStats(d_in, k, None, estimator, keep_topk=keep_topk, where=f"{prefix}.{name}")
                importance.record_range = record_range
            st = LinearStats(f"{prefix}.{name}", shared, importance)
            stats[name] = st
            handles.append(lin.register_forward_pre_hook(_make_hook(st, lin, context, update_input=(pos == 0))))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def _make_hook(st: LinearStats, lin: nn.Linear, context: StreamContext, update_input: bool) -> Callable:
    def hook(module, args):
        x = args[0]
        x2 = x.reshape(-1, x.shape[-1])
        if update_input:
            st.input.update(x2, context.modality, context.offset)
        if st.importance is not None:
            if not st.importance.prepared:
                # Read the weight inside the forward: with accelerate offload it is real only now.
                factor = st.importance.estimator.prepare(module.weight.detach().float())
                st.importance.channel_factor = None if factor is None else factor.to(x2.device)
                st.importance.prepared = True
            st.importance.update(x2, context.modality, context.offset)

    return hook
