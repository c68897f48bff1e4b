"""``qe quantize --budget B``: per-layer compensator options allocated under a bits-per-weight budget.

``B`` counts everything a checkpoint stores for the quantized linears (packed codes, scales, zero
points, bias, smoothing scales, exemption masks, the compensators' factors, steps and routers,
in the dtypes they are saved in; :func:`qe.checkpoint.layer_storage_bits`), per quantized weight.

1. **Measure.** A planning pass quantizes a copy of each block in turn (of the whole model
   when the transform changes all of it, like a rotation) with the composition in
   ``fp-inputs`` propagation, so an offloaded model is planned one onloaded block at a time; at every linear it fits each option of the compensator's
   :meth:`~qe.compensators.base.Compensator.budget_menu` on the same base quantization and
   records the option's exact stored bits and its relative output error on the calibration
   token sample.
2. **Allocate.** One option per layer minimising the sum of the layers' relative errors
   within the budget: a multiple-choice knapsack solved exactly by dynamic programming over
   bits (in units of at most a few thousand bits, each option's cost rounded *up*, so the
   allocation never exceeds the budget). The unit does not depend on the budget, so a larger
   budget never gives a higher summed calibration error (:func:`allocate`).
3. **Quantize.** The real run is the same composition with one per-layer override per linear
   (its allocated option); the manifest records the allocation and the checkpoint's bits.

A budget below the base's own bits plus the cheapest option per layer is refused, naming
that minimum. A linear whose smoothing cannot fold into a norm may take an explicit input
scale in the real run that the planning pass did not choose: its bits are reserved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qe.capture import Block, BlockStep
from qe.checkpoint import layer_storage_bits
from qe.compensators.base import Compensator, CompensatorModule, LayerContext, LayerPlan
from qe.composition import Composition
from qe.errors import ConfigError
from qe.models.base import EncodedSample
from qe.models.loading import LoadedModel
from qe.models.offload import in_memory_copy, is_offloaded, onloaded
from qe.pipeline import PipelineOptions, PipelineResult, QuantizationPipeline
from qe.plugins import PluginRef, QEPluginManager, default_manager
from qe.quantizers.qlinear import QuantLinear
from qe.recipe import LayerOverride

MAX_UNITS = 20000  # knapsack resolution: capacity in at most this many units


@dataclass
class LayerOptions:
    """One linear's measured options: stored bits of the base and of each option's compensator,
    and each option's relative output error on the calibration sample."""

    name: str
    weights: int  # d_in · d_out
    base_bits: int  # the base's stored bits, plus any reserve (see the module docstring)
    specs: list[str] = field(default_factory=list)
    bits: list[int] = field(default_factory=list)  # the compensator's stored bits per option
    errors: list[float] = field(default_factory=list)


@dataclass
class Allocation:
    choice: dict[str, int]  # layer → index into its options
    bits: int  # total planned bits, base included
    error: float  # summed relative error of the choices


def menu_specs(compensator: str | PluginRef, manager: QEPluginManager, menu: tuple[dict[str, Any], ...]) -> list[str]:
    """Plugin specs of the menu's options: the composition's compensator with each option's changes."""
    ref = compensator if isinstance(compensator, PluginRef) else manager.resolve("compensator", compensator).ref
    specs = []
    for changes in menu:
        params = dict(ref.params)
        params.update({k: str(v) for k, v in changes.items()})
        spec = str(PluginRef(ref.name, tuple(params.items())))
        try:
            manager.resolve("compensator", spec)
        except ConfigError:
            continue  # an option this configuration cannot take (e.g. refine=true without experts)
        specs.append(spec)
    return specs


def allocate(layers: list[LayerOptions], total_bits: int) -> Allocation:
    """The choice per layer minimising the summed error with total bits ``≤ total_bits``.

    Raises ConfigError naming the minimum bits per weight when even the cheapest options do
    not fit."""
    weights = sum(layer.weights for layer in layers)
    floor = sum(layer.base_bits + min(layer.bits) for layer in layers)
    if total_bits < floor:
        raise ConfigError(
            f"the budget {total_bits / weights:.4f} bits per weight is below this composition's minimum "
            f"{math.ceil(floor / weights * 1e4) / 1e4:.4f} (the base plus the cheapest option per layer): "
            f"raise --budget to at least {math.ceil(floor / weights * 1e4) / 1e4:.4f}"
        )
    extras = [[b - min(layer.bits) for b in layer.bits] for layer in layers]
    span = sum(max(e) for e in extras)
    unit = max(1, math.ceil(span / MAX_UNITS))  # independent of the budget: monotone in it
    capacity = min((total_bits - floor) // unit, math.ceil(span / unit) if span else 0)
    best = np.zeros(capacity + 1)
    choices = []
    for layer, extra in zip(layers, extras):
        new = np.full(capacity + 1, np.inf)
        pick = np.zeros(capacity + 1, dtype=np.int32)
        for j, (e, err) in enumerate(zip(extra, layer.errors)):
            w = -(-e // unit)  # rounded up: the allocation's true bits never exceed the units'
            if w > capacity:
                continue
            cand = np.full(capacity + 1, np.inf)
            cand[w:] = best[: capacity + 1 - w] + err
            better = cand < new
            new[better] = cand[better]
            pick[better] = j
        best = new
        choices.append(pick)
    c = capacity
    choice: dict[str, int] = {}
    for layer, extra, pick in zip(reversed(layers), reversed(extras), reversed(choices)):
        j = int(pick[c])
        choice[layer.name] = j
        c -= -(-extra[j] // unit)
    bits = sum(layer.base_bits + layer.bits[choice[layer.name]] for layer in layers)
    error = sum(layer.errors[choice[layer.name]] for layer in layers)
    return Allocation(choice, bits, error)


class _PlanningPipeline(QuantizationPipeline):
    """Fits every menu option at every linear and records its bits and error."""

    def __init__(self, *args, specs: list[str], adapter_dtype: torch.dtype | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.options_by_spec = {s: self.manager.create("compensator", s) for s in specs}
        self.adapter_dtype = adapter_dtype
        self.measured: list[LayerOptions] = []

    def fit_compensator(self, compensator: Compensator, ctx: LayerContext, q, plan: LayerPlan,
                        measure: Callable[[CompensatorModule | None], tuple[QuantLinear, dict[str, float]]],
                        foldable: bool = True) -> CompensatorModule | None:
        record: LayerOptions | None = None
        cheapest: tuple[int, CompensatorModule | None] | None = None
        for spec, option in self.options_by_spec.items():
            try:
                option.validate_override(ctx.name, ctx.d_in, ctx.d_out)
            except ConfigError:
                continue  # this layer cannot hold the option (rank above its shape, too few channels)
            # Same exemption (C_s does not depend on the option); the option's own channel split.
            fitted = option.fit(ctx, q, LayerPlan(exempt=plan.exempt, act_exempt=plan.act_exempt))
            ql, figures = measure(fitted)
            base, comp = layer_storage_bits(ql, self.adapter_dtype)
            if record is None:
                reserve = 32 * ctx.d_in if ql.input_scale is None and not foldable else 0
                record = LayerOptions(ctx.name, ctx.d_in * ctx.d_out, base + reserve)
            record.specs.append(spec)
            record.bits.append(comp)
            record.errors.append(float(figures.get("rel_error", 0.0)))
            if cheapest is None or comp < cheapest[0]:
                cheapest = (comp, fitted)
        if record is None:
            raise ConfigError(f"no option of the budget's menu fits {ctx.name} ({ctx.d_in}→{ctx.d_out}): "
                              "quantize without --budget or leave the layer out with --skip")
        self.measured.append(record)
        return cheapest[1] if cheapest is not None else None

    def _quantize_block(self, step: BlockStep, sample_positions, result: PipelineResult) -> dict[str, float]:
        """Measured on an in-memory copy of the block (made while an offloaded block is
        onloaded), so the planned model's own blocks are never changed."""
        with onloaded(step.block.module, self.options.device):
            copied = in_memory_copy(step.block.module, self.options.device)
        work = BlockStep(dataclasses.replace(step.block, module=copied), step.inputs, step.device)
        figures = super()._quantize_block(work, sample_positions, result)
        step.next_hidden = work.next_hidden  # fp-inputs: the block's full-precision outputs
        return figures

    @contextlib.contextmanager
    def _block_onloaded(self, block: Block, on_block_done, block_file) -> Iterator[None]:
        yield  # nothing to onload or offload again: the block itself is only read (see _quantize_block)


@dataclass
class BudgetPlan:
    budget: float
    layers: list[LayerOptions]
    allocation: Allocation
    overrides: tuple[LayerOverride, ...]

    def record(self) -> dict[str, Any]:
        """The manifest's ``budget`` entry (planned figures; the checkpoint's own bits are added
        by the caller)."""
        weights = sum(layer.weights for layer in self.layers)
        return {
            "bits_per_weight_target": self.budget,
            "planned_bits": self.allocation.bits,
            "planned_bits_per_weight": self.allocation.bits / weights,
            "planned_rel_error_sum": self.allocation.error,
            "weights": weights,
            "allocation": {
                layer.name: {"option": layer.specs[j], "compensator_bits": layer.bits[j],
                             "planned_rel_error": layer.errors[j],
                             "options_measured": len(layer.specs)}
                for layer in self.layers for j in [self.allocation.choice[layer.name]]
            },
        }


def base_bits_floor(loaded: LoadedModel, composition: Composition, skip: tuple[str, ...] = ()) -> tuple[int, int]:
    """``(bits, weights)``: the packed codes of every linear the pipeline would quantize — a
    lower bound of any checkpoint's bits, known before calibration."""
    from qe.capture import BlockWalker
    from qe.packing import packed_columns
    from qe.pipeline import _matches

    walker = BlockWalker(loaded, progress=False)
    bits = weights = 0
    for block in walker.blocks():
        for name, lin in walker.linears(block).items():
            if _matches(f"{block.prefix}.{name}", skip):
                continue
            d_out, d_in = lin.get_parameter("weight").shape
            weights += d_in * d_out
            bits += 8 * d_out * packed_columns(d_in, composition.setting.w_bits)
    return bits, weights


def check_budget(budget: float, loaded: LoadedModel, composition: Composition, manager: QEPluginManager,
                 skip: tuple[str, ...] = ()) -> list[str]:
    """The menu's specs, after the checks that need no calibration: a compensator with a menu,
    and a budget above the base's packed codes alone."""

    if not (budget > 0 and math.isfinite(budget)):
        raise ConfigError(f"--budget {budget} must be a positive number of bits per weight, e.g. --budget 5.0")
    if is_offloaded(loaded.model) and composition.transform.create().changes_model():
        raise ConfigError(f"--budget with transform {composition.transform.label!r}, which changes the whole model, "
                          "plans on a copy of the model in memory, and this model is offloaded: drop "
                          "--offload-folder/--max-memory or quantize without --budget")
    compensator = composition.compensator.create()
    menu = compensator.budget_menu()
    if not menu:
        raise ConfigError(f"--budget allocates a compensator's ranks per layer, and {composition.compensator.label} "
                          "has nothing to allocate: use --compensator qe or lowrank")
    if not compensator.needs_calibration():  # its options could not be measured, only guessed
        raise ConfigError(f"--budget measures each option of {composition.compensator.label} by fitting it to "
                          "calibration data, and this compensator reads none: use a compensator that fits from data")
    bits, weights = base_bits_floor(loaded, composition, skip)
    if weights and budget * weights < bits:
        raise ConfigError(f"--budget {budget} is below the {bits / weights:.4f} bits per weight of the base's codes "
                          f"alone: raise --budget above {bits / weights:.4f}")
    specs = menu_specs(composition.compensator.ref, manager, menu)
    if not specs:
        raise ConfigError(f"no option of {composition.compensator.label}'s budget menu is valid with its parameters: "
                          "quantize without --budget")
    return specs


def plan_budget(loaded: LoadedModel, composition: Composition, encoded: list[EncodedSample], budget: float,
                options: PipelineOptions, *, adapter_dtype: torch.dtype | None = None,
                manager: QEPluginManager | None = None) -> BudgetPlan:
    """Measure the menu at every linear on a copy of the model, allocate, return the overrides."""
    manager = manager or default_manager()
    if options.overrides:
        raise ConfigError("--budget chooses every layer's compensator itself: drop the recipe's per-layer overrides")
    specs = check_budget(budget, loaded, composition, manager, options.skip)
    # A transform that changes the whole model (a rotation) must run on a copy of all of it;
    # otherwise each block is measured on a copy of its own and the model is left untouched.
    planned = loaded.copy() if composition.transform.create().changes_model() else loaded
    planning_options = dataclasses.replace(options, propagation="fp-inputs")
    pipeline = _PlanningPipeline(planned, composition, planning_options, manager, specs=specs,
                                 adapter_dtype=adapter_dtype)
    pipeline.run(encoded)
    layers = pipeline.measured
    del planned, pipeline
    weights = sum(layer.weights for layer in layers)
    allocation = allocate(layers, math.floor(budget * weights))
    overrides = tuple(LayerOverride(pattern=f"^{re.escape(layer.name)}$",
                                    compensator=layer.specs[allocation.choice[layer.name]]) for layer in layers)
    return BudgetPlan(budget, layers, allocation, overrides)
