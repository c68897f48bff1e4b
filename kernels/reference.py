"""Torch reference twins of the Triton kernels (:mod:`qe.kernels.triton_kernels`).

Each function here has the same signature and the same output contract as the kernel of
the same name, and is what :mod:`qe.kernels` runs where Triton cannot (CPU, no triton). They
take 2-D inputs (tokens × features); :mod:`qe.kernels.ops` flattens leading dimensions.

Conventions shared with the kernels (see ``kernels/README.md``):

* smoothing divides in fp32: ``x̃ = x.float() / input_scale.float()``;
* exempt channels (``keep == False``) are zero in what the activation quantizer sees;
* activation codes: ``qmax = 2^(a-1) - 1``, ``scale_t = max(max_c |x̃_tc ⊙ keep_c| / qmax, 1e-12)``,
  ``q = clamp(round_half_even(x̃ / scale_t), -qmax, qmax)`` as int8;
* packed weights: :mod:`qe.packing`; ``W[o, c] = (code - zero[o, g(c)]) · scale[o, g(c)]``;
* integer-activation GEMMs are exact: the twin accumulates in float64, where every product
  ``q · (code - zero) · scale`` and the sum over 18944 inputs are exact to well below fp32's
  resolution (fp32 itself stops being exact past 2^24);
* low-rank terms and the router read the unquantized ``x̃`` in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qe.packing import unpack
from qe.quantized import dequantize
from qe.transforms.hadamard import sylvester_butterflies

ACT_SCALE_FLOOR = 1e-12  # the same floor as qe.quantizers.grid


def smooth(x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
    """``x̃ = x / s`` in fp32 ``(T, d_in)``."""
    xs = x.float()
    return xs / input_scale.float() if input_scale is not None else xs


def dequantize_packed(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int, d_in: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(d_out, d_in)`` weight ``(code - zero) · scale`` from the packed layout."""
    return dequantize(unpack(qweight, bits, d_in), scales, zeros, group_size, dtype)


# --------------------------------------------------------------------------- prologue


def quantize_activations(
    x: torch.Tensor, bits: int, input_scale: torch.Tensor | None = None, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic symmetric quantization of ``x̃ ⊙ keep``: codes ``(T, d_in)`` int8 and
    scales ``(T,)`` fp32 with ``x̃ ⊙ keep ≈ codes · scales[:, None]``."""
    xs = smooth(x, input_scale)
    if keep is not None:
        xs = torch.where(keep, xs, torch.zeros((), dtype=xs.dtype, device=xs.device))
    qmax = 2 ** (bits - 1) - 1
    scale = (xs.abs().amax(dim=-1) / qmax).clamp_min(ACT_SCALE_FLOOR)  # (T,)
    codes = torch.round(xs / scale[:, None]).clamp_(-qmax, qmax).to(torch.int8)
    return codes, scale


def shared_down_and_route(
    x: torch.Tensor,
    shared_b: torch.Tensor | None,
    router: torch.Tensor | None,
    input_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Shared down-projection ``u = x̃ B_sᵀ`` ``(T, r_s)`` fp32 and the router's choice
    ``i* = argmin_i (R |x̃|)_i`` ``(T,)`` int32 (first index on ties)."""
    xs = smooth(x, input_scale)
    u = xs @ shared_b.float().T if shared_b is not None else None
    expert = None
    if router is not None:
        expert = torch.argmin(xs.abs() @ router.float().T, dim=-1).to(torch.int32)
    return u, expert


def qe_prologue(
    x: torch.Tensor,
    a_bits: int,
    input_scale: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    shared_b: torch.Tensor | None = None,
    router: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Everything a QE layer reads from ``x`` before its GEMMs, in one pass over ``x``:
    ``(codes, x_scales, u_shared, expert)`` as in :func:`quantize_activations` and
    :func:`shared_down_and_route`."""
    codes, x_scales = quantize_activations(x, a_bits, input_scale, keep)
    u, expert = shared_down_and_route(x, shared_b, router, input_scale)
    return codes, x_scales, u, expert


# --------------------------------------------------------------------------- GEMMs


def _epilogue(
    y: torch.Tensor,
    bias: torch.Tensor | None,
    shared_u: torch.Tensor | None,
    shared_a: torch.Tensor | None,
) -> torch.Tensor:
    if bias is not None:
        y = y + bias.to(y.dtype)
    if shared_u is not None:
        y = y + shared_u.to(y.dtype) @ shared_a.to(y.dtype).T  # (T, r_s)(r_s, d_out)
    return y


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
    """W<b>A16: ``y = x̃ Wᵀ + bias + u A_sᵀ`` ``(T, d_out)`` in ``x.dtype``, computed in fp32."""
    w = dequantize_packed(qweight, scales, zeros, bits, group_size, x.shape[-1])  # (d_out, d_in)
    y = F.linear(smooth(x, input_scale), w)
    return _epilogue(y, bias, shared_u, shared_a).to(x.dtype)


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
    """W<b>A<a> with integer activation codes: ``y_t = s_t · Σ_g s_w[:, g] · (q_t,g · (code - zero)_gᵀ)``
    ``+ bias + u A_sᵀ``, ``(T, d_out)`` in ``out_dtype``.

    Accumulates in float64, which is exact here (see the module notes); ``symmetric`` is a
    hint the kernel uses to skip the zero-point correction and changes nothing in the result.
    """
    w = dequantize_packed(qweight, scales, zeros, bits, group_size, codes.shape[-1], torch.float64)
    y = F.linear(codes.to(torch.float64), w) * x_scales.to(torch.float64)[:, None]
    return _epilogue(y, bias, shared_u, shared_a).to(out_dtype)


# --------------------------------------------------------------------------- routed experts


def sort_by_expert(expert: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens grouped by expert: ``perm`` ``(T,)`` (token indices, stable within an expert) and
    ``offsets`` ``(n_experts + 1,)`` so that expert ``i`` serves ``perm[offsets[i]:offsets[i+1]]``.

    Shared by both backends; no host synchronisation, so it is safe inside CUDA graphs.
    """
    perm = torch.sort(expert.to(torch.int64), stable=True).indices
    counts = torch.zeros(n_experts, dtype=torch.int64, device=expert.device)
    counts.index_add_(0, expert.to(torch.int64), torch.ones_like(perm))
    offsets = torch.zeros(n_experts + 1, dtype=torch.int64, device=expert.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return perm, offsets


def routed_lowrank(
    x: torch.Tensor,
    expert: torch.Tensor,
    routed_a: torch.Tensor,
    routed_b: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed term ``y_t = A_{i*_t} (B_{i*_t} x̃_t)`` with ``A (N, d_out, r)``, ``B (N, r, d_in)``.

    Computed grouped by expert (one matmul pair per expert, never per token). With ``out``
    the term is added to ``out`` in place and ``out`` is returned; otherwise a new tensor in
    ``x.dtype`` is.
    """
    n_experts, d_out = routed_a.shape[0], routed_a.shape[1]
    xs = smooth(x, input_scale)
    perm, offsets = sort_by_expert(expert, n_experts)
    y = torch.zeros(x.shape[0], d_out, dtype=torch.float32, device=x.device)
    bounds = offsets.tolist()
    for i in range(n_experts):
        rows = perm[bounds[i]:bounds[i + 1]]
        if rows.numel():
            v = xs[rows] @ routed_b[i].float().T  # (T_i, r)
            y[rows] = v @ routed_a[i].float().T  # (T_i, d_out)
    if out is None:
        return y.to(x.dtype)
    out.copy_(out.float() + y)  # the sum in fp32, rounded once, as the kernel does
    return out


# --------------------------------------------------------------------------- online Hadamard


def hadamard_transform(x: torch.Tensor, signs: torch.Tensor | None, p: int, small: torch.Tensor | None) -> torch.Tensor:
    """``((x ⊙ signs) (H_p ⊗ H_m)) / √n`` ``(T, n)`` in ``x.dtype``, computed in fp32: the dense
    ``H_m`` (``small``, ±1 ``(m, m)``, None when ``m = 1``) on the last axis of ``x`` seen as
    ``(T, p, m)``, then the fast Walsh–Hadamard transform (Sylvester's ``H_p``) on the middle
    axis, ``log2 p`` butterfly stages."""
    t, n = x.shape
    m = n // p
    y = x.float()
    if signs is not None:
        y = y * signs.float()
    y = y.reshape(t, p, m)
    if small is not None:
        y = y @ small.float()
    return (sylvester_butterflies(y).reshape(t, n) * n ** -0.5).to(x.dtype)
