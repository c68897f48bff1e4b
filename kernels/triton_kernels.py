"""Triton kernels of the quantized QE forward.

Imported lazily by :mod:`qe.kernels.ops` (never at ``import qe.kernels``), so that the package
works without triton, and so that ``TRITON_INTERPRET=1`` only has to be set before the first
Triton call rather than before the first import. Every launcher here has the signature of its
torch twin in :mod:`qe.kernels.reference` and takes 2-D, already validated inputs.

Four kernels:

* ``_prologue_kernel``: one pass over ``x`` per tile of tokens: smoothing ``x̃ = x / s``, the
  ``keep`` mask, the per-token absolute maximum, the shared down-projection ``x̃ B_sᵀ`` and the
  router logits ``|x̃| Rᵀ`` with their argmin; a second pass over the tile writes int8 codes.
* ``_linear_kernel``: packed b-bit weights unpacked in registers; integer activations
  (int8 × int8 → int32 per group, zero points corrected exactly in integers) or float
  activations (fp16/bf16/fp32 against the exact small integers ``code - zero``); per-group
  scales in the epilogue, then the per-token scale, the bias and the shared term ``u A_sᵀ``.
* ``_routed_down_kernel`` / ``_routed_up_kernel``: a grouped GEMM over tokens sorted by
  expert; each program finds its (expert, row range) from the expert offsets, so the launch
  needs no host synchronisation.
"""

from __future__ import annotations

import math
import os
import statistics
import time

import torch
import triton
import triton.language as tl

# Whether the kernels below were defined in interpreter mode (fixed when this module loads).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# tl.dot needs every dimension ≥ 16 when compiled; tiles smaller than that are padded.
MIN_DOT = 16


def _pow2_at_least(n: int, floor: int = MIN_DOT) -> int:
    return max(floor, triton.next_power_of_2(max(int(n), 1)))


# Tests set this to exercise the split-K paths under the interpreter (None: the heuristic).
FORCE_SPLIT_K: int | None = None


def _split_k(device: torch.device, programs: int, K: int, unit: int) -> tuple[int, int]:
    """``(splits, k_per_split)`` of the reduction over ``K`` for a launch of ``programs``
    output tiles: split when the tiles alone would leave most of the GPU idle (decoding a few
    tokens through a wide layer), keeping ≥ 4 tiles of ``unit`` inputs per split.
    ``k_per_split`` is a multiple of ``unit`` (which the caller makes a multiple of BK and of
    the weight group size)."""
    units = triton.cdiv(K, unit)
    if FORCE_SPLIT_K is not None:
        wanted = FORCE_SPLIT_K
    elif device.type != "cuda":
        wanted = 1
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = 1 if programs >= sms else min(triton.cdiv(2 * sms, programs), units // 4)
    wanted = max(1, min(wanted, units))
    k_per_split = triton.cdiv(units, wanted) * unit
    return triton.cdiv(K, k_per_split), k_per_split


# --------------------------------------------------------------------------- device helpers


@triton.jit
def _round_half_even(v):
    """``torch.round`` (half to even) in fp32, exact for every finite input."""
    r = tl.floor(v)
    frac = v - r  # exact: the fractional part of an fp32 is representable
    r_is_odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where((frac > 0.5) | ((frac == 0.5) & r_is_odd), r + 1.0, r)


@triton.jit
def _load_smoothed(x_ptr, in_scale_ptr, rows, ks, row_ok, k_ok, stride_xt, HAS_IN_SCALE: tl.constexpr):
    """``(BM, BK)`` tile of ``x̃ = x / s`` in fp32 (zero outside the matrix)."""
    m = row_ok[:, None] & k_ok[None, :]
    xt = tl.load(x_ptr + rows[:, None] * stride_xt + ks[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_IN_SCALE:
        s = tl.load(in_scale_ptr + ks, mask=k_ok, other=1.0).to(tl.float32)
        xt = tl.div_rn(xt, s[None, :])  # IEEE division, as torch does (plain '/' is approximate on GPU)
    return xt


@triton.jit
def _load_codes(qw_ptr, ns, ks, n_ok, k_ok, row_bytes, BITS: tl.constexpr):
    """``(BK, BN)`` tile of weight codes (int32) for output rows ``ns`` and inputs ``ks``.

    Packed layout (qe.packing): code c of a row sits at bits ``c·b … c·b + b - 1``
    of the row's little-endian bit stream, so it starts in byte ``c·b // 8`` at bit ``c·b % 8``
    and, for widths that do not divide 8, may run into the next byte.
    """
    bit = ks * BITS
    byte = bit // 8
    shift = bit % 8
    base = qw_ptr + ns[None, :].to(tl.int64) * row_bytes + byte[:, None]
    m = k_ok[:, None] & n_ok[None, :]
    word = tl.load(base, mask=m, other=0).to(tl.int32)
    if (8 % BITS) != 0:
        hi_ok = m & ((byte + 1) < row_bytes)[:, None]
        word = word | (tl.load(base + 1, mask=hi_ok, other=0).to(tl.int32) << 8)
    return (word >> shift[:, None]) & ((1 << BITS) - 1)


# --------------------------------------------------------------------------- prologue


@triton.jit
def _prologue_kernel(
    x_ptr, in_scale_ptr, keep_ptr, b_ptr, r_ptr,
    codes_ptr, xscale_ptr, u_ptr, expert_ptr, logits_ptr,
    T, K, RS, NE, qmax, k_per_split,
    stride_xt, stride_ct, stride_b, stride_r, stride_u,
    HAS_IN_SCALE: tl.constexpr, HAS_KEEP: tl.constexpr,
    QUANT: tl.constexpr, SHARED: tl.constexpr, ROUTE: tl.constexpr, SPLIT_K: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, RS_BLOCK: tl.constexpr, NE_BLOCK: tl.constexpr,
):
    """With SPLIT_K > 1 (few tokens, wide input) program (m, k) covers one slice of d_in and
    adds its partial ``u`` and router logits atomically; it then never quantizes (the scale
    needs the whole row) and leaves the argmin to the caller."""
    pid = tl.program_id(0)
    k_lo = tl.program_id(1) * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    rows = pid * BM + tl.arange(0, BM)
    row_ok = rows < T
    rows = rows.to(tl.int64)  # T·K can pass 2^31
    rs_idx = tl.arange(0, RS_BLOCK)
    ne_idx = tl.arange(0, NE_BLOCK)
    amax = tl.zeros((BM,), tl.float32)
    u_acc = tl.zeros((BM, RS_BLOCK), tl.float32)
    r_acc = tl.zeros((BM, NE_BLOCK), tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < k_hi
        xt = _load_smoothed(x_ptr, in_scale_ptr, rows, ks, row_ok, k_ok, stride_xt, HAS_IN_SCALE)
        if SHARED:  # u += x̃ B_sᵀ ; the tile of B_sᵀ is (BK, RS_BLOCK)
            bt = tl.load(b_ptr + rs_idx[None, :] * stride_b + ks[:, None],
                         mask=k_ok[:, None] & (rs_idx[None, :] < RS), other=0.0).to(tl.float32)
            u_acc = tl.dot(xt, bt, u_acc, input_precision="tf32")
        if ROUTE:  # logits += |x̃| Rᵀ
            rt = tl.load(r_ptr + ne_idx[None, :] * stride_r + ks[:, None],
                         mask=k_ok[:, None] & (ne_idx[None, :] < NE), other=0.0).to(tl.float32)
            r_acc = tl.dot(tl.abs(xt), rt, r_acc, input_precision="tf32")
        if QUANT:
            if HAS_KEEP:
                keep = tl.load(keep_ptr + ks, mask=k_ok, other=0)
                xt = tl.where(keep[None, :] != 0, xt, 0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(xt), axis=1))
    if SHARED:
        u_at = u_ptr + rows[:, None] * stride_u + rs_idx[None, :]
        u_ok = row_ok[:, None] & (rs_idx[None, :] < RS)
        if SPLIT_K == 1:
            tl.store(u_at, u_acc, mask=u_ok)
        else:
            tl.atomic_add(u_at, u_acc, mask=u_ok)
    if ROUTE and SPLIT_K > 1:
        tl.atomic_add(logits_ptr + rows[:, None] * NE + ne_idx[None, :], r_acc,
                      mask=row_ok[:, None] & (ne_idx[None, :] < NE))
    if ROUTE and SPLIT_K == 1:
        logits = tl.where(ne_idx[None, :] < NE, r_acc, float("inf"))
        best = tl.min(logits, axis=1)
        first = tl.min(tl.where(logits == best[:, None], ne_idx[None, :], NE_BLOCK), axis=1)
        first = tl.minimum(first, NE - 1)  # all-NaN rows would find no minimum
        tl.store(expert_ptr + rows, first.to(tl.int32), mask=row_ok)
    if QUANT:
        scale = tl.maximum(tl.div_rn(amax, tl.zeros_like(amax) + qmax), 1e-12)  # (BM,)
        tl.store(xscale_ptr + rows, scale, mask=row_ok)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < K
            xt = _load_smoothed(x_ptr, in_scale_ptr, rows, ks, row_ok, k_ok, stride_xt, HAS_IN_SCALE)
            if HAS_KEEP:
                keep = tl.load(keep_ptr + ks, mask=k_ok, other=0)
                xt = tl.where(keep[None, :] != 0, xt, 0.0)
            q = _round_half_even(tl.div_rn(xt, scale[:, None] + tl.zeros_like(xt)))
            q = tl.minimum(tl.maximum(q, -qmax), qmax)
            tl.store(codes_ptr + rows[:, None] * stride_ct + ks[None, :], q.to(tl.int8),
                     mask=row_ok[:, None] & k_ok[None, :])


def _prologue_block_m(tokens: int) -> int:
    return min(64, _pow2_at_least(tokens))


def qe_prologue(x, a_bits, input_scale=None, keep=None, shared_b=None, router=None):
    return _prologue(x, a_bits, input_scale, keep, shared_b, router, quant=True)


def quantize_activations(x, bits, input_scale=None, keep=None):
    codes, scales, _, _ = _prologue(x, bits, input_scale, keep, None, None, quant=True)
    return codes, scales


def shared_down_and_route(x, shared_b, router, input_scale=None):
    _, _, u, expert = _prologue(x, 16, input_scale, None, shared_b, router, quant=False)
    return u, expert


def _prologue(x, a_bits, input_scale, keep, shared_b, router, *, quant: bool):
    x = x.contiguous()
    T, K = x.shape
    dev = x.device
    quant = quant and a_bits < 16
    codes = torch.empty(T, K, dtype=torch.int8, device=dev) if quant else None
    x_scales = torch.empty(T, dtype=torch.float32, device=dev) if quant else None
    rs = shared_b.shape[0] if shared_b is not None else 0
    ne = router.shape[0] if router is not None else 0
    if not (quant or shared_b is not None or router is not None) or T == 0:
        u = torch.zeros(T, rs, dtype=torch.float32, device=dev) if shared_b is not None else None
        return codes, x_scales, u, torch.zeros(T, dtype=torch.int32, device=dev) if router is not None else None
    shared_b = shared_b.contiguous() if shared_b is not None else None
    router = router.contiguous() if router is not None else None
    keep_u8 = keep.contiguous().view(torch.uint8) if keep is not None else None
    bm, bk = _prologue_block_m(T), (128 if K >= 128 else 64)
    split, k_per_split = (1, K) if not (rs or ne) else _split_k(dev, triton.cdiv(T, bm), K, bk)
    u = None
    if shared_b is not None:  # split-K adds partial sums into it
        u = (torch.empty if split == 1 else torch.zeros)(T, rs, dtype=torch.float32, device=dev)
    expert = torch.empty(T, dtype=torch.int32, device=dev) if router is not None else None
    logits = torch.zeros(T, ne, dtype=torch.float32, device=dev) if router is not None and split > 1 else None
    dummy = x  # stands in for absent pointers; never read (its branch is compiled out)

    def launch(do_quant, do_lowrank, n_split, per_split):
        _prologue_kernel[(triton.cdiv(T, bm), n_split)](
            x, input_scale if input_scale is not None else dummy, keep_u8 if keep_u8 is not None else dummy,
            shared_b if shared_b is not None else dummy, router if router is not None else dummy,
            codes if codes is not None else dummy, x_scales if x_scales is not None else dummy,
            u if u is not None else dummy, expert if expert is not None else dummy,
            logits if logits is not None else dummy,
            T, K, rs, ne, float(2 ** (a_bits - 1) - 1) if quant else 1.0, per_split,
            x.stride(0), K, K, K, max(rs, 1),
            HAS_IN_SCALE=input_scale is not None, HAS_KEEP=keep is not None,
            QUANT=do_quant, SHARED=do_lowrank and shared_b is not None, ROUTE=do_lowrank and router is not None,
            SPLIT_K=n_split, BM=bm, BK=bk, RS_BLOCK=_pow2_at_least(rs), NE_BLOCK=_pow2_at_least(ne),
        )

    if split == 1:
        launch(quant, True, 1, K)
    else:  # quantization needs whole rows: its own pass; the low-rank reductions split d_in
        if quant:
            launch(True, False, 1, K)
        launch(False, True, split, k_per_split)
        if logits is not None:
            expert = logits.argmin(dim=1).to(torch.int32)  # first index on ties, as the kernel
    return codes, x_scales, u, expert


# --------------------------------------------------------------------------- low-bit GEMM


@triton.jit
def _linear_kernel(
    x_ptr, xscale_ptr, in_scale_ptr, qw_ptr, ws_ptr, wz_ptr, bias_ptr, u_ptr, a_ptr, y_ptr,
    T, N, K, n_groups, group_size, row_bytes, RS, m_bucket, k_per_split,
    stride_xt, stride_ut, stride_yt,
    BITS: tl.constexpr, INT_ACT: tl.constexpr, ASYM: tl.constexpr, HAS_IN_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, SHARED: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr, RS_BLOCK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """Program (m, n, k) computes a (BM, BN) tile over the k-th slice of the inputs (the whole
    row unless SPLIT_K > 1, when slices add atomically into an fp32 output that starts at zero;
    slices are whole groups, or any multiple of BK for one group per row)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    rows = pid_m * BM + tl.arange(0, BM)
    ns = pid_n * BN + tl.arange(0, BN)
    row_ok = rows < T
    n_ok = ns < N
    rows = rows.to(tl.int64)
    mid: tl.constexpr = 1 << (BITS - 1)  # codes are stored centred on 2^(b-1)
    acc = tl.zeros((BM, BN), tl.float32)  # Σ_g scale_g · acc_g
    for g in range(k_lo // group_size, (k_hi + group_size - 1) // group_size):
        g_lo = tl.maximum(g * group_size, k_lo)
        g_hi = tl.minimum((g + 1) * group_size, k_hi)
        zero_g = tl.load(wz_ptr + ns * n_groups + g, mask=n_ok, other=0.0)  # (BN,)
        if INT_ACT:
            acc_g = tl.zeros((BM, BN), tl.int32)
            q_sum = tl.zeros((BM,), tl.int32)  # Σ_{c∈g} q_tc, for the zero-point correction
        else:
            acc_g = tl.zeros((BM, BN), tl.float32)
        for k0 in range(g_lo, g_hi, BK):  # BK divides group_size: no block straddles groups
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < g_hi
            codes = _load_codes(qw_ptr, ns, ks, n_ok, k_ok, row_bytes, BITS)  # (BK, BN)
            if INT_ACT:
                q = tl.load(x_ptr + rows[:, None] * stride_xt + ks[None, :],
                            mask=row_ok[:, None] & k_ok[None, :], other=0)  # (BM, BK) int8
                acc_g = tl.dot(q, (codes - mid).to(tl.int8), acc_g, out_dtype=tl.int32)
                if ASYM:
                    q_sum += tl.sum(q.to(tl.int32), axis=1)
            else:
                xt = _load_smoothed(x_ptr, in_scale_ptr, rows, ks, row_ok, k_ok, stride_xt, HAS_IN_SCALE)
                w = (codes.to(tl.float32) - zero_g[None, :]).to(DOT_DTYPE)  # small integers: exact
                acc_g = tl.dot(xt.to(DOT_DTYPE), w, acc_g, input_precision=PRECISION)
        if INT_ACT and ASYM:
            # Σ q (code - zero) = Σ q (code - mid) + (mid - zero) Σ q, all in int32
            acc_g += q_sum[:, None] * (mid - zero_g).to(tl.int32)[None, :]
        scale_g = tl.load(ws_ptr + ns * n_groups + g, mask=n_ok, other=0.0)
        acc += acc_g.to(tl.float32) * scale_g[None, :]
    if INT_ACT:
        acc = acc * tl.load(xscale_ptr + rows, mask=row_ok, other=0.0)[:, None]
    # the bias and the shared term are added once, by the first slice (as block masks: the
    # interpreter rejects a scalar condition inside a mask)
    first_m = (tl.zeros((BM,), tl.int32) + pid_k) == 0
    if HAS_BIAS:
        first_n = (tl.zeros((BN,), tl.int32) + pid_k) == 0
        acc += tl.load(bias_ptr + ns, mask=n_ok & first_n, other=0.0).to(tl.float32)[None, :]
    if SHARED:  # + u A_sᵀ: (BM, r_s) · (r_s, BN)
        rs_idx = tl.arange(0, RS_BLOCK)
        u = tl.load(u_ptr + rows[:, None] * stride_ut + rs_idx[None, :],
                    mask=(row_ok & first_m)[:, None] & (rs_idx[None, :] < RS), other=0.0)
        a_t = tl.load(a_ptr + ns[None, :].to(tl.int64) * RS + rs_idx[:, None],
                      mask=n_ok[None, :] & (rs_idx[:, None] < RS), other=0.0).to(tl.float32)
        acc = tl.dot(u, a_t, acc, input_precision="tf32")
    y_at = y_ptr + rows[:, None] * stride_yt + ns[None, :]
    if SPLIT_K == 1:
        tl.store(y_at, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])
    else:
        tl.atomic_add(y_at, acc, mask=row_ok[:, None] & n_ok[None, :])


def _cpu_bench(fn, quantiles=None, **_):
    """Triton's default do_bench needs a GPU driver; under the interpreter time on the CPU."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    med = statistics.median(times)
    return [med, times[0], times[-1]] if quantiles else med


def _linear_configs() -> list[triton.Config]:
    """A short list per token-count bucket (each config is one compile on first use)."""
    shapes = [  # (BM, BN, BK, warps, stages)
        (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 64, 4, 5),
        (32, 64, 128, 4, 4), (32, 128, 64, 4, 3),
        (64, 64, 128, 4, 4), (64, 128, 64, 4, 3), (64, 128, 128, 8, 3),
        (128, 128, 64, 8, 3), (128, 64, 128, 4, 4), (128, 128, 128, 8, 3),
    ]
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=st) for bm, bn, bk, w, st in shapes]


def _prune_linear_configs(configs, named_args, **kwargs):
    """Keep the tile heights that suit the token count, and give every config a BK that
    divides the group size (a K tile must never straddle two groups)."""
    group_size, n_groups, m_bucket = named_args["group_size"], named_args["n_groups"], named_args["m_bucket"]
    top = max(MIN_DOT, m_bucket)
    low = max(MIN_DOT, min(top // 4, 32))
    kept, seen = [], set()
    for c in configs:
        bm, bn, bk = c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"]
        if not low <= bm <= top:
            continue
        bk = block_k_for_group(group_size, n_groups, preferred=bk)
        if (bm, bn, bk) in seen:
            continue
        seen.add((bm, bn, bk))
        kept.append(triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=c.num_warps, num_stages=c.num_stages))
    return kept


_tuned_linear = triton.autotune(
    configs=_linear_configs(), key=["m_bucket", "N", "K", "group_size", "n_groups", "k_per_split"],
    prune_configs_by={"early_config_prune": _prune_linear_configs},
    reset_to_zero=["y_ptr"],  # split-K accumulates into y: every timed run must start from zero
    do_bench=_cpu_bench if INTERPRET else None,
)(_linear_kernel)


def _autotune_enabled() -> bool:
    # Autotuning under the interpreter works (with the CPU timer) but multiplies test time.
    return not INTERPRET or os.environ.get("QE_KERNELS_AUTOTUNE", "0") == "1"


def block_k_for_group(group_size: int, n_groups: int, preferred: int = 64) -> int | None:
    """The K tile: a power of two ≥ 16 dividing ``group_size`` (None if there is none)."""
    if n_groups == 1:
        return preferred
    for bk in (preferred, 64, 32, 16):
        if bk <= preferred and group_size % bk == 0:
            return bk
    return None


def _dot_dtype(dtype: torch.dtype):
    if dtype == torch.float16:
        return tl.float16, "ieee"
    if dtype == torch.bfloat16 and not INTERPRET:  # the interpreter computes bf16 wrongly
        return tl.bfloat16, "ieee"
    return tl.float32, "ieee"


def _launch_linear(x, x_scales, input_scale, qweight, scales, zeros, bits, group_size, asym, bias,
                   shared_u, shared_a, out_dtype):
    T, K = x.shape
    N = qweight.shape[0]
    n_groups = scales.shape[1]
    gs = K if n_groups == 1 else group_size
    if T == 0:
        return torch.empty(T, N, dtype=out_dtype, device=x.device)
    # slices of the reduction are multiples of the largest BK (128) and of the group size
    unit = 128 if n_groups == 1 else math.lcm(128, gs)
    split, k_per_split = _split_k(x.device, triton.cdiv(T, 64) * triton.cdiv(N, 64), K, unit)
    y = (torch.empty(T, N, dtype=out_dtype, device=x.device) if split == 1
         else torch.zeros(T, N, dtype=torch.float32, device=x.device))
    int_act = x_scales is not None
    rs = shared_a.shape[1] if shared_a is not None else 0
    dot_dtype, precision = _dot_dtype(x.dtype)
    dummy = scales
    args = (
        x, x_scales if int_act else dummy, input_scale if input_scale is not None else dummy,
        qweight, scales, zeros, bias if bias is not None else dummy,
        shared_u if shared_u is not None else dummy, shared_a if shared_a is not None else dummy, y,
        T, N, K, n_groups, gs, qweight.shape[1], rs, min(128, triton.next_power_of_2(T)), k_per_split,
        x.stride(0), shared_u.stride(0) if shared_u is not None else 0, y.stride(0),
    )
    flags = dict(
        BITS=bits, INT_ACT=int_act, ASYM=asym, HAS_IN_SCALE=input_scale is not None, HAS_BIAS=bias is not None,
        SHARED=shared_u is not None, DOT_DTYPE=dot_dtype, PRECISION=precision, SPLIT_K=split,
        RS_BLOCK=_pow2_at_least(rs),
    )
    if _autotune_enabled():
        def grid(meta):
            return triton.cdiv(T, meta["BM"]), triton.cdiv(N, meta["BN"]), split
        _tuned_linear[grid](*args, **flags)
    else:
        bm, bn, bk = min(64, _pow2_at_least(T)), 64, block_k_for_group(gs, n_groups)
        _linear_kernel[(triton.cdiv(T, bm), triton.cdiv(N, bn), split)](*args, **flags, BM=bm, BN=bn, BK=bk)
    return y if y.dtype == out_dtype else y.to(out_dtype)


def _contiguous(*ts):
    return [t.contiguous() if t is not None else None for t in ts]


def weight_only_linear(x, qweight, scales, zeros, *, bits, group_size, input_scale=None, bias=None,
                       shared_u=None, shared_a=None):
    x, qweight, scales, zeros, input_scale, bias, shared_u, shared_a = _contiguous(
        x, qweight, scales, zeros, input_scale, bias, shared_u, shared_a)
    return _launch_linear(x, None, input_scale, qweight, scales.float(), zeros.float(), bits, group_size, False,
                          bias, shared_u, shared_a, x.dtype)


def quantized_linear(codes, x_scales, qweight, scales, zeros, *, bits, group_size, symmetric=None, bias=None,
                     shared_u=None, shared_a=None, out_dtype=torch.float32):
    codes, x_scales, qweight, scales, zeros, bias, shared_u, shared_a = _contiguous(
        codes, x_scales, qweight, scales, zeros, bias, shared_u, shared_a)
    if symmetric is None:  # a host synchronisation: pass `symmetric` on hot paths
        symmetric = bool((zeros == 2 ** (bits - 1)).all())
    return _launch_linear(codes, x_scales.float(), None, qweight, scales.float(), zeros.float(), bits, group_size,
                          not symmetric, bias, shared_u, shared_a, out_dtype)


# --------------------------------------------------------------------------- routed experts


@triton.jit
def _expert_tile(offsets_ptr, pid, NE, BM: tl.constexpr, NE_BLOCK: tl.constexpr):
    """The expert served by tile ``pid`` of the grouped GEMM and that tile's rows
    ``[start, end)`` in expert-sorted order (``expert == NE_BLOCK`` past the last tile)."""
    e_idx = tl.arange(0, NE_BLOCK)
    e_ok = e_idx < NE
    starts = tl.load(offsets_ptr + e_idx, mask=e_ok, other=0)
    ends = tl.load(offsets_ptr + e_idx + 1, mask=e_ok, other=0)
    tiles = (ends - starts + BM - 1) // BM
    tiles_through = tl.cumsum(tiles, 0)  # tiles of experts 0..i
    expert = tl.sum((tiles_through <= pid).to(tl.int32), 0)
    mine = e_idx == expert
    first_tile = tl.sum(tl.where(mine, tiles_through - tiles, 0), 0)
    start = tl.sum(tl.where(mine, starts, 0), 0) + (pid - first_tile) * BM
    end = tl.sum(tl.where(mine, ends, 0), 0)
    return expert, start, end


@triton.jit
def _routed_down_kernel(
    x_ptr, in_scale_ptr, perm_ptr, offsets_ptr, b_ptr, v_ptr,
    K, R, NE, k_per_split, stride_xt, stride_be,
    HAS_IN_SCALE: tl.constexpr, SPLIT_K: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, R_BLOCK: tl.constexpr, NE_BLOCK: tl.constexpr,
):
    """``v[j] = B_e x̃[perm[j]]`` for the sorted rows j of expert e: ``(BM, R)`` per tile
    (over the k-th slice of the inputs, added atomically, when SPLIT_K > 1)."""
    expert, start, end = _expert_tile(offsets_ptr, tl.program_id(0), NE, BM, NE_BLOCK)
    if expert >= NE:
        return
    j = start + tl.arange(0, BM)
    j_ok = j < end
    tok = tl.load(perm_ptr + j, mask=j_ok, other=0)
    r_idx = tl.arange(0, R_BLOCK)
    b_base = b_ptr + expert.to(tl.int64) * stride_be
    k_lo = tl.program_id(1) * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros((BM, R_BLOCK), tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < k_hi
        xt = _load_smoothed(x_ptr, in_scale_ptr, tok, ks, j_ok, k_ok, stride_xt, HAS_IN_SCALE)
        bt = tl.load(b_base + r_idx[None, :] * K + ks[:, None],
                     mask=k_ok[:, None] & (r_idx[None, :] < R), other=0.0).to(tl.float32)  # (BK, R_BLOCK)
        acc = tl.dot(xt, bt, acc, input_precision="tf32")
    v_at = v_ptr + j[:, None] * R + r_idx[None, :]
    if SPLIT_K == 1:
        tl.store(v_at, acc, mask=j_ok[:, None] & (r_idx[None, :] < R))
    else:
        tl.atomic_add(v_at, acc, mask=j_ok[:, None] & (r_idx[None, :] < R))


@triton.jit
def _routed_up_kernel(
    v_ptr, perm_ptr, offsets_ptr, a_ptr, out_ptr,
    N, R, NE, stride_ae, stride_ot,
    ACCUMULATE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, R_BLOCK: tl.constexpr, NE_BLOCK: tl.constexpr,
):
    """``out[perm[j]] (+)= A_e v[j]``; every (token, column) belongs to one tile, so no atomics."""
    expert, start, end = _expert_tile(offsets_ptr, tl.program_id(0), NE, BM, NE_BLOCK)
    if expert >= NE:
        return
    j = start + tl.arange(0, BM)
    j_ok = j < end
    tok = tl.load(perm_ptr + j, mask=j_ok, other=0)
    ns = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = ns < N
    r_idx = tl.arange(0, R_BLOCK)
    v = tl.load(v_ptr + j[:, None] * R + r_idx[None, :], mask=j_ok[:, None] & (r_idx[None, :] < R), other=0.0)
    a_t = tl.load(a_ptr + expert.to(tl.int64) * stride_ae + ns[None, :] * R + r_idx[:, None],
                  mask=n_ok[None, :] & (r_idx[:, None] < R), other=0.0).to(tl.float32)  # (R_BLOCK, BN)
    acc = tl.dot(v, a_t, input_precision="tf32")
    out_at = out_ptr + tok[:, None] * stride_ot + ns[None, :]
    m = j_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out_at, mask=m, other=0.0).to(tl.float32)
    tl.store(out_at, acc.to(out_ptr.dtype.element_ty), mask=m)


def sort_by_expert(expert, n_experts):
    from qe.kernels.reference import sort_by_expert as _sort

    return _sort(expert, n_experts)


def routed_lowrank(x, expert, routed_a, routed_b, input_scale=None, out=None):
    x, routed_a, routed_b, input_scale = _contiguous(x, routed_a, routed_b, input_scale)
    T, K = x.shape
    ne, d_out, r = routed_a.shape
    accumulate = out is not None
    if out is None:
        out = torch.empty(T, d_out, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    perm, offsets = sort_by_expert(expert, ne)
    bm, bk = min(64, _pow2_at_least(T)), (128 if K >= 128 else 64)
    max_tiles = triton.cdiv(T, bm) + ne  # Σ_i ceil(T_i / bm) never exceeds this
    # at most min(T, N_r) tiles do work: split the reduction over d_in when they are few
    split, k_per_split = _split_k(x.device, min(triton.cdiv(T, bm) + ne, T), K, bk)
    v = (torch.empty if split == 1 else torch.zeros)(T, r, dtype=torch.float32, device=x.device)  # sorted order
    r_block, ne_block = _pow2_at_least(r), _pow2_at_least(ne)
    _routed_down_kernel[(max_tiles, split)](
        x, input_scale if input_scale is not None else x, perm, offsets, routed_b, v,
        K, r, ne, k_per_split, x.stride(0), routed_b.stride(0),
        HAS_IN_SCALE=input_scale is not None, SPLIT_K=split, BM=bm, BK=bk, R_BLOCK=r_block, NE_BLOCK=ne_block,
    )
    bn = 64
    _routed_up_kernel[(max_tiles, triton.cdiv(d_out, bn))](
        v, perm, offsets, routed_a, out, d_out, r, ne, routed_a.stride(0), out.stride(0),
        ACCUMULATE=accumulate, BM=bm, BN=bn, R_BLOCK=r_block, NE_BLOCK=ne_block,
    )
    return out


# --------------------------------------------------------------------------- online Hadamard


@triton.jit
def _fwht_kernel(x_ptr, signs_ptr, out_ptr, n, M, scale, P: tl.constexpr, LOG_P: tl.constexpr, BM: tl.constexpr,
                 HAS_SIGNS: tl.constexpr):
    """One program per (token, block of BM columns of the m axis): the token's row seen as
    ``(P, M)``; ``x ⊙ signs`` is written to the fp32 output, then ``LOG_P`` butterfly stages
    along the P axis read each element's partner ``a ^ h`` back from the output (barriers
    between the reads and the writes of a stage), and the result is scaled."""
    t = tl.program_id(0)
    a = tl.arange(0, P)[:, None]
    b = tl.program_id(1) * BM + tl.arange(0, BM)[None, :]
    ok = (b < M) & (a < P)
    offs = a * M + b
    row_in = x_ptr + t.to(tl.int64) * n
    row_out = out_ptr + t.to(tl.int64) * n
    v = tl.load(row_in + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_SIGNS:
        v = v * tl.load(signs_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(row_out + offs, v, mask=ok)
    for s in tl.static_range(LOG_P):
        h = 1 << s
        tl.debug_barrier()
        partner = tl.load(row_out + (a ^ h) * M + b, mask=ok, other=0.0)
        mine = tl.load(row_out + offs, mask=ok, other=0.0)
        res = tl.where((a & h) == 0, mine + partner, partner - mine)
        tl.debug_barrier()
        tl.store(row_out + offs, res, mask=ok)
    tl.debug_barrier()
    res = tl.load(row_out + offs, mask=ok, other=0.0)
    tl.store(row_out + offs, res * scale, mask=ok)


def hadamard_transform(x, signs, p, small):
    """The twin's contract (:func:`qe.kernels.reference.hadamard_transform`): the power-of-two
    part in the kernel, the small dense ``H_m`` as a matmul on its output (the two commute)."""
    x = x.contiguous()
    t, n = x.shape
    m = n // p
    out = torch.empty(t, n, dtype=torch.float32, device=x.device)
    if t == 0:
        return out.to(x.dtype)
    bm = min(triton.next_power_of_2(m), max(1, 4096 // p))
    grid = (t, triton.cdiv(m, bm))
    _fwht_kernel[grid](x, signs.contiguous() if signs is not None else x, out, n, m, n ** -0.5, P=p,
                       LOG_P=int(math.log2(p)), BM=bm, HAS_SIGNS=signs is not None)
    if small is not None:
        out = (out.reshape(t, p, m) @ small.float()).reshape(t, n)
    return out.to(x.dtype)
