"""The cells of a ``qe compare`` grid: what one cell is, how cells are quantized and
evaluated on one loaded model (sharing block 0's inputs, and in ``fp-inputs`` mode every
block's statistics), and the row each cell leaves. :mod:`qe.commands.compare` runs a grid
of them serially, :mod:`qe.commands.compare_ray` as Ray tasks; both import this module, so
neither imports the other's runner.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from qe.analysis.statistics import choose_sample_positions
from qe.capture import Block, BlockWalker, StreamContext, attach_stats
from qe.checkpoint import save_module
from qe.composition import Composition, resolve_composition
from qe.data.calibration import encode_samples
from qe.errors import ConfigError, QEError
from qe.models.loading import LoadedModel, Placement
from qe.models.offload import copy_sharing_offload, execution_device, in_memory_copy, offload_to_file, onloaded
from qe.pipeline import PipelineOptions, PipelineResult, QuantizationPipeline
from qe.plugins import default_manager, split_plugin_list
from qe.settings import QuantSetting, parse_setting, parse_settings

DEFAULT_EVAL_TOKENS = 8192  # 16 windows of 512 from the start of the held-out text


EXECUTORS = ("serial", "ray")


@dataclass(frozen=True)
class CompareOptions:
    propagation: str = "quantized"
    eval_tokens: int | None = DEFAULT_EVAL_TOKENS  # None: the whole held-out text
    caption_nll: bool = True
    calib: str | None = None
    samples: int = 32
    estimator: str = "act-weight"
    seed: int = 0
    max_tokens: int = 16384
    device: str = "cpu"
    progress: bool = True
    dtype: str = "float32"
    trust_remote_code: bool = False
    placement: Placement | None = None  # where the model goes; not part of a cell's identity
    # Where the cells run (not part of a cell's key: a grid started serially finishes on Ray).
    executor: str = "serial"  # serial | ray
    cell_cpus: float = 1.0  # ray: CPUs and GPUs each cell's task reserves
    cell_gpus: float = 0.0

    def describe(self) -> dict:
        d = {k: getattr(self, k) for k in ("propagation", "eval_tokens", "caption_nll", "calib", "samples",
                                            "estimator", "seed", "max_tokens")}
        from qe.models.loading import parse_dtype

        dtype = str(parse_dtype(self.dtype)).removeprefix("torch.")
        if dtype != "float32":  # float32 grids keep the keys they had before dtype was recorded
            d["dtype"] = dtype
        return d


@dataclass
class Cell:
    quantizer: str
    compensator: str
    setting: QuantSetting
    composition: Composition
    transform: str = "none"
    key: str = ""
    result: PipelineResult = field(default_factory=PipelineResult)
    blocks: list = field(default_factory=list)  # fp-inputs mode: the cell's quantized blocks
    error: str | None = None

    @property
    def label(self) -> str:
        return self.composition.label


def grid_cells(quantizers: str | list[str], compensators: str | list[str], settings: str | list[QuantSetting],
               estimator: str = "act-weight", manager=None, transforms: str | list[str] = "none") -> list[Cell]:
    """Every setting × transform × quantizer × compensator, validated (no model needed)."""
    manager = manager or default_manager()
    qs = split_plugin_list(quantizers) if isinstance(quantizers, str) else list(quantizers)
    cs = split_plugin_list(compensators) if isinstance(compensators, str) else list(compensators)
    ts = split_plugin_list(transforms) if isinstance(transforms, str) else list(transforms)
    ss = parse_settings(settings) if isinstance(settings, str) else [
        parse_setting(s) if isinstance(s, str) else s for s in settings]
    if not qs or not cs or not ss or not ts:
        raise ConfigError("the grid is empty: give at least one transform, quantizer, compensator and setting")
    cells = []
    for s in ss:
        for t in ts:
            for q in qs:
                for c in cs:
                    cells.append(Cell(q, c, s, resolve_composition(q, c, s, estimator, manager, transform=t), t))
    return cells


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def json_default(o):
    if isinstance(o, float):
        return None
    return str(o)


def _finite(x):
    import math

    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


class Evaluator:
    """Held-out figures of a model: text perplexity (a prefix of the pydoc held-out part) and
    caption NLL on the held-out image-caption pairs."""

    def __init__(self, loaded: LoadedModel, options: CompareOptions):
        from qe.evaluation.perplexity import heldout_windows

        self.options = options
        self.windows = heldout_windows(loaded.tokenizer, max_tokens=options.eval_tokens)
        self.captions = None
        if options.caption_nll and loaded.adapter.image_token_id(loaded.model) is not None:
            from qe.data.images import builtin_image_captions

            self.captions = encode_samples(loaded, builtin_image_captions("eval"))

    def __call__(self, model) -> dict[str, float]:
        from qe.evaluation.metrics import caption_nll
        from qe.evaluation.perplexity import perplexity

        t0 = time.perf_counter()
        ppl = perplexity(model, self.windows, progress=False)
        out = {"ppl": ppl.ppl, "eval_tokens": ppl.tokens}
        if self.captions:
            out["caption_nll"] = caption_nll(model, self.captions).nll
        out["eval_seconds"] = time.perf_counter() - t0
        return out


def _cell_row(cell: Cell, model, evaluation: dict, seconds: float) -> dict:
    from qe.checkpoint import effective_bits, quantized_layers

    layers = quantized_layers(model)
    weights = sum(q.in_features * q.out_features for q in layers.values())
    added = sum(sum(t.numel() for t in q.compensator.state_dict().values()) for q in layers.values()
                if q.compensator is not None)
    comp = cell.composition.compensator.create()
    flops = sum(comp.flops_per_token(q.in_features, q.out_features) for q in layers.values())
    figs = [r.figures for r in cell.result.layers]

    def mean(key):
        vals = [f[key] for f in figs if key in f]
        return sum(vals) / len(vals) if vals else None

    bits = effective_bits(model)
    return {
        "transform": cell.transform, "quantizer": cell.quantizer, "compensator": cell.compensator,
        "setting": cell.setting.short_name, "label": cell.label, "status": "ok", **evaluation,
        "mean_rel_error_base": mean("rel_error_base"), "mean_rel_error": mean("rel_error"),
        "router_agreement": mean("router_agreement"),
        "added_params": added, "added_params_ratio": added / weights if weights else None,
        "added_flops_per_token": flops, "bits_per_weight": bits["bits_per_weight"],
        "bits_per_weight_with_adapters": bits["bits_per_weight_with_adapters"],
        "quantize_seconds": seconds, "fit_seconds": sum(f.get("fit_seconds", 0.0) for f in figs),
        "warnings": cell.result.warnings,
    }


def run_cells(loaded: LoadedModel, cells: list[Cell], encoded, evaluator: Evaluator,
              record: Callable[[Cell, dict], None], manager, options: CompareOptions) -> None:
    """Quantize and evaluate ``cells`` on ``loaded`` (left unchanged), sharing block 0's inputs
    (and in fp-inputs mode every block's statistics); ``record(cell, row)`` receives each cell's
    row, or its error row when it fails."""
    pipeline_opts = PipelineOptions(propagation=options.propagation, max_tokens=options.max_tokens,
                                    device=options.device, seed=options.seed, progress=False)
    t_capture = time.perf_counter()
    inputs = BlockWalker(loaded, encoded, device=options.device, progress=options.progress).inputs()
    shared = {"shared_capture_seconds": time.perf_counter() - t_capture, "cells_in_run": len(cells)}
    if options.propagation == "fp-inputs":
        _run_fp_inputs(loaded, cells, pipeline_opts, inputs, evaluator, record, manager, options, shared)
    else:
        _run_quantized(loaded, cells, pipeline_opts, inputs, evaluator, record, manager, options, shared, encoded)


def failure_row(cell: Cell, exc: BaseException, tb: str | None = None) -> dict:
    """The record of a failed cell: the error's first line and the end of its traceback."""
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return {"quantizer": cell.quantizer, "compensator": cell.compensator, "setting": cell.setting.short_name,
            "label": cell.label, "status": "error", "error": f"{type(exc).__name__}: {message}",
            "traceback": traceback.format_exc(limit=4) if tb is None else tb}


def _run_quantized(loaded, cells, opts, inputs, evaluator, record, manager, options, shared, encoded) -> None:
    bar = tqdm(cells, desc="compare", disable=not options.progress)
    for cell in bar:
        bar.set_postfix_str(cell.label)  # the progress plugin counts this cell's blocks below
        t0 = time.perf_counter()
        try:
            work = loaded.copy()
            pipe = QuantizationPipeline(work, cell.composition, opts, manager)
            # a transform that changes the model (a rotation) captures its own block-0 inputs from `encoded`
            cell.result = pipe.run(encoded, inputs=inputs, result=cell.result)
            seconds = time.perf_counter() - t0
            row = _cell_row(cell, work.model, evaluator(work.model), seconds)
            record(cell, {**row, **shared})
        except (Exception, QEError) as exc:  # a failing cell is recorded; the grid goes on
            record(cell, failure_row(cell, exc))
        finally:
            work = None


def _run_fp_inputs(loaded, cells, opts, inputs, evaluator, record, manager, options, shared) -> None:
    """Block-major: each block's statistics once for every cell. A cell's ``quantize_seconds``
    is its own quantization work; the shared streaming is ``shared_stream_seconds``. On an
    offloaded model each cell's quantized blocks are offloaded too, to files in a temporary
    folder removed at the end."""
    walker = BlockWalker(loaded, device=opts.device, progress=options.progress, inputs=inputs)
    scratch = (tempfile.TemporaryDirectory(prefix="qe-compare-blocks-", dir=loaded.scratch_folder)
               if walker.offloaded() else contextlib.nullcontext())
    with scratch as spill:
        _fp_inputs_grid(loaded, walker, cells, opts, inputs, evaluator, record, manager, options, shared,
                        Path(spill) if spill is not None else None)


def _fp_inputs_grid(loaded, walker, cells, opts, inputs, evaluator, record, manager, options, shared,
                    spill: Path | None) -> None:
    adapter, model = loaded.adapter, loaded.model
    live: list[tuple[Cell, QuantizationPipeline]] = []
    shared_cache: dict = {}
    for cell in cells:
        try:
            pipe = QuantizationPipeline(loaded, cell.composition, opts, manager)
            pipe.base_cache = shared_cache
            cell.result.warnings.extend(pipe.warnings)
            live.append((cell, pipe))
        except (Exception, QEError) as exc:
            record(cell, failure_row(cell, exc))
    ks = {pipe.importance_k(walker.block(0)) for _, pipe in live} - {None}
    if len(ks) > 1:
        raise ConfigError(f"fp-inputs compare streams one importance top-k for the whole grid, and these cells ask "
                          f"for k in {sorted(ks)}: run them as separate grids")
    k = next(iter(ks), None)
    need_hessian = any(pipe.needs_hessian for _, pipe in live)
    estimator = live[0][1].estimator if live else None
    positions = choose_sample_positions(inputs.total_tokens, opts.max_tokens, opts.seed)
    seconds = {c.key: 0.0 for c, _ in live}
    number = {c.key: i for i, c in enumerate(cells)}  # names the cell's block files
    context = StreamContext()
    stream_seconds = 0.0
    for step in walker.walk(desc="compare (fp-inputs)"):
        block = step.block
        t_stream = time.perf_counter()
        with attach_stats(block.module, adapter, prefix=block.prefix, context=context, sample_positions=positions,
                          hessian=need_hessian, moments=False, estimator=estimator if k else None, k=k or 32) as stats:
            step.next_hidden = step.run(context)
        stream_seconds += time.perf_counter() - t_stream
        device = execution_device(block.module) or torch.device(opts.device)  # where an offloaded block runs
        with onloaded(block.module, opts.device):  # an offloaded block: its copies hold real weights
            for cell, pipe in live:
                if cell.error:
                    continue
                t0 = time.perf_counter()
                try:
                    qblock = in_memory_copy(block.module, opts.device)
                    pipe.quantize_block_with_stats(Block(block.index, qblock, block.prefix), stats, cell.result)
                    if spill is not None:  # every cell's quantized blocks in memory would be the model several times over
                        path = spill / f"cell-{number[cell.key]}-block-{block.index:05d}.safetensors"
                        save_module(qblock, path)
                        offload_to_file(qblock, path, device)
                    cell.blocks.append(qblock)
                except (Exception, QEError) as exc:
                    cell.error = "failed"
                    record(cell, failure_row(cell, exc))
                    cell.blocks = []
                seconds[cell.key] += time.perf_counter() - t0
        shared_cache.clear()  # keys are per layer: nothing is reused across blocks
        del stats
    for cell, _ in tqdm(live, desc="evaluate", disable=not options.progress):
        if cell.error:
            continue
        try:
            work = copy_sharing_offload(model)
            target = work.get_submodule(walker.prefix)
            for i, qblock in enumerate(cell.blocks):
                target[i] = qblock
            cell.blocks = []
            row = _cell_row(cell, work, evaluator(work), seconds[cell.key])
            record(cell, {**row, **shared, "shared_stream_seconds": stream_seconds})
        except (Exception, QEError) as exc:
            record(cell, failure_row(cell, exc))
