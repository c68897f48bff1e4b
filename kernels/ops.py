"""Dispatch layer: the public kernel operations, their input checks, and the choice of backend.

``backend()`` is ``"triton"`` on a machine with CUDA and an importable triton, ``"torch"``
otherwise; ``QE_KERNELS=torch|triton`` forces one. Forcing Triton on a machine without CUDA
runs the kernels in Triton's interpreter and needs ``TRITON_INTERPRET=1`` (set before the
first Triton call). Under the automatic choice, tensors on the CPU always take the torch twin.

Every operation accepts leading batch dimensions (``(..., d_in)``) and returns the same
leading dimensions. Checks here are host-side only (shapes, dtypes, devices): they never
synchronise with the GPU.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from types import ModuleType

import torch

from qe.errors import QEError
from qe.kernels import reference
from qe.packing import packed_columns


class KernelError(QEError):
    """Inputs the kernels cannot take, or a backend that cannot run here."""


BACKENDS = ("torch", "triton")
ENV_VAR = "QE_KERNELS"


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _triton_importable()  # cached: the forward of every quantized linear asks


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend() -> str:
    """``"triton"`` or ``"torch"``: what the operations below run (read on every call)."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced in ("", "auto"):
        return "triton" if triton_available() and torch.cuda.is_available() else "torch"
    if forced not in BACKENDS:
        raise KernelError(f"{ENV_VAR}={forced!r} is not a backend; use one of {', '.join(BACKENDS)} (or unset it)")
    if forced == "triton":
        if not triton_available():
            raise KernelError(f"{ENV_VAR}=triton but triton is not installed; install triton (Linux) or set {ENV_VAR}=torch")
        if not torch.cuda.is_available() and not _interpreting():
            raise KernelError(f"{ENV_VAR}=triton without CUDA needs Triton's interpreter; set TRITON_INTERPRET=1 "
                              f"before the first kernel call, or {ENV_VAR}=torch")
    return forced


_triton_module: ModuleType | None = None


def _triton() -> ModuleType:
    global _triton_module
    if _triton_module is None:
        _triton_module = importlib.import_module("qe.kernels.triton_kernels")
    return _triton_module


def _impl(device: torch.device) -> ModuleType:
    """The module whose function runs for tensors on ``device``."""
    chosen = backend()
    if chosen == "torch":
        return reference
    if device.type == "cuda":
        return _triton()
    forced = os.environ.get(ENV_VAR, "").strip().lower() == "triton"
    if forced and _interpreting():
        mod = _triton()
        if not mod.INTERPRET:
            raise KernelError("the Triton kernels were loaded without TRITON_INTERPRET=1 and cannot run on the CPU; "
                              "set it before the first kernel call")
        return mod
    if forced:
        raise KernelError(f"{ENV_VAR}=triton got CPU tensors; move them to CUDA or set TRITON_INTERPRET=1")
    return reference


# --------------------------------------------------------------------------- checks


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise KernelError(message)


def _flatten(x: torch.Tensor, name: str = "x") -> tuple[torch.Tensor, tuple[int, ...]]:
    _check(x.dim() >= 1, f"{name} must have a feature dimension; got a scalar")
    return x.reshape(-1, x.shape[-1]), tuple(x.shape[:-1])


def _check_vector(t: torch.Tensor | None, d: int, name: str, device: torch.device) -> None:
    if t is None:
        return
    _check(t.shape == (d,), f"{name} has shape {tuple(t.shape)}; expected ({d},) to match the input width")
    _check(t.device == device, f"{name} is on {t.device} but the input is on {device}; move it with .to()")


def _check_float(x: torch.Tensor, name: str) -> None:
    _check(x.dtype in (torch.float16, torch.bfloat16, torch.float32),
           f"{name} has dtype {x.dtype}; the kernels take float16, bfloat16 or float32")


def _check_act_bits(bits: int) -> None:
    _check(2 <= bits <= 8, f"activation bits {bits} cannot be stored as int8 codes; use 2 to 8 (16 = unquantized)")


def _check_weight(qweight, scales, zeros, bits, group_size, d_in, device) -> None:
    _check(1 <= bits <= 8, f"weight bits {bits} are not supported; use 1 to 8")
    _check(qweight.dtype == torch.uint8 and qweight.dim() == 2, "qweight must be a 2-D uint8 tensor "
           "packed by qe.packing.pack")
    d_out = qweight.shape[0]
    _check(qweight.shape[1] == packed_columns(d_in, bits),
           f"qweight has {qweight.shape[1]} bytes per row; {bits}-bit codes of {d_in} inputs take "
           f"{packed_columns(d_in, bits)} (is the input width or the bit width wrong?)")
    _check(group_size >= 0, f"group size {group_size} is negative; use 0 for one group per row")
    n_groups = 1 if group_size == 0 else -(-d_in // group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        _check(tuple(t.shape) == (d_out, n_groups),
               f"{name} has shape {tuple(t.shape)}; expected ({d_out}, {n_groups}) for group size {group_size}")
        _check(t.device == device, f"{name} is on {t.device} but the input is on {device}; move it with .to()")


def _check_epilogue(bias, shared_u, shared_a, tokens, d_out, device) -> None:
    _check_vector(bias, d_out, "bias", device)
    _check((shared_u is None) == (shared_a is None), "pass shared_u and shared_a together (the shared term u A_sᵀ)")
    if shared_u is not None:
        _check(shared_a.dim() == 2 and shared_a.shape[0] == d_out,
               f"shared_a has shape {tuple(shared_a.shape)}; expected ({d_out}, r_s)")
        _check(tuple(shared_u.shape) == (tokens, shared_a.shape[1]),
               f"shared_u has shape {tuple(shared_u.shape)}; expected ({tokens}, {shared_a.shape[1]})")


def _group_size_supported(group_size: int, d_in: int) -> bool:
    """The Triton GEMM needs K tiles that never straddle a group: a group size divisible by 16."""
    return group_size == 0 or group_size >= d_in or group_size % 16 == 0


_warned_group_sizes: set[int] = set()


def _gemm_impl(device: torch.device, group_size: int, d_in: int) -> ModuleType:
    impl = _impl(device)
    if impl is not reference and not _group_size_supported(group_size, d_in):
        if group_size not in _warned_group_sizes:
            _warned_group_sizes.add(group_size)
            warnings.warn(f"group size {group_size} is not a multiple of 16; the Triton GEMM cannot tile it, "
                          "so the torch twin runs instead", stacklevel=3)
        return reference
    return impl


def _normalise_group_size(group_size: int, d_in: int) -> int:
    return 0 if group_size >= d_in else group_size  # one group covering the row = per channel


# --------------------------------------------------------------------------- operations


def quantize_activations(
    x: torch.Tensor, bits: int, input_scale: torch.Tensor | None = None, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic symmetric quantization of ``x̃ ⊙ keep`` (``x̃ = x / input_scale``):
    int8 codes ``(..., d_in)`` and fp32 scales ``(...)``."""
    _check_act_bits(bits)
    _check_float(x, "x")
    x2, lead = _flatten(x)
    _check_vector(input_scale, x2.shape[1], "input_scale", x.device)
    _check_vector(keep, x2.shape[1], "keep", x.device)
    _check(keep is None or keep.dtype == torch.bool, "keep must be a bool mask (True = quantized channel)")
    codes, scales = _impl(x.device).quantize_activations(x2, bits, input_scale, keep)
    return codes.reshape(*lead, -1), scales.reshape(lead)


def shared_down_and_route(
    x: torch.Tensor,
    shared_b: torch.Tensor | None,
    router: torch.Tensor | None,
    input_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``u = x̃ B_sᵀ`` ``(..., r_s)`` fp32 and ``i* = argmin_i (R |x̃|)_i`` ``(...)`` int32."""
    _check_float(x, "x")
    x2, lead = _flatten(x)
    _check_lowrank_inputs(x2.shape[1], shared_b, router, input_scale, x.device)
    u, expert = _impl(x.device).shared_down_and_route(x2, shared_b, router, input_scale)
    return (u.reshape(*lead, -1) if u is not None else None, expert.reshape(lead) if expert is not None else None)


def _check_lowrank_inputs(d_in, shared_b, router, input_scale, device) -> None:
    _check_vector(input_scale, d_in, "input_scale", device)
    if shared_b is not None:
        _check(shared_b.dim() == 2 and shared_b.shape[1] == d_in,
               f"shared_b has shape {tuple(shared_b.shape)}; expected (r_s, {d_in})")
    if router is not None:
        _check(router.dim() == 2 and router.shape[1] == d_in and router.shape[0] >= 1,
               f"router has shape {tuple(router.shape)}; expected (N_r ≥ 1, {d_in})")


def qe_prologue(
    x: torch.Tensor,
    a_bits: int,
    input_scale: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    shared_b: torch.Tensor | None = None,
    router: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One pass over ``x``: ``(codes, x_scales, u_shared, expert)`` (see the two functions above)."""
    _check_act_bits(a_bits)
    _check_float(x, "x")
    x2, lead = _flatten(x)
    _check_vector(keep, x2.shape[1], "keep", x.device)
    _check_lowrank_inputs(x2.shape[1], shared_b, router, input_scale, x.device)
    codes, scales, u, expert = _impl(x.device).qe_prologue(x2, a_bits, input_scale, keep, shared_b, router)
    return (codes.reshape(*lead, -1), scales.reshape(lead),
            u.reshape(*lead, -1) if u is not None else None, expert.reshape(lead) if expert is not None else None)


def weight_only_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    shared_u: torch.Tensor | None = None,
    shared_a: torch.Tensor | None = None,
) -> torch.Tensor:
    """W<b>A16 GEMM ``x̃ Wᵀ + bias + u A_sᵀ`` with packed weights; output in ``x.dtype``."""
    _check_float(x, "x")
    x2, lead = _flatten(x)
    d_in = x2.shape[1]
    _check_weight(qweight, scales, zeros, bits, group_size, d_in, x.device)
    _check_vector(input_scale, d_in, "input_scale", x.device)
    if shared_u is not None:
        shared_u = shared_u.reshape(-1, shared_u.shape[-1])
    _check_epilogue(bias, shared_u, shared_a, x2.shape[0], qweight.shape[0], x.device)
    gs = _normalise_group_size(group_size, d_in)
    y = _gemm_impl(x.device, gs, d_in).weight_only_linear(
        x2, qweight, scales, zeros, bits=bits, group_size=gs, input_scale=input_scale, bias=bias,
        shared_u=shared_u, shared_a=shared_a)
    return y.reshape(*lead, -1)


def quantized_linear(
    codes: torch.Tensor,
    x_scales: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    symmetric: bool | None = None,
    bias: torch.Tensor | None = None,
    shared_u: torch.Tensor | None = None,
    shared_a: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W<b>A<a> GEMM from int8 activation codes and per-token scales (integer accumulation).

    ``symmetric`` (all zero points equal to 2^(b-1)) lets the kernel skip the zero-point
    correction; None makes it look, which synchronises with the GPU.
    """
    _check(codes.dtype == torch.int8, f"codes have dtype {codes.dtype}; expected int8 from quantize_activations")
    c2, lead = _flatten(codes, "codes")
    d_in = c2.shape[1]
    _check(tuple(x_scales.shape) == lead, f"x_scales has shape {tuple(x_scales.shape)}; expected {lead} (one per token)")
    _check_weight(qweight, scales, zeros, bits, group_size, d_in, codes.device)
    if shared_u is not None:
        shared_u = shared_u.reshape(-1, shared_u.shape[-1])
    _check_epilogue(bias, shared_u, shared_a, c2.shape[0], qweight.shape[0], codes.device)
    gs = _normalise_group_size(group_size, d_in)
    y = _gemm_impl(codes.device, gs, d_in).quantized_linear(
        c2, x_scales.reshape(-1), qweight, scales, zeros, bits=bits, group_size=gs, symmetric=symmetric, bias=bias,
        shared_u=shared_u, shared_a=shared_a, out_dtype=out_dtype)
    return y.reshape(*lead, -1)


def sort_by_expert(expert: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, offsets)``: token indices grouped by expert, and each expert's slice of them."""
    return reference.sort_by_expert(expert.reshape(-1), n_experts)


def routed_lowrank(
    x: torch.Tensor,
    expert: torch.Tensor,
    routed_a: torch.Tensor,
    routed_b: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed term ``A_{i*} B_{i*} x̃`` as a grouped GEMM over tokens sorted by expert;
    added in place to ``out`` when given."""
    _check_float(x, "x")
    x2, lead = _flatten(x)
    d_in = x2.shape[1]
    _check(routed_b.dim() == 3 and routed_b.shape[2] == d_in,
           f"routed_b has shape {tuple(routed_b.shape)}; expected (N_r, r, {d_in})")
    n_experts, rank = routed_b.shape[0], routed_b.shape[1]
    _check(routed_a.dim() == 3 and routed_a.shape[0] == n_experts and routed_a.shape[2] == rank,
           f"routed_a has shape {tuple(routed_a.shape)}; expected ({n_experts}, d_out, {rank})")
    _check(tuple(expert.shape) == lead, f"expert has shape {tuple(expert.shape)}; expected {lead} (one per token)")
    _check(not expert.is_floating_point(), "expert must hold integer expert indices")
    _check_vector(input_scale, d_in, "input_scale", x.device)
    out2 = None
    if out is not None:
        _check(tuple(out.shape) == (*lead, routed_a.shape[1]),
               f"out has shape {tuple(out.shape)}; expected {(*lead, routed_a.shape[1])}")
        out2 = out.view(-1, out.shape[-1]) if out.is_contiguous() else None
        _check(out2 is not None, "out must be contiguous to be updated in place")
    impl = _impl(x.device)
    if impl is reference and expert.numel():
        # the twin's per-expert slices need valid indices; the kernels trust their router
        _check(0 <= int(expert.min()) and int(expert.max()) < n_experts, f"expert indices must lie in [0, {n_experts})")
    y = impl.routed_lowrank(x2, expert.reshape(-1), routed_a, routed_b, input_scale, out2)
    return out if out is not None else y.reshape(*lead, -1)


# --------------------------------------------------------------------------- online Hadamard


@functools.lru_cache(maxsize=32)
def _small_hadamard(m: int, device: str) -> torch.Tensor:
    from qe.transforms.hadamard import small_hadamard

    return small_hadamard(m).float().to(device)


def hadamard_transform(x: torch.Tensor, signs: torch.Tensor | None = None) -> torch.Tensor:
    """The online rotation ``((x ⊙ signs) H_n) / √n`` ``(..., n)`` in ``x.dtype`` (fp32 inside),
    ``H_n = H_p ⊗ H_m`` (:mod:`qe.transforms.hadamard`): a fast Walsh–Hadamard transform over
    the power-of-two factor, a dense ``(m, m)`` matmul for the small Paley factor."""
    from qe.transforms.hadamard import factor_order

    _check_float(x, "x")
    x2, lead = _flatten(x)
    n = x2.shape[1]
    factors = factor_order(n)
    _check(factors is not None, f"no Hadamard matrix of order {n} is known to qe (n = 2^k · m, m a Paley order)")
    p, m = factors
    _check_vector(signs, n, "signs", x.device)
    small = _small_hadamard(m, str(x.device)) if m > 1 else None
    y = _impl(x.device).hadamard_transform(x2, signs, p, small)
    return y.reshape(*lead, n)


# --------------------------------------------------------------------------- the whole layer


@dataclass(frozen=True)
class QELinearWeights:
    """Everything one quantized linear (optionally with a QE compensator) holds.

    ``qweight/scales/zeros/bits/group_size/symmetric`` as in :class:`qe.quantizers.qlinear.QuantLinear`;
    ``a_bits`` 16 means unquantized activations; ``shared_a (d_out, r_s)``, ``shared_b (r_s, d_in)``;
    ``router (N_r, d_in)``; ``routed_a (N_r, d_out, r_r)``, ``routed_b (N_r, r_r, d_in)``.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool
    a_bits: int = 16
    bias: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None
    act_keep: torch.Tensor | None = None
    shared_a: torch.Tensor | None = None
    shared_b: torch.Tensor | None = None
    router: torch.Tensor | None = None
    routed_a: torch.Tensor | None = None
    routed_b: torch.Tensor | None = None

    def __post_init__(self):
        _check((self.shared_a is None) == (self.shared_b is None), "give shared_a and shared_b together")
        routed = (self.router is not None, self.routed_a is not None, self.routed_b is not None)
        _check(all(routed) or not any(routed), "routed experts need router, routed_a and routed_b together")


def qe_linear(x: torch.Tensor, w: QELinearWeights) -> torch.Tensor:
    """The quantized forward ``Q_w(W̃) Q_a(x̃ ⊙ keep) + b + A_s B_s x̃ + A_{i*} B_{i*} x̃``.

    At most four launches on the Triton backend: the prologue (codes, scales, shared
    down-projection, router), the GEMM with the shared term in its epilogue, and the routed
    grouped down / up projections (the up projection adds into the GEMM's output).
    """
    x2, lead = _flatten(x)
    if w.a_bits < 16:
        codes, x_scales, u, expert = qe_prologue(x2, w.a_bits, w.input_scale, w.act_keep, w.shared_b, w.router)
        y = quantized_linear(codes, x_scales, w.qweight, w.scales, w.zeros, bits=w.bits, group_size=w.group_size,
                             symmetric=w.symmetric, bias=w.bias, shared_u=u, shared_a=w.shared_a, out_dtype=x.dtype)
    else:
        u, expert = (shared_down_and_route(x2, w.shared_b, w.router, w.input_scale)
                     if w.shared_b is not None or w.router is not None else (None, None))
        y = weight_only_linear(x2, w.qweight, w.scales, w.zeros, bits=w.bits, group_size=w.group_size,
                               input_scale=w.input_scale, bias=w.bias, shared_u=u, shared_a=w.shared_a)
    if w.router is not None:
        routed_lowrank(x2, expert, w.routed_a, w.routed_b, w.input_scale, out=y)
    return y.reshape(*lead, -1)


def forward_quant_linear(module, x: torch.Tensor) -> torch.Tensor | None:
    """The kernels' forward of a :class:`qe.quantizers.qlinear.QuantLinear` (with no compensator,
    a ``LowRankAdapter`` or a router-driven ``QuantExpertsAdapter``), or None where the module's
    own torch path must run: the torch backend, static activation scales, low-rank branches on
    8-bit inputs, ablation routings, and anything that needs gradients."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or _impl(x.device) is reference:
        return None
    if module.static_act_scale is not None:
        return None
    factors: dict[str, torch.Tensor] = {}
    comp = module.compensator
    if comp is not None:
        from qe.compensators.modules import LowRankAdapter, QuantExpertsAdapter

        # factor(): float32 whatever the adapter's storage (integer factors are dequantized once, cached)
        if isinstance(comp, LowRankAdapter) and comp.input_bits >= 16:
            factors = dict(shared_a=comp.factor("A"), shared_b=comp.factor("B"))
        elif isinstance(comp, QuantExpertsAdapter) and comp.input_bits >= 16 and comp.routing == "router":
            if comp.shared_rank > 0:
                factors.update(shared_a=comp.factor("A_s"), shared_b=comp.factor("B_s"))
            if comp.num_experts > 0:
                factors.update(router=comp.factor("R"), routed_a=comp.factor("A"), routed_b=comp.factor("B"))
        else:
            return None
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in factors.values())):
        return None  # the kernels have no backward: training (e.g. expert refinement) takes the torch path
    weights = QELinearWeights(
        module.qweight, module.scales, module.zeros, bits=module.bits, group_size=module.group_size,
        symmetric=module.symmetric, a_bits=module.a_bits, bias=module.bias, input_scale=module.input_scale,
        act_keep=module.act_keep if module.a_bits < 16 else None, **factors,
    )
    return qe_linear(x, weights)
