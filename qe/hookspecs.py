"""Hook specifications: the whole contract between ``qe`` and its plugins.

Every plugin, built-in or third-party, reaches the toolkit through these hooks, and the
plugin manager (:mod:`qe.plugins`) is the only registry. A third-party package declares an
entry point in the group ``qe`` that names a module (or object) implementing some of these
hooks with ``@qe.hookimpl``.

Two families of hooks:

* **Registration hooks** return plugin *classes*. A plugin class has a unique ``name``, a
  frozen dataclass ``Config`` (its parameters, with defaults) and a constructor taking that
  config; see :class:`qe.plugins.Plugin`. The kind of the hook decides the base class the
  plugin must follow.
* **Event hooks** let plugins watch the pipeline (progress, logging, report writers) without
  touching it. They are called with keyword arguments only and their return values are
  ignored. Figures are plain ``dict[str, float]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # only for annotations; hookspecs import nothing heavy at run time
    from qe.analysis.estimators import Estimator
    from qe.compensators.base import Compensator
    from qe.data.sources import CalibrationSource
    from qe.models.base import ModelAdapter
    from qe.quantizers.base import Quantizer
    from qe.transforms.base import Transform

PROJECT = "qe"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------- registration


@hookspec
def qe_estimators() -> Sequence[type[Estimator]]:
    """Return channel-importance estimator classes.

    An estimator turns a linear layer's input tokens ``x`` (``T × d_in``) and its weight ``W``
    (``d_out × d_in``) into per-token channel scores (``T × d_in``, non-negative) whose
    per-token top-k sets feed the analysis and Quant Experts' channel split. Subclass
    :class:`qe.analysis.estimators.Estimator`.
    """


@hookspec
def qe_quantizers() -> Sequence[type[Quantizer]]:
    """Return weight quantizer classes.

    A quantizer maps a weight matrix, its calibration statistics and a mask of exempt input
    columns to a quantized weight (codes, scales, zero points and the dequantized matrix). It
    never knows which compensator follows it. Subclass :class:`qe.quantizers.base.Quantizer`.
    """


@hookspec
def qe_transforms() -> Sequence[type[Transform]]:
    """Return transform classes (smoothing, and other changes of basis before quantization).

    Per smoothing group (the linears reading one input), a transform returns a scale vector
    ``s`` that the pipeline applies exactly (``W̃ = W·diag(s)``, ``x̃ = x / s``, folded into the
    preceding norm where there is one); the quantizer then sees the transformed weight. A
    transform composes with any quantizer and compensator. Subclass
    :class:`qe.transforms.base.Transform`.
    """


@hookspec
def qe_compensators() -> Sequence[type[Compensator]]:
    """Return quantization-error compensator classes.

    A compensator has a planning step before weight quantization (it may ask for smoothing
    and exempt input columns) and a fitting step after it that returns the module added to
    the quantized linear's output. Subclass :class:`qe.compensators.base.Compensator`; the
    module ``fit`` returns subclasses :class:`qe.compensators.base.CompensatorModule` and is
    listed in the compensator's ``modules``, which is how a checkpoint rebuilds it.
    """


@hookspec
def qe_model_adapters() -> Sequence[type[ModelAdapter]]:
    """Return model adapter classes.

    An adapter recognises a model family and finds its language model's decoder blocks, their
    linears, the norms before them, the smoothing groups, and per-token modality masks.
    Adapters are tried in order of their ``priority`` (higher first); the generic fallback
    has the lowest. Subclass :class:`qe.models.base.ModelAdapter`.
    """


@hookspec
def qe_calibration_sources() -> Sequence[type[CalibrationSource]]:
    """Return calibration source classes (named data sets usable as ``--calib NAME``).

    Subclass :class:`qe.data.sources.CalibrationSource`.
    """


# --------------------------------------------------------------------------- events


@hookspec
def qe_run_start(command: str, info: dict[str, Any]) -> None:
    """A command (``analyze``, ``quantize``, ``compare``, ``eval``) starts.

    ``info`` holds the run's facts: model name, number of blocks, settings, compositions.
    """


@hookspec
def qe_block_start(block_index: int, num_blocks: int) -> None:
    """The pipeline starts work on decoder block ``block_index`` (0-based)."""


@hookspec
def qe_layer_start(block_index: int, layer_name: str) -> None:
    """The pipeline starts quantizing (or analysing) one linear layer."""


@hookspec
def qe_layer_end(block_index: int, layer_name: str, figures: dict[str, float]) -> None:
    """One linear layer is done; ``figures`` holds its error and timing figures.

    Keys used by the built-ins: ``rel_error_base`` and ``rel_error`` (relative output error
    before and after compensation on the layer's calibration tokens), ``rel_error_<modality>``,
    ``router_agreement``, ``fit_seconds``.
    """


@hookspec
def qe_block_end(block_index: int, num_blocks: int, figures: dict[str, float]) -> None:
    """Decoder block ``block_index`` is done; ``figures`` summarises it (for example the
    block output's relative error against full precision)."""


@hookspec
def qe_run_end(command: str, output: str | None, figures: dict[str, float]) -> None:
    """A command finished; ``output`` is where its results went (``None`` if nowhere)."""
