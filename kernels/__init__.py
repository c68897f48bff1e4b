"""Triton kernels of the quantized forward and their torch reference twins.

Installed as ``qe.kernels`` (the folder is mapped in pyproject.toml) so that the top-level
name ``kernels`` stays free for Hugging Face's kernel hub package.

The operations below run the Triton kernels (:mod:`qe.kernels.triton_kernels`) on CUDA when
triton is importable and their torch twins (:mod:`qe.kernels.reference`) otherwise;
``QE_KERNELS=torch|triton`` forces a backend (see :func:`backend`). Importing this package
never imports triton. Formats, tolerances and what Triton's CPU interpreter supports:
``kernels/README.md``.
"""

from qe.kernels.ops import (
    BACKENDS,
    KernelError,
    QELinearWeights,
    backend,
    forward_quant_linear,
    hadamard_transform,
    qe_linear,
    qe_prologue,
    quantize_activations,
    quantized_linear,
    routed_lowrank,
    shared_down_and_route,
    sort_by_expert,
    triton_available,
    weight_only_linear,
)

__all__ = [
    "BACKENDS", "KernelError", "QELinearWeights", "backend", "forward_quant_linear", "hadamard_transform", "qe_linear", "qe_prologue", "quantize_activations",
    "quantized_linear", "routed_lowrank", "shared_down_and_route", "sort_by_expert", "triton_available",
    "weight_only_linear",
]
