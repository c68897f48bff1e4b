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

from qe.activations import ActivationStore
from qe.analysis.statistics import ImportanceStats, InputStats, LinearStats
from qe.errors import ModelError, NumericalError
from qe.memory import release_freed_memory
from qe.models.base import EncodedSample, ModelAdapter
from qe.models.loading import LoadedModel
from qe.models.moe import ExpertMLP, routed_owner


class _StopForward(Exception):
    pass


@dataclass
class CapturedBatch:
    """One batch of block inputs: ``hidden`` ``(B, T, d)`` plus the block's keyword arguments."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]
    modality: torch.Tensor  # (B*T,) int8
    offset: int  # global position of this batch's first token
    # What the model adds between decoder blocks (Qwen3-VL's deepstack features), as the
    # model adapter keeps it from the language model's call (ModelAdapter.between_blocks_inputs).
    between: dict[str, Any] = field(default_factory=dict)
    # Each block's own keyword arguments where they differ by block (Gemma 3's sliding-window
    # and global layers); None when every block gets ``kwargs``.
    block_kwargs: list[dict[str, Any]] | None = None

    def kwargs_for(self, block_index: int) -> dict[str, Any]:
        return self.kwargs if self.block_kwargs is None else self.block_kwargs[block_index]

    @property
    def num_tokens(self) -> int:
        return int(self.modality.numel())


@dataclass
class BlockInputs:
    batches: list[CapturedBatch] = field(default_factory=list)
    # Where the hidden states are kept (and every block's outputs after them); None: as computed.
    store: ActivationStore | None = None

    @property
    def total_tokens(self) -> int:
        return sum(b.num_tokens for b in self.batches)

    def with_hidden(self, hidden: list[torch.Tensor]) -> BlockInputs:
        """The same batches with new hidden states (the next block's inputs)."""
        return BlockInputs([CapturedBatch(self.keep(h), b.kwargs, b.modality, b.offset, b.between, b.block_kwargs)
                            for h, b in zip(hidden, self.batches)], self.store)

    def keep(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` where this set's activations are stored."""
        return hidden if self.store is None else self.store.keep(hidden)


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


def _to(value: Any, device, memo: dict[int, torch.Tensor] | None = None) -> Any:
    """``value`` with every tensor moved to ``device``; with ``memo``, a tensor shared by several
    values (one attention mask for many blocks) is moved once and stays shared."""
    if isinstance(value, torch.Tensor):
        if memo is None:
            return value.to(device)
        if id(value) not in memo:
            memo[id(value)] = value.to(device)
        return memo[id(value)]
    if isinstance(value, tuple):
        return tuple(_to(v, device, memo) for v in value)
    if isinstance(value, list):
        return [_to(v, device, memo) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device, memo) for k, v in value.items()}
    return value


@torch.no_grad()
def capture_block_inputs(
    loaded: LoadedModel,
    encoded: list[EncodedSample],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    storage_device: str | torch.device | None = None,
    store: ActivationStore | None = None,
    progress: bool = True,
) -> BlockInputs:
    """Run the samples up to the first decoder block and record that block's inputs.

    Where the model passes each block its own keyword arguments
    (``ModelAdapter.kwargs_differ_by_block``), the forward runs up to the last block instead
    and every block's arguments are kept (tensors shared between blocks stored once).

    ``storage_device`` keeps the captured activations elsewhere (e.g. CPU while blocks run on
    an accelerator); by default they stay on ``device``. A ``store`` on the host keeps them in
    host memory (up to its limit, in files past it), and so every block's outputs computed
    from them.
    """
    storage = storage_device or device
    issue = loaded.adapter.blockwise_issue(loaded.model)
    if issue:
        raise ModelError(issue)
    adapter = loaded.adapter
    blocks = adapter.decoder_blocks(loaded.model)
    captured: dict[str, Any] = {}

    def grab_between(module, args, kwargs):
        captured["between"] = adapter.between_blocks_inputs(kwargs)

    per_block = adapter.kwargs_differ_by_block
    last = len(blocks) - 1 if per_block else 0  # the forward stops before this block runs

    def grabber(index: int):
        def grab(module, args, kwargs):
            if captured.get("stopped"):  # the block run again after the capture (a dry run): let it
                return None
            hidden = args[0] if args else kwargs.pop("hidden_states")
            kwargs = {**_positional_as_keywords(module, args[1:]), **kwargs}
            kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "cache", "use_cache")}
            if index == 0:
                captured["hidden"], captured["block_kwargs"] = hidden, []
            captured["block_kwargs"].append(kw)
            if index == last:
                captured["stopped"] = True
                raise _StopForward

        return grab

    handles = [b.register_forward_pre_hook(grabber(i), with_kwargs=True) for i, b in enumerate(blocks[: last + 1])]
    handles.append(adapter.language_model(loaded.model).register_forward_pre_hook(grab_between, with_kwargs=True))
    out = BlockInputs(store=store)
    offset = 0
    try:
        for group in tqdm(_batches(encoded, batch_size), desc="capture", disable=not progress, leave=False):
            inputs = _collate(group, device)
            captured["stopped"] = False
            try:
                loaded.model(**inputs, use_cache=False)
            except _StopForward:
                pass
            else:  # pragma: no cover - the hook always fires
                raise RuntimeError("the first decoder block was never called")
            hidden = captured["hidden"].detach()
            modality = adapter.capture_modality(torch.cat([g.modality for g in group]), hidden,
                                                captured["block_kwargs"][0])
            if not torch.isfinite(hidden).all():
                raise NumericalError("NaN or Inf in the inputs of decoder block 0: check the model's dtype and the data")
            memo: dict[int, torch.Tensor] = {}
            kwargs = _to(captured["block_kwargs"], storage, memo)
            out.batches.append(CapturedBatch(out.keep(hidden.to(storage)), kwargs[0], modality, offset,
                                             _to(captured.get("between") or {}, storage),
                                             kwargs if per_block else None))
            offset += modality.numel()
    finally:
        for handle in handles:
            handle.remove()
    return out


def _positional_as_keywords(module: nn.Module, args: tuple) -> dict[str, Any]:
    """A block's positional arguments after the hidden states, by parameter name (vision
    encoders pass their attention mask positionally), so a captured call can be replayed."""
    if not args:
        return {}
    import inspect

    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]
    if len(params) < len(args):
        raise ModelError(f"{type(module).__name__} is called with {len(args) + 1} positional arguments, more than "
                         "its forward names: the block walker cannot replay it")
    return {p.name: a for p, a in zip(params, args)}


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
            outputs.extend(inputs.keep(y) for y in _run_batch(block, b, device, context, keep_outputs, block_index))
    return outputs


def _run_batch(block, b: CapturedBatch, device, context, keep_outputs: bool, block_index: int) -> list[torch.Tensor]:
    if context is not None:
        context.modality, context.offset = b.modality, b.offset
    y = block_output(block(b.hidden.to(device), **_to(b.kwargs_for(block_index), device, {})))
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
                # A routed expert's rows are not the batch's: no per-token score record (plots).
                importance.record_range = record_range if routed_owner(block, name) is None else None
            st = LinearStats(f"{prefix}.{name}", shared, importance)
            stats[name] = st
            handles.append(lin.register_forward_pre_hook(_make_hook(st, lin, context, update_input=(pos == 0),
                                                                    expert=routed_owner(block, name))))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def _make_hook(st: LinearStats, lin: nn.Linear, context: StreamContext, update_input: bool,
               expert: ExpertMLP | None = None) -> Callable:
    def hook(module, args):
        x = args[0]
        x2 = x.reshape(-1, x.shape[-1])
        modality, rows = context.modality, None
        if expert is not None:  # a routed expert reads only its tokens: these rows of the batch
            rows = expert.routed
            modality = modality[rows.to(modality.device)] if rows is not None else modality
        if update_input:
            st.input.update(x2, modality, context.offset, rows=rows)
        if st.importance is not None:
            if not st.importance.prepared:
                # Read the weight inside the forward: with accelerate offload it is real only now.
                factor = st.importance.estimator.prepare(module.weight.detach().float())
                st.importance.channel_factor = None if factor is None else factor.to(x2.device)
                st.importance.prepared = True
            st.importance.update(x2, modality, context.offset)

    return hook


# --------------------------------------------------------------------------- the block walker


@dataclass(frozen=True)
class Block:
    """One decoder block: its index, module and full name prefix (``model.….layers.3``)."""

    index: int
    module: nn.Module
    prefix: str


class BlockStep:
    """The walker's current block and its inputs.

    The caller may run the block any number of times (:meth:`run`, with statistics hooks
    attached by :func:`attach_stats` around it) and sets :attr:`next_hidden` to the hidden
    states the next block receives; left unset, the walker runs the block as it then is.
    """

    def __init__(self, block: Block, inputs: BlockInputs, device: str | torch.device):
        self.block, self.inputs, self.device = block, inputs, device
        self.next_hidden: list[torch.Tensor] | None = None

    @property
    def index(self) -> int:
        return self.block.index

    def run(self, context: StreamContext | None = None) -> list[torch.Tensor]:
        """The block's outputs on every captured batch (offloaded weights onloaded once)."""
        return run_block(self.block.module, self.inputs, device=self.device, context=context,
                         block_index=self.block.index)


class BlockWalker:
    """Walks a model's decoder blocks in order over calibration inputs captured at block 0.

    The only place outside the model adapters that knows what a decoder block is: ``qe
    quantize``, ``qe analyze`` and ``qe compare`` all walk through it. Both propagation modes
    are the caller's choice of :attr:`BlockStep.next_hidden` (the quantized block's outputs, or
    the full-precision ones); offloaded blocks are onloaded one at a time by :func:`run_block`.
    """

    def __init__(self, loaded: LoadedModel, encoded: list[EncodedSample] | None = None, *,
                 device: str | torch.device = "cpu", batch_size: int = 8, progress: bool = True,
                 inputs: BlockInputs | None = None):
        self.loaded, self.encoded = loaded, encoded
        self.device, self.batch_size, self.progress = device, batch_size, progress
        adapter, model = loaded.adapter, loaded.model
        self.modules = adapter.decoder_blocks(model)
        self.prefix = adapter.blocks_prefix(model)
        self._inputs = inputs

    @property
    def num_blocks(self) -> int:
        return len(self.modules)

    def block(self, index: int) -> Block:
        return Block(index, self.modules[index], self.loaded.adapter.block_prefix(self.loaded.model, index))

    def blocks(self) -> list[Block]:
        return [self.block(i) for i in range(self.num_blocks)]

    def linears(self, block: Block) -> dict[str, nn.Module]:
        """The block's linears by name relative to the block."""
        return self.loaded.adapter.block_linears(block.module)

    def offloaded(self) -> bool:
        from qe.models.offload import is_offloaded

        return any(is_offloaded(b) for b in self.modules)

    def inputs(self) -> BlockInputs:
        """Block 0's inputs, captured on first use."""
        if self._inputs is None:
            if self.encoded is None:
                raise ModelError("the block walker has no calibration samples to capture")
            self._inputs = capture_block_inputs(self.loaded, self.encoded, device=self.device,
                                                batch_size=self.batch_size, store=self.loaded.activations,
                                                progress=self.progress)
        return self._inputs

    def walk(self, start: int = 0, stop: int | None = None, *, desc: str | None = None,
             replay_from: int = 0) -> Iterator[BlockStep]:
        """Yield a step per block from ``start`` to ``stop`` (exclusive). Blocks from
        ``replay_from`` to ``start`` run first, as they are, to produce ``start``'s inputs
        (a resumed run replays its finished, already quantized blocks)."""
        stop = self.num_blocks if stop is None else stop
        inputs = self.inputs()
        for i in range(replay_from, start):
            inputs = self.next_inputs(i, inputs, BlockStep(self.block(i), inputs, self.device).run())
        indices = range(start, stop)
        for i in tqdm(indices, desc=desc, disable=not (self.progress and desc)):
            step = BlockStep(self.block(i), inputs, self.device)
            yield step
            hidden = step.next_hidden if step.next_hidden is not None else step.run()
            inputs = self.next_inputs(i, inputs, hidden)
            release_freed_memory()  # what a step holds must not depend on the steps before it

    def next_inputs(self, index: int, inputs: BlockInputs, hidden: list[torch.Tensor]) -> BlockInputs:
        """Block ``index + 1``'s inputs from block ``index``'s outputs, with whatever the model
        adds between the two (the adapter's :meth:`~qe.models.base.ModelAdapter.after_block`)."""
        after = self.loaded.adapter.after_block
        return inputs.with_hidden([after(index, h, b.between) for h, b in zip(hidden, inputs.batches)])
