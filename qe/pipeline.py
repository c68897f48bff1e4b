"""The quantization pipeline: one composition applied block by block.

Per decoder block:

1. stream the statistics of its linears over the block's calibration inputs (full-precision
   block): Hessian ``XᵀX`` where a plugin needs it, per-token top-k importance where the
   compensator needs it, and a bounded token sample;
2. per smoothing group: the compensator's plan (exempt columns), the smoothing scale (the
   quantizer's α, or the compensator's candidates chosen by calibration output error), then
   per linear: quantize, fit the compensator, replace the ``nn.Linear`` by a
   :class:`~qe.quantizers.qlinear.QuantLinear`, record the layer's figures;
3. produce the next block's inputs: by running the quantized block (``quantized``
   propagation, as deployed) or from the full-precision pass (``fp-inputs``).

Event hooks (``qe_block_start`` …) are called on the plugin manager so progress and report
plugins can watch without touching this code.
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

from qe.analysis.statistics import LinearStats, choose_sample_positions
from qe.capture import BlockInputs, StreamContext, attach_stats, capture_block_inputs, run_block
from qe.compensators.base import Compensator, LayerContext, LayerPlan
from qe.composition import Composition
from qe.errors import ConfigError, ModelError, NumericalError
from qe.modality import MODALITIES, Modality
from qe.models.base import EncodedSample
from qe.models.loading import LoadedModel
from qe.plugins import QEPluginManager, default_manager
from qe.quantized import fake_quantize_activations
from qe.quantizers.qlinear import QuantLinear

Propagation = Literal["quantized", "fp-inputs"]


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
        self.compensator = composition.compensator.create()
        self.setting = composition.setting
        # Per-layer overrides: (pattern, quantizer or None, compensator or None), first match wins.
        self._overrides = [
            (o.pattern,
             self.manager.create("quantizer", o.quantizer) if o.quantizer else None,
             self.manager.create("compensator", o.compensator) if o.compensator else None)
            for o in self.options.overrides
        ]
        self.warnings: list[str] = []
        # Optional cache of base quantizations shared between pipelines on the same statistics
        # (qe compare, fp-inputs): key (quantizer, setting, layer, smoothing, exemption).
        self.base_cache: dict | None = None
        self._validate_layers()

    def plugins_for(self, full_name: str):
        """The (quantizer, compensator) serving one linear."""
        for pattern, quantizer, compensator in self._overrides:
            if _matches(full_name, (pattern,)):
                return quantizer or self.quantizer, compensator or self.compensator
        return self.quantizer, self.compensator

    def _all_compensators(self):
        return [self.compensator] + [c for _, _, c in self._overrides if c is not None]

    def _all_quantizers(self):
        return [self.quantizer] + [q for _, q, _ in self._overrides if q is not None]

    # ------------------------------------------------------------------ checks
    def _validate_layers(self) -> None:
        from qe.models.offload import is_offloaded

        adapter, model = self.loaded.adapter, self.loaded.model
        prefix = adapter.blocks_prefix(model)
        if any(is_offloaded(b) for b in adapter.decoder_blocks(model)):
            raise ModelError("quantizing a model whose decoder blocks are offloaded (device_map with disk or CPU "
                             "offload) is not supported yet: load it on one device; `qe analyze` reads offloaded models")
        for i, block in enumerate(adapter.decoder_blocks(model)):
            if any(isinstance(m, QuantLinear) for m in block.modules()):
                continue  # quantized by an earlier run (resume)
            for name, lin in adapter.block_linears(block).items():
                full = f"{prefix}.{i}.{name}"
                if _matches(full, self.options.skip):
                    continue
                _, compensator = self.plugins_for(full)
                overridden = compensator is not self.compensator
                check = getattr(compensator, "validate_override", None) if overridden else None
                (check or compensator.validate_layer)(full, lin.in_features, lin.out_features)
                gs = self.setting.group_size
                if gs > lin.in_features:
                    raise ConfigError(
                        f"group size {gs} exceeds the input width {lin.in_features} of {full}: use at most "
                        f"{lin.in_features} (e.g. --group-size {lin.in_features}, or 0 for per channel)"
                    )
        capped = {}
        for c in self._all_compensators():
            capped.update(getattr(c, "capped_layers", {}) or {})
        if capped:
            shown = ", ".join(f"{n.split('.', 3)[-1]} ({r}→{u})" for n, (r, u) in list(capped.items())[:6])
            more = f" and {len(capped) - 6} more" if len(capped) > 6 else ""
            self.warnings.append(f"rank capped at min(d_in, d_out) for {len(capped)} layers: {shown}{more}")

    @property
    def needs_calibration(self) -> bool:
        """Whether any plugin reads calibration statistics. Without it (RTN, no compensator,
        no smoothing) the weights are quantized directly, without data and without figures."""
        for q in self._all_quantizers():
            if getattr(q, "needs_hessian", False) or q.smoothing_alpha() is not None or hasattr(q, "search_smoothing_scales"):
                return True
        for c in self._all_compensators():
            if (c.needs_tokens or c.needs_hessian or c.importance_k() is not None or c.smoothing_candidates()
                    or type(c).fit is not Compensator.fit):
                return True
        return False

    @property
    def needs_hessian(self) -> bool:
        return any(getattr(p, "needs_hessian", False) for p in self._all_quantizers() + self._all_compensators())

    # ------------------------------------------------------------------ run
    def run(
        self,
        encoded: list[EncodedSample],
        *,
        start_block: int = 0,
        on_block_done: Callable[[int, PipelineResult], None] | None = None,
        result: PipelineResult | None = None,
        inputs: BlockInputs | None = None,
    ) -> PipelineResult:
        """Quantize every decoder block from ``start_block`` on (earlier ones must already be
        quantized in the model: that is how ``--resume`` continues, passing the earlier
        ``result`` to extend). ``on_block_done`` runs after each block, before the
        ``qe_block_end`` event (a checkpointing caller saves there). ``inputs`` are block 0's
        captured inputs when the caller already has them (``qe compare`` shares them)."""
        opts = self.options
        hook = self.manager.hook
        result = result if result is not None else PipelineResult()
        result.warnings.extend(w for w in self.warnings if w not in result.warnings)
        t_start = time.perf_counter()
        adapter, model = self.loaded.adapter, self.loaded.model
        blocks = adapter.decoder_blocks(model)
        prefix = adapter.blocks_prefix(model)
        if not self.needs_calibration:
            return self._run_data_free(blocks, prefix, start_block, on_block_done, result, t_start)
        if inputs is None:
            inputs = capture_block_inputs(self.loaded, encoded, device=opts.device, batch_size=opts.batch_size,
                                          progress=opts.progress)
        sample_positions = choose_sample_positions(inputs.total_tokens, opts.max_tokens, opts.seed)
        # Blocks finished by an earlier run: replay them (quantized, or full precision in
        # fp-inputs mode, whose inputs never saw quantized blocks).
        for i in range(start_block):
            if opts.propagation == "quantized":
                inputs = inputs.with_hidden(run_block(blocks[i], inputs, device=opts.device, block_index=i))
            else:
                raise ConfigError("resume is supported in quantized propagation only")
        bar = tqdm(range(start_block, len(blocks)), desc=f"quantize {self.composition.label}", disable=not opts.progress)
        for i in bar:
            hook.qe_block_start(block_index=i, num_blocks=len(blocks))
            inputs, block_figures = self._quantize_block(i, blocks[i], f"{prefix}.{i}", inputs, sample_positions, result)
            result.blocks.append(block_figures)
            if on_block_done is not None:
                on_block_done(i, result)
            hook.qe_block_end(block_index=i, num_blocks=len(blocks), figures=block_figures)
        result.seconds += time.perf_counter() - t_start
        return result

    def _run_data_free(self, blocks, prefix, start_block, on_block_done, result, t_start) -> PipelineResult:
        """Quantize weights directly: nothing in the composition reads calibration data."""
        hook = self.manager.hook
        for i in tqdm(range(start_block, len(blocks)), desc=f"quantize {self.composition.label}",
                      disable=not self.options.progress):
            hook.qe_block_start(block_index=i, num_blocks=len(blocks))
            block = blocks[i]
            for n in sorted(self.linear_names(block, f"{prefix}.{i}")):
                full = f"{prefix}.{i}.{n}"
                hook.qe_layer_start(block_index=i, layer_name=full)
                lin = block.get_submodule(n)
                w = _float_weight(lin, full)
                quantizer, _ = self.plugins_for(full)
                t0 = time.perf_counter()
                q = quantizer.quantize(w, self.setting, layer_name=full)
                ql = QuantLinear.from_quantized(q, a_bits=self.setting.a_bits,
                                                bias=lin.bias.detach().float() if lin.bias is not None else None)
                block.set_submodule(n, ql.to(lin.weight.device))
                figures = {"quantize_seconds": time.perf_counter() - t0}
                result.layers.append(LayerRecord(full, i, (lin.out_features, lin.in_features), figures))
                hook.qe_layer_end(block_index=i, layer_name=full, figures=figures)
            result.blocks.append({})
            if on_block_done is not None:
                on_block_done(i, result)
            hook.qe_block_end(block_index=i, num_blocks=len(blocks), figures={})
        result.seconds += time.perf_counter() - t_start
        return result

    def linear_names(self, block, prefix: str) -> set[str]:
        """The block's linears this pipeline quantizes (all but the skipped ones)."""
        return {n for n in self.loaded.adapter.block_linears(block) if not _matches(f"{prefix}.{n}", self.options.skip)}

    def importance_k(self, names, prefix: str) -> int | None:
        ks = [self.plugins_for(f"{prefix}.{n}")[1].importance_k() for n in names]
        return max((x for x in ks if x), default=None)

    def _quantize_block(self, index, block, prefix, inputs: BlockInputs, sample_positions, result: PipelineResult):
        opts = self.options
        context = StreamContext()
        names = self.linear_names(block, prefix)
        k = self.importance_k(names, prefix)
        with attach_stats(block, self.loaded.adapter, prefix=prefix, context=context, sample_positions=sample_positions,
                          hessian=self.needs_hessian, moments=False,
                          estimator=self.estimator if k else None, k=k or 32, linears=names) as stats:
            fp_out = run_block(block, inputs, device=opts.device, context=context, block_index=index)
        self.quantize_block_with_stats(index, block, prefix, stats, result, names)
        q_out = run_block(block, inputs, device=opts.device, block_index=index)
        # The block's own error: quantized vs full-precision block on the same inputs.
        figures = {"block_rel_error": _mean_rel_error(fp_out, q_out)}
        next_hidden = q_out if opts.propagation == "quantized" else fp_out
        return inputs.with_hidden(next_hidden), figures

    def quantize_block_with_stats(self, index, block, prefix, stats: dict[str, LinearStats], result: PipelineResult,
                                  names: set[str] | None = None) -> None:
        """Quantize (and compensate) a block's linears from already-streamed statistics.

        The statistics are only read, so several pipelines can share them (``qe compare`` in
        fp-inputs mode streams each block once for the whole grid)."""
        names = self.linear_names(block, prefix) if names is None else names
        for group in self.loaded.adapter.smoothing_groups(block):
            members = [n for n in group.linears if n in names]
            if members:
                self._quantize_group(index, block, prefix, group, members, stats, result)

    def _quantize_group(self, index, block, prefix, group, names, stats: dict[str, LinearStats], result: PipelineResult):
        from qe import smoothing

        hook = self.manager.hook
        group_quantizer, group_compensator = self.plugins_for(f"{prefix}.{names[0]}")
        linears = {n: block.get_submodule(n) for n in names}
        shared = stats[names[0]].input
        tokens = shared.sample
        token_modality = shared.sample_modality
        weights = {n: _float_weight(linears[n], f"{prefix}.{n}") for n in names}
        plans: dict[str, LayerPlan] = {}
        for n in names:
            ctx = self._context(index, prefix, n, linears[n], weights[n], stats[n], None, tokens, token_modality)
            plans[n] = self.plugins_for(f"{prefix}.{n}")[1].plan(ctx)

        # One smoothing decision per group, by the plugins of its first linear.
        alpha = group_quantizer.smoothing_alpha()
        candidates = group_compensator.smoothing_candidates()
        alpha_errors: dict = {}
        chosen: dict[str, object] = {}  # the chosen candidate's quantized weights, reused below
        if alpha is None and candidates and not hasattr(group_quantizer, "search_smoothing_scales"):
            def quantizer_for(name):  # a warning (e.g. GPTQ's damping) names the linear
                return lambda w_s, h_s, exempt: group_quantizer.quantize(w_s, self.setting, hessian=h_s, exempt=exempt,
                                                                         layer_name=f"{prefix}.{name}")

            # Each linear is quantized with its own exemption, as it will be below.
            choice = smoothing.choose_alpha(
                candidates,
                shared.absmax,
                [weights[n] for n in names],
                tokens,
                [quantizer_for(n) for n in names],
                self.setting.a_bits,
                hessian=shared.xtx,
                exempt=[plans[n].exempt for n in names],
                act_exempt=[plans[n].act_exempt for n in names],
                max_tokens=self.options.alpha_tokens,
            )
            alpha, alpha_errors = choice.alpha, choice.errors
            # The chosen candidate's quantization is the base (same weight, Hessian and
            # exemption), unless a per-layer override gives a linear another quantizer.
            chosen = {n: q for n, q in zip(names, choice.quantized) if self.plugins_for(f"{prefix}.{n}")[0] is group_quantizer}
        scale = None
        mode = "none"
        search = getattr(group_quantizer, "search_smoothing_scales", None)
        if alpha is None and search is not None:
            # A quantizer with its own scale search (AWQ): its scales replace α smoothing.
            scale = search([weights[n] for n in names], tokens, token_modality, self.setting, hessian=shared.xtx,
                           exempt=_union([plans[n].exempt for n in names]),
                           act_exempt=_union([plans[n].act_exempt for n in names]), layer_name=f"{prefix}.{names[0]}")
        elif alpha is not None:
            scale = smoothing.smoothing_scales(shared.absmax, [weights[n] for n in names], alpha)
        if scale is not None:
            if group.norm is not None and smoothing.fold_into_norm(block.get_submodule(group.norm), scale):
                mode = "folded"
            else:
                if group.norm is not None:
                    result.warnings.append(f"{prefix}.{group.norm}: cannot fold smoothing into this norm; using an explicit input scale")
                mode = "explicit"
        hessian = shared.xtx
        if scale is not None:
            tokens = smoothing.smooth_tokens(tokens, scale)
            hessian = smoothing.smooth_hessian(hessian, scale) if hessian is not None else None
        for n in names:
            full = f"{prefix}.{n}"
            hook.qe_layer_start(block_index=index, layer_name=full)
            lin = linears[n]
            w = weights[n] if scale is None else smoothing.smooth_weight(weights[n], scale)
            ctx = self._context(index, prefix, n, lin, w, stats[n], hessian, tokens, token_modality, scale)
            quantizer, compensator = self.plugins_for(full)
            t0 = time.perf_counter()
            q = self._base_quantize(quantizer, w, hessian, plans[n].exempt, full, scale, chosen.get(n))
            t1 = time.perf_counter()
            module = compensator.fit(ctx, q, plans[n])
            t2 = time.perf_counter()
            ql = QuantLinear.from_quantized(
                q, a_bits=self.setting.a_bits,
                bias=lin.bias.detach().float() if lin.bias is not None else None,
                input_scale=scale if mode == "explicit" else None,
                act_exempt=plans[n].act_exempt, compensator=module,
            ).to(lin.weight.device)
            nf = self.options.figure_tokens
            figures = layer_figures(tokens[:nf], token_modality[:nf], w, ql)
            figures.update(quantize_seconds=t1 - t0, fit_seconds=t2 - t1)
            fit_figures = getattr(module, "fit_figures", None) or {}
            figures.update({k: float(v) for k, v in fit_figures.items() if isinstance(v, (int, float))})
            if alpha_errors:
                figures["alpha_error"] = float(alpha_errors.get(alpha, float("nan")))
            block.set_submodule(n, ql)
            result.layers.append(LayerRecord(full, index, (lin.out_features, lin.in_features), figures, alpha, mode))
            hook.qe_layer_end(block_index=index, layer_name=full, figures=figures)

    def _base_quantize(self, quantizer, w, hessian, exempt, full, scale, already=None):
        """The base quantization of one linear; ``already``: the same quantization, done while
        choosing α."""
        key = None
        if self.base_cache is not None:
            label = f"{getattr(quantizer, 'name', type(quantizer).__name__)}:{quantizer.config!r}"
            key = (label, self.setting, full, _digest(scale), _digest(exempt))
            if key in self.base_cache:
                return self.base_cache[key]
        q = already if already is not None else quantizer.quantize(w, self.setting, hessian=hessian, exempt=exempt,
                                                                   layer_name=full)
        if key is not None:
            self.base_cache[key] = q
        return q

    def _context(self, index, prefix, name, lin, weight, stats, hessian, tokens, modality, scale=None) -> LayerContext:
        return LayerContext(
            name=f"{prefix}.{name}", block_index=index, weight=weight,
            bias=lin.bias.detach().float() if lin.bias is not None else None,
            setting=self.setting, stats=stats, hessian=hessian, tokens=tokens, token_modality=modality,
            input_scale=scale, seed=self.options.seed,
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


def _union(masks: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0].clone()
    for m in present[1:]:
        out |= m
    return out


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
