"""The quantization pipeline: one composition applied block by block.

Per decoder block:

1. stream the statistics of its linears over the block's calibration inputs (full-precision
   block): Hessian ``XᵀX`` where a plugin needs it, per-token top-k importance where the
   compensator needs it, and a bounded token sample;
2. per smoothing group: the compensator's plan (exempt columns), the transform's scales (the
   composition's transform, or the α search among the compensator's candidates), then per
   linear: quantize, fit the compensator, replace the ``nn.Linear`` by a
   :class:`~qe.quantizers.qlinear.QuantLinear`, record the layer's figures;
3. produce the next block's inputs: by running the quantized block (``quantized``
   propagation, as deployed) or from the full-precision pass (``fp-inputs``).

Blocks are visited by the one :class:`~qe.capture.BlockWalker`. Event hooks (``qe_block_start`` …) are called on the plugin manager so progress and report
plugins can watch without touching this code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import re
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from qe.analysis.statistics import LinearStats, choose_sample_positions
from qe.capture import Block, BlockInputs, BlockStep, BlockWalker, StreamContext, attach_stats
from qe.checkpoint import save_module
from qe.compensators.base import Compensator, CompensatorModule, LayerContext, LayerPlan
from qe.composition import Composition
from qe.errors import ConfigError, NumericalError
from qe.memory import release_freed_memory
from qe.modality import MODALITIES, Modality
from qe.models.base import EncodedSample
from qe.models.loading import LoadedModel
from qe.models.moe import routed_owner
from qe.models.offload import execution_device, is_offloaded, offload_to_file, onloaded
from qe.plugins import QEPluginManager, default_manager
from qe.quantized import fake_quantize_activations
from qe.quantizers import kv_cache
from qe.quantizers.base import Quantizer
from qe.quantizers.qlinear import QuantLinear
from qe.transforms import smoothing
from qe.transforms.base import GroupContext, ModelContext, Transform
from qe.transforms.builtin import AlphaSearch, AlphaSearchConfig
from qe.transforms.rotation import online_rotation

Propagation = Literal["quantized", "fp-inputs"]
# The fewest calibration tokens a routed expert is calibrated from by default (below, a
# Hessian or a low-rank fit on its tokens says more about them than about the expert).
MIN_EXPERT_TOKENS = 32


@dataclass
class PipelineOptions:
    propagation: Propagation = "quantized"
    max_tokens: int = 16384  # bounded token sample per linear (fitting steps)
    figure_tokens: int = 4096  # the first (random) tokens of that sample, for the per-layer error figures
    alpha_tokens: int = 4096  # the first tokens of that sample, to choose a group's smoothing α
    batch_size: int = 8
    device: str = "cpu"
    seed: int = 0
    progress: bool = True
    skip: tuple[str, ...] = ()  # fnmatch patterns of full linear names left in full precision
    overrides: tuple = ()  # qe.recipe.LayerOverride: per-layer quantizer / compensator, first match wins
    # A routed expert that receives fewer calibration tokens than this is quantized data-free
    # (RTN, uncompensated); None: 32, or its compensator's tokens_wanted() where that is more.
    min_expert_tokens: int | None = None

    def __post_init__(self):
        if self.propagation not in ("quantized", "fp-inputs"):
            raise ConfigError(f"propagation {self.propagation!r} unknown: use quantized or fp-inputs")
        if self.max_tokens < 1:
            raise ConfigError("max_tokens must be at least 1")


@dataclass
class LayerRecord:
    name: str
    block: int
    shape: tuple[int, int]
    figures: dict[str, float] = field(default_factory=dict)
    alpha: float | None = None
    smoothing: str = "none"  # none | folded | explicit


@dataclass
class PipelineResult:
    layers: list[LayerRecord] = field(default_factory=list)
    blocks: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    """A pattern matches as a shell glob (``*.mlp.*``) or as a regular expression."""
    for p in patterns:
        if fnmatch.fnmatchcase(name, p):
            return True
        try:
            if re.search(p, name):
                return True
        except re.error:
            pass
    return False


class QuantizationPipeline:
    def __init__(
        self,
        loaded: LoadedModel,
        composition: Composition,
        options: PipelineOptions | None = None,
        manager: QEPluginManager | None = None,
    ):
        self.loaded = loaded
        self.composition = composition
        self.options = options or PipelineOptions()
        self.manager = manager or default_manager()
        self.estimator = composition.estimator.create()
        self.quantizer = composition.quantizer.create()
        self.transform: Transform = composition.transform.create()
        self.compensator = composition.compensator.create()
        self.setting = composition.setting
        # Per-layer overrides: (pattern, quantizer or None, compensator or None), first match wins.
        self._overrides = [
            (o.pattern,
             self.manager.create("quantizer", o.quantizer) if o.quantizer else None,
             self.manager.create("compensator", o.compensator) if o.compensator else None)
            for o in self.options.overrides
        ]
        self._alpha_searches: dict[tuple, Transform] = {}
        self.walker = BlockWalker(loaded, device=self.options.device, batch_size=self.options.batch_size,
                                  progress=self.options.progress)
        self.warnings: list[str] = []
        self.starved: dict[str, tuple[int, int]] = {}  # routed expert -> (tokens it received, tokens wanted)
        # Optional cache of base quantizations shared between pipelines on the same statistics
        # (qe compare, fp-inputs): key (quantizer, setting, layer, smoothing, exemption).
        self.base_cache: dict | None = None
        self._spill: Path | None = None
        self._prepared = False
        self._validate_layers()
        # The KV cache is the language model's: a vision stack's pipeline leaves attention alone.
        self.quantizes_kv_cache = self.setting.quantizes_kv_cache and loaded.adapter.stack == "language"
        if self.quantizes_kv_cache:
            attentions = [self._kv_attention(b) for b in self.walker.blocks()]  # refused now, not after hours
            # Transparent until a block is marked (quantize_kv_cache), so copies of the model
            # made from here on (qe compare's cells) inherit it.
            kv_cache.enable(loaded.adapter.language_model(loaded.model), attentions[0])

    def _kv_attention(self, block: Block) -> nn.Module:
        return self.loaded.adapter.block_attention(block.module, block.prefix)

    def quantize_kv_cache(self, block: Block) -> None:
        """From now on, the block's attention quantizes the keys and values it caches (a setting
        with ``KV<bits>``; :mod:`qe.quantizers.kv_cache`)."""
        if self.quantizes_kv_cache:
            kv_cache.mark_attention(self._kv_attention(block), self.setting.kv_bits)

    def restored(self, done: int) -> None:
        """Blocks ``0 .. done - 1`` were quantized by an earlier run and restored into the model
        (``qe quantize --resume``): what the pipeline sets beside their tensors, set again."""
        for block in self.walker.blocks()[:done]:
            self.quantize_kv_cache(block)

    def plugins_for(self, full_name: str) -> tuple[Quantizer, Compensator]:
        """The (quantizer, compensator) serving one linear."""
        for pattern, quantizer, compensator in self._overrides:
            if _matches(full_name, (pattern,)):
                return quantizer or self.quantizer, compensator or self.compensator
        return self.quantizer, self.compensator

    def transform_for(self, compensator: Compensator) -> Transform:
        """The transform of a smoothing group: the composition's; where that is ``none`` and
        the group's compensator asks for smoothing α candidates, the α search among them (a
        composition never smooths twice: on a smoothing transform, its scales are used)."""
        candidates = compensator.smoothing_candidates()
        if self.transform.smooths() or not candidates:
            return self.transform
        key = tuple(candidates)
        if key not in self._alpha_searches:
            self._alpha_searches[key] = AlphaSearch(AlphaSearchConfig(candidates=key))
        return self._alpha_searches[key]

    def _all_compensators(self) -> list[Compensator]:
        return [self.compensator] + [c for _, _, c in self._overrides if c is not None]

    def _all_quantizers(self) -> list[Quantizer]:
        return [self.quantizer] + [q for _, q, _ in self._overrides if q is not None]

    # ------------------------------------------------------------------ checks
    def _validate_layers(self) -> None:
        for block in self.walker.blocks():
            if any(isinstance(m, QuantLinear) for m in block.module.modules()):
                continue  # quantized by an earlier run (resume)
            for name, lin in self.walker.linears(block).items():
                full = f"{block.prefix}.{name}"
                if _matches(full, self.options.skip):
                    continue
                _, compensator = self.plugins_for(full)
                if compensator is self.compensator:
                    compensator.validate_layer(full, lin.in_features, lin.out_features)
                else:
                    compensator.validate_override(full, lin.in_features, lin.out_features)
                gs = self.setting.group_size
                if gs > lin.in_features:
                    raise ConfigError(
                        f"group size {gs} exceeds the input width {lin.in_features} of {full}: use at most "
                        f"{lin.in_features} (e.g. --group-size {lin.in_features}, or 0 for per channel)"
                    )
        capped: dict[str, tuple[int, int]] = {}
        for c in self._all_compensators():
            capped.update(c.capped_layers)
        if capped:
            shown = ", ".join(f"{n.split('.', 3)[-1]} ({r}→{u})" for n, (r, u) in list(capped.items())[:6])
            more = f" and {len(capped) - 6} more" if len(capped) > 6 else ""
            self.warnings.append(f"rank capped at min(d_in, d_out) for {len(capped)} layers: {shown}{more}")

    @property
    def needs_calibration(self) -> bool:
        """Whether any plugin reads calibration statistics. Without it (RTN, no transform, no
        compensator) the weights are quantized directly, without data and without figures."""
        return (self.transform.needs_calibration()
                or any(q.needs_calibration() for q in self._all_quantizers())
                or any(c.needs_calibration() for c in self._all_compensators()))

    @property
    def needs_hessian(self) -> bool:
        plugins: list[Quantizer | Compensator | Transform] = [*self._all_quantizers(), *self._all_compensators()]
        return self.transform.needs_hessian or any(p.needs_hessian for p in plugins)

    # ------------------------------------------------------------------ run
    def prepare_model(self) -> bool:
        """The transform's model-level step (once; a rotation, say), before any calibration
        input is captured. Returns whether it changed the model now. ``qe quantize --resume``
        calls it before restoring finished blocks, so they are restored into the changed model."""
        if self._prepared or not self.transform.changes_model():
            return False
        linears = {f"{b.prefix}.{n}": b.module.get_submodule(n) for b in self.walker.blocks()
                   if not any(isinstance(m, QuantLinear) for m in b.module.modules())
                   for n in self.linear_names(b)}
        warnings = self.transform.prepare_model(ModelContext(self.loaded.model, self.loaded.adapter, linears,
                                                             self.setting, self.options.seed))
        self.warnings.extend(w for w in warnings if w not in self.warnings)
        self._prepared = True
        return True

    def run(
        self,
        encoded: list[EncodedSample],
        *,
        start_block: int = 0,
        on_block_done: Callable[[int, PipelineResult], None] | None = None,
        result: PipelineResult | None = None,
        inputs: BlockInputs | None = None,
        block_file: Callable[[int], Path] | None = None,
    ) -> PipelineResult:
        """Quantize every decoder block from ``start_block`` on (earlier ones must already be
        quantized in the model, and :meth:`restored` told: that is how ``--resume`` continues,
        passing the earlier ``result`` to extend). ``on_block_done`` runs after each block, before the
        ``qe_block_end`` event (a checkpointing caller saves there). ``inputs`` are block 0's
        captured inputs when the caller already has them (``qe compare`` shares them); a
        transform that changes the model makes them stale, and they are captured again from
        ``encoded``.

        A block that accelerate offloaded (CPU or disk offload) is onloaded for its own step
        only; once quantized it is offloaded again to the safetensors file of its state dict:
        ``block_file(i)`` when the caller's ``on_block_done`` writes one there, otherwise a file
        the pipeline writes in a temporary folder. The model then never holds more than one
        block's weights beside the offloaded ones."""
        opts = self.options
        hook = self.manager.hook
        if self.prepare_model() and inputs is not None:
            if not encoded:
                raise ConfigError(f"transform {self.transform.name!r} changes the model, so block 0's inputs must be "
                                  "captured again: pass the calibration samples")
            inputs = None
        result = result if result is not None else PipelineResult()
        result.warnings.extend(w for w in self.warnings if w not in result.warnings)
        t_start = time.perf_counter()
        num_blocks = self.walker.num_blocks
        if not self.needs_calibration:
            return self._run_data_free(start_block, on_block_done, result, t_start, block_file)
        if start_block and opts.propagation != "quantized":
            raise ConfigError("resume is supported in quantized propagation only")
        walker = BlockWalker(self.loaded, encoded, device=opts.device, batch_size=opts.batch_size,
                             progress=opts.progress, inputs=inputs)
        total_tokens = walker.inputs().total_tokens
        self._warn_few_tokens(total_tokens, result)
        sample_positions = choose_sample_positions(total_tokens, opts.max_tokens, opts.seed)
        # Blocks finished by an earlier run are replayed, quantized, to give start_block's inputs.
        for step in walker.walk(start_block, desc=f"quantize {self.composition.label}"):
            hook.qe_block_start(block_index=step.index, num_blocks=num_blocks)
            with self._block_onloaded(step.block, on_block_done, block_file):
                block_figures = self._quantize_block(step, sample_positions, result)
                result.blocks.append(block_figures)
                if on_block_done is not None:
                    on_block_done(step.index, result)
            hook.qe_block_end(block_index=step.index, num_blocks=num_blocks, figures=block_figures)
        self._warn_starved(result)
        result.seconds += time.perf_counter() - t_start
        return result

    def min_tokens(self, full: str) -> int:
        """The fewest calibration tokens a routed expert's linear is compensated from."""
        if self.options.min_expert_tokens is not None:
            return self.options.min_expert_tokens
        return max(MIN_EXPERT_TOKENS, self.plugins_for(full)[1].tokens_wanted() or 0)

    def _warn_starved(self, result: PipelineResult) -> None:
        if not self.starved:
            return
        shown = ", ".join(f"{n} ({t} of {w} tokens)" for n, (t, w) in list(self.starved.items())[:8])
        more = f" and {len(self.starved) - 8} more" if len(self.starved) > 8 else ""
        result.warnings.append(
            f"{len(self.starved)} routed expert(s) received too few calibration tokens and were quantized "
            f"data-free (RTN, no compensation): {shown}{more}; pass more --samples to calibrate them")

    def _warn_few_tokens(self, total_tokens: int, result: PipelineResult) -> None:
        for c in self._all_compensators():
            wanted = c.tokens_wanted()
            if wanted and min(total_tokens, self.options.max_tokens) < wanted:
                message = (f"{c.name} fits from {total_tokens} calibration tokens and wants at least {wanted}: "
                           "pass more --samples (its per-layer figures on calibration tokens will look better than "
                           "held-out text)")
                if message not in result.warnings:
                    result.warnings.append(message)

    def _run_data_free(self, start_block, on_block_done, result, t_start, block_file=None) -> PipelineResult:
        """Quantize weights directly: nothing in the composition reads calibration data."""
        hook = self.manager.hook
        num_blocks = self.walker.num_blocks
        for block in tqdm(self.walker.blocks()[start_block:], desc=f"quantize {self.composition.label}",
                          disable=not self.options.progress):
            i = block.index
            hook.qe_block_start(block_index=i, num_blocks=num_blocks)
            with self._block_onloaded(block, on_block_done, block_file):
                for n in sorted(self.linear_names(block)):
                    self._quantize_data_free(block, n, result)
                self.quantize_kv_cache(block)
                result.blocks.append({})
                if on_block_done is not None:
                    on_block_done(i, result)
            hook.qe_block_end(block_index=i, num_blocks=num_blocks, figures={})
        result.seconds += time.perf_counter() - t_start
        return result

    def _quantize_data_free(self, block: Block, n: str, result: PipelineResult, tokens: int | None = None) -> None:
        """Quantize one linear from its weight alone: its own quantizer where that reads no
        data, else RTN; no smoothing, no compensation."""
        hook = self.manager.hook
        i, full = block.index, f"{block.prefix}.{n}"
        hook.qe_layer_start(block_index=i, layer_name=full)
        lin = block.module.get_submodule(n)
        w = _float_weight(lin, full)
        quantizer, _ = self.plugins_for(full)
        if quantizer.needs_calibration():
            quantizer = self.manager.create("quantizer", "rtn")
        t0 = time.perf_counter()
        q = quantizer.quantize(w, self.setting, layer_name=full)
        ql = QuantLinear.from_quantized(q, a_bits=self.setting.a_bits,
                                        bias=lin.bias.detach().float() if lin.bias is not None else None,
                                        input_rotation=online_rotation(lin))
        block.module.set_submodule(n, ql.to(lin.weight.device))
        figures = {"quantize_seconds": time.perf_counter() - t0}
        if tokens is not None:
            figures["tokens"] = float(tokens)
        result.layers.append(LayerRecord(full, i, (lin.out_features, lin.in_features), figures))
        hook.qe_layer_end(block_index=i, layer_name=full, figures=figures)

    @contextlib.contextmanager
    def _block_onloaded(self, block: Block, on_block_done, block_file) -> Iterator[None]:
        """An offloaded block real for the length of its step, then offloaded again to the file
        of its quantized state dict (see :meth:`run`); a plain block is left alone."""
        if not is_offloaded(block.module):
            yield
            return
        device = execution_device(block.module) or torch.device(self.options.device)
        with onloaded(block.module, self.options.device):
            yield
            if on_block_done is not None and block_file is not None:
                path = block_file(block.index)
            else:
                path = self._spill_folder() / f"block-{block.index:05d}.safetensors"
                save_module(block.module, path)
        offload_to_file(block.module, path, device)

    def _spill_folder(self) -> Path:
        """Where quantized offloaded blocks go when the caller writes no block files; removed
        with the model."""
        if self._spill is None:
            folder = Path(tempfile.mkdtemp(prefix="qe-offloaded-blocks-", dir=self.loaded.scratch_folder))
            weakref.finalize(self.loaded.model, shutil.rmtree, folder, True)
            self._spill = folder
        return self._spill

    def linear_names(self, block: Block) -> set[str]:
        """The block's linears this pipeline quantizes (all but the skipped ones)."""
        return {n for n in self.walker.linears(block) if not _matches(f"{block.prefix}.{n}", self.options.skip)}

    def importance_k(self, block: Block) -> int | None:
        ks = [self.plugins_for(f"{block.prefix}.{n}")[1].importance_k() for n in self.linear_names(block)]
        return max((x for x in ks if x), default=None)

    def _quantize_block(self, step: BlockStep, sample_positions, result: PipelineResult) -> dict[str, float]:
        context = StreamContext()
        block = step.block
        names = self.linear_names(block)
        k = self.importance_k(block)
        with attach_stats(block.module, self.loaded.adapter, prefix=block.prefix, context=context,
                          sample_positions=sample_positions, hessian=self.needs_hessian, moments=False,
                          estimator=self.estimator if k else None, k=k or 32, linears=names) as stats:
            fp_out = step.run(context)
        self.quantize_block_with_stats(block, stats, result, names, owned=True)
        del stats
        q_out = step.run()
        # That forward is the block's only one here; the dequantized weights it kept would hold
        # a float copy of every quantized block in memory by the end of the run.
        for module in block.module.modules():
            if isinstance(module, QuantLinear):
                module.forget_dequantized()
        # The block's own error: quantized vs full-precision block on the same inputs.
        step.next_hidden = q_out if self.options.propagation == "quantized" else fp_out
        return {"block_rel_error": _mean_rel_error(fp_out, q_out)}

    def quantize_block_with_stats(self, block: Block, stats: dict[str, LinearStats], result: PipelineResult,
                                  names: set[str] | None = None, *, owned: bool = False) -> None:
        """Quantize (and compensate) a block's linears from already-streamed statistics.

        The statistics are only read, so several pipelines can share them (``qe compare`` in
        fp-inputs mode streams each block once for the whole grid); ``owned`` statistics are
        this call's alone, and a smoothed group's Hessian is smoothed in its own memory (one
        ``d × d`` float64 matrix fewer: 0.5 GB at a width of 8,192)."""
        names = self.linear_names(block) if names is None else names
        for group in self.loaded.adapter.smoothing_groups(block.module):
            members = [n for n in group.linears if n in names]
            if members:
                self._quantize_group(block, group, members, stats, result, owned)
        self.quantize_kv_cache(block)

    def _quantize_group(self, block: Block, group, names, stats: dict[str, LinearStats], result: PipelineResult,
                        owned: bool = False):
        """plan → transform → quantize → fit, for the linears of one smoothing group (``owned``:
        see :meth:`quantize_block_with_stats`)."""
        hook = self.manager.hook
        index, module = block.index, block.module
        # Routed experts: each is calibrated on the tokens routed to it; too few, and it is
        # quantized from its weights alone (and named in one warning).
        routed = {n: stats[n].input.n_tokens for n in names if routed_owner(module, n) is not None}
        wanted = {n: self.min_tokens(f"{block.prefix}.{n}") for n in routed}
        starved = [n for n, t in routed.items() if t < wanted[n]]
        for n in starved:
            self.starved.setdefault(f"{block.prefix}.{n.rsplit('.', 1)[0]}", (routed[n], wanted[n]))
            self._quantize_data_free(block, n, result, tokens=routed[n])
        names = [n for n in names if n not in starved]
        if not names:
            return
        full = {n: f"{block.prefix}.{n}" for n in names}
        _, group_compensator = self.plugins_for(full[names[0]])
        linears = {n: module.get_submodule(n) for n in names}
        shared = stats[names[0]].input
        tokens = shared.sample
        token_modality = shared.sample_modality
        weights = {n: _float_weight(linears[n], full[n]) for n in names}
        plans: dict[str, LayerPlan] = {}
        for n in names:
            ctx = self._context(index, full[n], linears[n], weights[n], stats[n], None, tokens, token_modality)
            plans[n] = self.plugins_for(full[n])[1].plan(ctx)

        # One transform per group, chosen by the compensator of its first linear.
        scales = self.transform_for(group_compensator).group_scales(GroupContext(
            names=[full[n] for n in names], weights=[weights[n] for n in names], tokens=tokens,
            token_modality=token_modality, act_absmax=shared.absmax, hessian=shared.xtx, setting=self.setting,
            exempt=[plans[n].exempt for n in names], act_exempt=[plans[n].act_exempt for n in names],
            quantize=[self._quantize_fn(full[n]) for n in names], max_tokens=self.options.alpha_tokens,
            quantize_spending=[self._quantize_fn(full[n], spending=True) for n in names],
        ))
        scale = scales.scale if scales is not None else None
        already = dict(zip(names, scales.quantized)) if scales is not None and scales.quantized else {}
        mode = "none"
        if scale is not None:
            if group.norm is not None and smoothing.fold_into_norm(module.get_submodule(group.norm), scale):
                mode = "folded"
            else:
                if group.norm is not None:
                    result.warnings.append(f"{block.prefix}.{group.norm}: cannot fold smoothing into this norm; using an explicit input scale")
                mode = "explicit"
        hessian = shared.xtx
        if scale is not None:
            tokens = smoothing.smooth_tokens(tokens, scale)
            if hessian is not None:  # owned: the group is its last reader, so smoothed where it lies
                hessian = smoothing.smooth_hessian(shared.take_xtx() if owned else hessian, scale, in_place=owned)
        nf = self.options.figure_tokens
        for n in names:
            name = full[n]
            hook.qe_layer_start(block_index=index, layer_name=name)
            lin = linears[n]
            w = weights[n] if scale is None else smoothing.smooth_weight(weights[n], scale)
            ctx = self._context(index, name, lin, w, stats[n], hessian, tokens, token_modality, scale)
            quantizer, compensator = self.plugins_for(name)
            t0 = time.perf_counter()
            q = self._base_quantize(quantizer, w, hessian, plans[n].exempt, name, scale, already.get(n))
            t1 = time.perf_counter()

            def build(fitted: CompensatorModule | None, q=q, lin=lin, act_exempt=plans[n].act_exempt) -> QuantLinear:
                return QuantLinear.from_quantized(
                    q, a_bits=self.setting.a_bits,
                    bias=lin.bias.detach().float() if lin.bias is not None else None,
                    input_scale=scale if mode == "explicit" else None,
                    act_exempt=act_exempt, compensator=fitted, input_rotation=online_rotation(lin),
                ).to(lin.weight.device)

            def measure(fitted: CompensatorModule | None, w=w, build=build) -> tuple[QuantLinear, dict[str, float]]:
                ql = build(fitted)
                return ql, layer_figures(tokens[:nf], token_modality[:nf], w, ql)

            fitted = self.fit_compensator(compensator, ctx, q, plans[n], measure, foldable=group.norm is not None)
            _check_module(compensator, fitted, name)
            t2 = time.perf_counter()
            ql, figures = measure(fitted)
            figures.update(quantize_seconds=t1 - t0, fit_seconds=t2 - t1)
            if n in routed:
                figures["tokens"] = float(routed[n])
            if fitted is not None:
                figures.update({k: float(v) for k, v in fitted.fit_figures.items() if isinstance(v, (int, float))})
            if scales is not None:
                figures.update(scales.figures)
            module.set_submodule(n, ql)
            alpha = scales.alpha if scales is not None else None
            result.layers.append(LayerRecord(name, index, (lin.out_features, lin.in_features), figures, alpha, mode))
            hook.qe_layer_end(block_index=index, layer_name=name, figures=figures)
            release_freed_memory()

    def fit_compensator(self, compensator: Compensator, ctx: LayerContext, q, plan: LayerPlan,
                        measure: Callable[[CompensatorModule | None], tuple[QuantLinear, dict[str, float]]],
                        foldable: bool = True) -> CompensatorModule | None:
        """The module ``compensator`` adds to one linear. ``measure(module)`` builds that linear's
        :class:`QuantLinear` with a module and returns it with its error figures on the token
        sample; ``foldable``: whether the linear's smoothing folds into a norm (else it may need
        an explicit input scale). A planning pass (:mod:`qe.budget`) overrides this to fit and
        measure several options."""
        return compensator.fit(ctx, q, plan)

    def _quantize_fn(self, full: str, spending: bool = False):
        """The quantization a transform's search runs for one linear (its own quantizer; a
        warning, e.g. GPTQ's damping, names the linear); ``spending``: for a Hessian no one
        reads afterwards (:meth:`~qe.quantizers.base.Quantizer.quantize_spending_hessian`)."""
        quantizer, _ = self.plugins_for(full)
        quantize = quantizer.quantize_spending_hessian if spending else quantizer.quantize
        return lambda w_s, h_s, exempt: quantize(w_s, self.setting, hessian=h_s, exempt=exempt, layer_name=full)

    def _base_quantize(self, quantizer: Quantizer, w, hessian, exempt, full, scale, already=None):
        """The base quantization of one linear; ``already``: the same quantization, done while
        choosing the group's scales."""
        key = None
        if self.base_cache is not None:
            key = (f"{quantizer.name}:{quantizer.config!r}", self.setting, full, _digest(scale), _digest(exempt))
            if key in self.base_cache:
                return self.base_cache[key]
        q = already if already is not None else quantizer.quantize(w, self.setting, hessian=hessian, exempt=exempt,
                                                                   layer_name=full)
        if key is not None:
            self.base_cache[key] = q
        return q

    def _context(self, index, full, lin, weight, stats, hessian, tokens, modality, scale=None) -> LayerContext:
        return LayerContext(
            name=full, block_index=index, weight=weight,
            bias=lin.bias.detach().float() if lin.bias is not None else None,
            setting=self.setting, stats=stats, hessian=hessian, tokens=tokens, token_modality=modality,
            input_scale=scale, seed=self.options.seed,
        )


def _check_module(compensator: Compensator, module, layer: str) -> None:
    """A fitted module must be one the checkpoint can rebuild: a CompensatorModule class that
    its compensator lists in ``modules``."""
    if module is None:
        return
    declared = type(compensator).modules
    if not isinstance(module, CompensatorModule) or type(module) not in declared:
        listed = ", ".join(c.__name__ for c in declared) or "nothing"
        raise ConfigError(
            f"compensator {compensator.name!r} returned a {type(module).__name__} for {layer}, which its `modules` does not "
            f"list (it lists {listed}): subclass qe.compensators.base.CompensatorModule and add the class to "
            f"{type(compensator).__name__}.modules so checkpoints can rebuild it"
        )


def _digest(t: torch.Tensor | None) -> str | None:
    if t is None:
        return None
    import hashlib

    return hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _float_weight(lin: torch.nn.Module, full_name: str) -> torch.Tensor:
    """The linear's weight in float32, refused when it holds NaN or Inf."""
    w = lin.weight.detach().float()
    if not torch.isfinite(w).all():
        raise NumericalError(f"NaN or Inf in the weight of {full_name}: the checkpoint is damaged")
    return w


def _mean_rel_error(ref: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    num = sum(float((r - o).pow(2).sum(dtype=torch.float64)) for r, o in zip(ref, out))
    den = sum(float(r.pow(2).sum(dtype=torch.float64)) for r in ref)
    return num / max(den, 1e-30)


@torch.no_grad()
def layer_figures(tokens: torch.Tensor, modality: torch.Tensor, weight: torch.Tensor, ql: QuantLinear) -> dict[str, float]:
    """Relative output error of one quantized linear on its (smoothed) token sample, before
    (``rel_error_base``) and after (``rel_error``) compensation, overall and per modality.

    Per-token squared norms are summed in float64 from float32 products: one pass per term,
    no float64 copies of ``T × d_out`` matrices."""
    if tokens.numel() == 0:
        return {}
    x = tokens.to(ql.scales.device)
    y_ref = x @ weight.to(x.device).T  # (T, d_out)
    xq = x if ql.act_keep is None else x * ql.act_keep.to(x.dtype)
    xq = fake_quantize_activations(xq, ql.a_bits, ql.static_act_scale)
    y = xq @ ql.dequantized_weight().T
    ref_sq = y_ref.pow(2).sum(1, dtype=torch.float64)  # (T,)
    base_sq = (y_ref - y).pow(2).sum(1, dtype=torch.float64)
    if ql.compensator is not None:
        y += ql.compensator(x)
        comp_sq = (y_ref - y).pow(2).sum(1, dtype=torch.float64)
    else:
        comp_sq = base_sq
    out = {"rel_error_base": float(base_sq.sum() / ref_sq.sum().clamp_min(1e-30)),
           "rel_error": float(comp_sq.sum() / ref_sq.sum().clamp_min(1e-30))}
    mod = modality.long().to(ref_sq.device)
    n = len(MODALITIES)
    ref_m = torch.bincount(mod, weights=ref_sq, minlength=n)
    err_m = torch.bincount(mod, weights=comp_sq, minlength=n)
    counts = torch.bincount(mod, minlength=n)
    for name, m in zip(MODALITIES, Modality):
        if int(counts[int(m)]) > 0:
            out[f"rel_error_{name}"] = float(err_m[int(m)] / ref_m[int(m)].clamp_min(1e-30))
    return out


def quantize_model(
    loaded: LoadedModel,
    composition: Composition,
    encoded: list[EncodedSample],
    options: PipelineOptions | None = None,
    manager: QEPluginManager | None = None,
    **run_kwargs,
) -> PipelineResult:
    """Quantize ``loaded.model`` in place with ``composition``; return per-layer figures."""
    return QuantizationPipeline(loaded, composition, options, manager).run(encoded, **run_kwargs)


def quantize_vision_stacks(
    loaded: LoadedModel,
    composition: Composition,
    encoded: list[EncodedSample],
    scope: str,
    options: PipelineOptions | None = None,
    manager: QEPluginManager | None = None,
) -> PipelineResult:
    """Quantize the vision tower's blocks, then the projector (``--scope vision|all``), with
    the same pipeline as the language model, over the image samples of ``encoded``. The
    language model is left to the caller (it runs after these, on their outputs)."""
    from qe.models.stacks import scope_adapters, vision_samples

    result = PipelineResult()
    for adapter in scope_adapters(loaded.adapter, loaded.model, scope):
        if adapter is loaded.adapter:
            continue
        pipeline = QuantizationPipeline(dataclasses.replace(loaded, adapter=adapter), composition, options, manager)
        samples = vision_samples(adapter, encoded, scope) if pipeline.needs_calibration else []
        pipeline.run(samples, result=result)
    return result
