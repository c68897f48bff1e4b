"""The Triton kernels (run by Triton's CPU interpreter) against their torch twins, and the
twins against the plain-torch definitions of the quantized forward.

Tolerances (kernels/README.md): activation codes and scales are bit-exact; integer GEMMs are
exact before the fp32 epilogue, so they are held to 1e-5 of the bound ``|s_x q| |W|ᵀ``;
fp16 operands to 2^-10 of their bound; low-rank terms (tf32 on a GPU) to 2e-3 of theirs.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qe.kernels import ops
from qe.kernels import reference as twin
from qe.packing import pack
from qe.quantized import fake_quantize_activations, quantize_activations_per_token
from qe.quantizers.grid import quantize_rtn
from qe.quantizers.qlinear import QuantLinear

kern = pytest.importorskip("qe.kernels.triton_kernels", reason="triton is not installed")
if not kern.INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1 (set by conftest)", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAST = settings(max_examples=8, deadline=None)

# ----------------------------------------------------------------------------- helpers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _activations(gen, tokens, d_in, dtype, outliers=True):
    x = torch.randn(tokens, d_in, generator=gen)
    if outliers:  # a few channels 20× larger, as in real LLM activations
        x[:, torch.randint(0, d_in, (max(1, d_in // 32),), generator=gen)] *= 20
    return x.to(dtype).to(DEVICE)


def _smoothing(gen, d_in):
    input_scale = (torch.rand(d_in, generator=gen) * 2 + 0.25).to(DEVICE)
    keep = (torch.rand(d_in, generator=gen) > 0.1).to(DEVICE)
    return input_scale, keep


def _packed_weight(gen, d_out, d_in, bits, group_size, symmetric):
    """Random codes in the QuantLinear layout and their float64 dequantization ``(d_out, d_in)``."""
    n_groups = 1 if group_size == 0 else math.ceil(d_in / group_size)
    codes = torch.randint(0, 2**bits, (d_out, d_in), generator=gen)
    scales = torch.rand(d_out, n_groups, generator=gen) * 0.05 + 1e-3
    if symmetric:
        zeros = torch.full((d_out, n_groups), float(2 ** (bits - 1)))
    else:
        zeros = torch.randint(0, 2**bits, (d_out, n_groups), generator=gen).float()
    g = torch.arange(d_in) // (group_size or d_in)
    w64 = (codes.double() - zeros[:, g].double()) * scales[:, g].double()
    return pack(codes, bits).to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), w64


def _assert_within(actual, expected, bound, rel, what):
    err = (actual.double().cpu() - expected.double().cpu()).abs()
    allowed = rel * bound.double().cpu() + 1e-6
    worst = (err - allowed).max().item() if err.numel() else -1.0
    assert worst <= 0, f"{what}: error {err.max().item():.3g} exceeds {rel:g}·bound (excess {worst:.3g})"


dims = st.fixed_dictionaries({
    "tokens": st.sampled_from([1, 3, 17, 70]),
    "d_in": st.integers(16, 200),
    "d_out": st.integers(1, 140),
    "seed": st.integers(0, 2**16),
})
float_dtypes = st.sampled_from([torch.float16, torch.float32])


def _group_size(draw_value, d_in):
    return 0 if draw_value == 0 or draw_value >= d_in else draw_value


# ----------------------------------------------------------------------------- activation quantization


@FAST
@given(dims=dims, bits=st.integers(4, 8), dtype=float_dtypes, smooth=st.booleans())
def test_activation_quantization_kernel_is_bit_exact(dims, bits, dtype, smooth):
    gen = _gen(dims["seed"])
    x = _activations(gen, dims["tokens"], dims["d_in"], dtype)
    input_scale, keep = _smoothing(gen, dims["d_in"]) if smooth else (None, None)
    codes_k, scales_k = kern.quantize_activations(x, bits, input_scale, keep)
    codes_t, scales_t = twin.quantize_activations(x, bits, input_scale, keep)
    assert codes_k.dtype == torch.int8 and scales_k.dtype == torch.float32
    assert torch.equal(codes_k, codes_t)
    assert torch.equal(scales_k, scales_t)


@FAST
@given(dims=dims, bits=st.integers(2, 8), dtype=float_dtypes)
def test_activation_quantization_twin_matches_the_grid(dims, bits, dtype):
    """Twin == qe.quantizers.grid applied to the smoothed, masked input (the definition)."""
    gen = _gen(dims["seed"])
    x = _activations(gen, dims["tokens"], dims["d_in"], dtype)
    input_scale, keep = _smoothing(gen, dims["d_in"])
    codes, scales = twin.quantize_activations(x, bits, input_scale, keep)
    masked = (x.float() / input_scale) * keep
    q_ref, scale_ref = quantize_activations_per_token(masked, bits)
    assert torch.equal(codes.float(), q_ref)
    assert torch.equal(scales, scale_ref[:, 0])
    qmax = 2 ** (bits - 1) - 1
    assert codes.abs().max() <= qmax
    assert (codes[:, ~keep] == 0).all()  # exempt channels never reach the quantizer


def test_activation_quantization_edge_rows():
    x = torch.zeros(3, 130, device=DEVICE)
    x[1, 5] = -2.5  # one non-zero: it becomes -qmax
    x[2] = torch.arange(130, device=DEVICE) - 64.5
    x[2, 0] = 127.0  # scale exactly 1, so every other entry is a .5 tie: round half to even
    keep = torch.ones(130, dtype=torch.bool, device=DEVICE)
    keep[-1] = False
    codes_k, scales_k = kern.quantize_activations(x, 8, None, keep)
    codes_t, scales_t = twin.quantize_activations(x, 8, None, keep)
    assert torch.equal(codes_k, codes_t) and torch.equal(scales_k, scales_t)
    assert scales_k[0] == 1e-12 and (codes_k[0] == 0).all()
    assert codes_k[1, 5] == -127 and scales_k[2] == 1.0
    assert torch.equal(codes_k[2, 1:-1].float(), torch.round(x[2, 1:-1]))  # e.g. -63.5 → -64, -62.5 → -62
    assert codes_k[2, -1] == 0


# ----------------------------------------------------------------------------- GEMMs


@FAST
@given(dims=dims, bits=st.sampled_from([2, 3, 4, 8]), a_bits=st.sampled_from([4, 6, 8]),
       group=st.sampled_from([0, 16, 32, 64, 128]), symmetric=st.booleans(), extras=st.booleans())
def test_integer_gemm_kernel_matches_twin(dims, bits, a_bits, group, symmetric, extras):
    gen = _gen(dims["seed"])
    t, d_in, d_out = dims["tokens"], dims["d_in"], dims["d_out"]
    gs = _group_size(group, d_in)
    qweight, scales, zeros, w64 = _packed_weight(gen, d_out, d_in, bits, gs, symmetric)
    codes, x_scales = twin.quantize_activations(_activations(gen, t, d_in, torch.float32), a_bits)
    bias = torch.randn(d_out, generator=gen).to(DEVICE) if extras else None
    u = torch.randn(t, 32, generator=gen).to(DEVICE) if extras else None
    a_s = torch.randn(d_out, 32, generator=gen).to(DEVICE) if extras else None
    kw = dict(bits=bits, group_size=gs, symmetric=symmetric, bias=bias, shared_u=u, shared_a=a_s)
    y_k = kern.quantized_linear(codes, x_scales, qweight, scales, zeros, **kw)
    y_t = twin.quantized_linear(codes, x_scales, qweight, scales, zeros, **kw)
    bound = (codes.double().abs().cpu() * x_scales.double().cpu()[:, None]) @ w64.abs().T
    if extras:  # the bias at fp32 resolution, the shared term at tf32's (2e-3 = 200 × 1e-5)
        bound = bound + bias.abs().double().cpu() + 200 * (u.abs().double().cpu() @ a_s.abs().double().cpu().T)
    _assert_within(y_k, y_t, bound, 1e-5, "integer GEMM")


def test_integer_gemm_is_exact_past_fp32_integers():
    """Σ q·(code − zero) over 2048 inputs reaches 6e7 > 2^24: the kernel must accumulate in
    integers, so with unit scales its output is the exact sum rounded once to fp32."""
    gen = _gen(7)
    t, d_in, d_out, bits = 16, 2048, 64, 8
    codes_w = torch.randint(200, 256, (d_out, d_in), generator=gen)
    zeros = torch.randint(0, 3, (d_out, 1), generator=gen).float()  # asymmetric: code − zero up to 255
    q = torch.randint(120, 128, (t, d_in), generator=gen).to(torch.int8)
    exact = q.long() @ (codes_w - zeros.long()).T  # int64, the true value
    assert exact.max() > 2**24
    args = (q.to(DEVICE), torch.ones(t, device=DEVICE), pack(codes_w, bits).to(DEVICE),
            torch.ones(d_out, 1, device=DEVICE), zeros.to(DEVICE))
    y_k = kern.quantized_linear(*args, bits=bits, group_size=0, symmetric=False)
    y_t = twin.quantized_linear(*args, bits=bits, group_size=0, symmetric=False)
    assert torch.equal(y_k.cpu(), exact.double().float())
    assert torch.equal(y_t.cpu(), exact.double().float())


@FAST
@given(dims=dims, bits=st.sampled_from([3, 4, 8]), group=st.sampled_from([0, 32, 64]), symmetric=st.booleans(),
       dtype=float_dtypes, smooth=st.booleans())
def test_weight_only_gemm_kernel_matches_twin(dims, bits, group, symmetric, dtype, smooth):
    gen = _gen(dims["seed"])
    t, d_in, d_out = dims["tokens"], dims["d_in"], dims["d_out"]
    gs = _group_size(group, d_in)
    qweight, scales, zeros, w64 = _packed_weight(gen, d_out, d_in, bits, gs, symmetric)
    x = _activations(gen, t, d_in, dtype, outliers=False)
    input_scale = _smoothing(gen, d_in)[0] if smooth else None
    kw = dict(bits=bits, group_size=gs, input_scale=input_scale)
    y_k = kern.weight_only_linear(x, qweight, scales, zeros, **kw)
    y_t = twin.weight_only_linear(x, qweight, scales, zeros, **kw)
    assert y_k.dtype == dtype
    x64 = twin.smooth(x, input_scale).double().cpu()
    bound = x64.abs() @ w64.abs().T
    # fp16: the kernel rounds x̃ to fp16 for its dot (2^-11) and both sides round the output (2^-11)
    rel = 2**-9 if dtype == torch.float16 else 1e-5
    _assert_within(y_k, y_t, bound, rel, "W-only GEMM")


def test_weight_only_gemm_bf16_is_computed_in_fp32_under_the_interpreter():
    gen = _gen(3)
    qweight, scales, zeros, w64 = _packed_weight(gen, 70, 150, 4, 64, False)
    x = _activations(gen, 5, 150, torch.bfloat16, outliers=False)
    y_k = kern.weight_only_linear(x, qweight, scales, zeros, bits=4, group_size=64)
    y_t = twin.weight_only_linear(x, qweight, scales, zeros, bits=4, group_size=64)
    bound = x.double().abs().cpu() @ w64.abs().T
    _assert_within(y_k, y_t, bound, 2**-7, "bf16 W-only GEMM")


@FAST
@given(dims=dims, a_bits=st.sampled_from([6, 8]), group=st.sampled_from([0, 32]), symmetric=st.booleans())
def test_integer_gemm_twin_is_flinear_of_fake_quantized_inputs(dims, a_bits, group, symmetric):
    """The reference comparison: twin(quantize(x)) == F.linear(fake-quant(x̃ ⊙ keep), dequantized W) + b,
    with the weight quantized by the project's RTN quantizer and packed by QuantLinear."""
    gen = _gen(dims["seed"])
    t, d_in, d_out = dims["tokens"], dims["d_in"], dims["d_out"]
    gs = _group_size(group, d_in)
    weight = torch.randn(d_out, d_in, generator=gen)
    input_scale, keep = _smoothing(gen, d_in)
    exempt = ~keep.cpu()
    qw = quantize_rtn(weight, 4, gs, symmetric, exempt=exempt)
    bias = torch.randn(d_out, generator=gen)
    layer = QuantLinear.from_quantized(qw, a_bits=a_bits, bias=bias, input_scale=input_scale.cpu(),
                                       act_exempt=exempt).to(DEVICE)
    x = _activations(gen, t, d_in, torch.float32)
    codes, x_scales = twin.quantize_activations(x, a_bits, layer.input_scale, layer.act_keep)
    y = twin.quantized_linear(codes, x_scales, layer.qweight, layer.scales, layer.zeros, bits=4, group_size=gs,
                              symmetric=symmetric, bias=layer.bias)
    fake = fake_quantize_activations((x / input_scale) * keep, a_bits).double().cpu()
    w_deq = qw.dequantize(torch.float64)
    expected = F.linear(fake, w_deq, bias.double())
    bound = fake.abs() @ w_deq.abs().T + bias.abs().double()
    _assert_within(y, expected, bound, 1e-6, "twin vs F.linear definition")
    # ...and QuantLinear's own forward (fp32, no compensator) agrees within fp32 matmul error
    _assert_within(layer(x), expected, bound, 1e-5, "QuantLinear forward vs definition")


# ----------------------------------------------------------------------------- QE terms


def _qe_factors(gen, d_in, d_out, r_s, n_experts, r_r):
    return dict(
        shared_a=(torch.randn(d_out, r_s, generator=gen) / r_s**0.5).to(DEVICE),
        shared_b=(torch.randn(r_s, d_in, generator=gen) / d_in**0.5).to(DEVICE),
        router=torch.rand(n_experts, d_in, generator=gen).to(DEVICE),
        routed_a=(torch.randn(n_experts, d_out, r_r, generator=gen) / r_r**0.5).to(DEVICE),
        routed_b=(torch.randn(n_experts, r_r, d_in, generator=gen) / d_in**0.5).to(DEVICE),
    )


@FAST
@given(dims=dims, dtype=float_dtypes, n_experts=st.sampled_from([1, 3, 8]), r_s=st.sampled_from([8, 32]),
       smooth=st.booleans())
def test_prologue_kernel_matches_twin(dims, dtype, n_experts, r_s, smooth):
    gen = _gen(dims["seed"])
    t, d_in = dims["tokens"], dims["d_in"]
    x = _activations(gen, t, d_in, dtype)
    input_scale, keep = _smoothing(gen, d_in) if smooth else (None, None)
    f = _qe_factors(gen, d_in, 4, r_s, n_experts, 16)
    out_k = kern.qe_prologue(x, 8, input_scale, keep, f["shared_b"], f["router"])
    out_t = twin.qe_prologue(x, 8, input_scale, keep, f["shared_b"], f["router"])
    assert torch.equal(out_k[0], out_t[0]) and torch.equal(out_k[1], out_t[1])
    xs = twin.smooth(x, input_scale).double().cpu()
    _assert_within(out_k[2], out_t[2], xs.abs() @ f["shared_b"].abs().double().cpu().T, 2e-3, "shared down")
    # the router's choice: any expert whose logit ties the minimum within tf32 error is right
    logits = xs.abs() @ f["router"].double().cpu().T  # (T, N), the definition, in float64
    chosen = logits.gather(1, out_k[3].long().cpu()[:, None])[:, 0]
    assert (chosen - logits.min(1).values <= 2e-3 * logits.abs().max(1).values).all()
    assert out_k[3].dtype == torch.int32 and out_k[3].min() >= 0 and out_k[3].max() < n_experts
    assert torch.equal(out_t[3].long().cpu(), logits.argmin(1))


def test_router_ties_go_to_the_first_expert():
    gen = _gen(11)
    x = _activations(gen, 20, 100, torch.float32)
    base = torch.rand(1, 100, generator=gen).to(DEVICE)
    router = torch.cat([base + 1, base, base, base + 2])  # experts 1 and 2 tie at the minimum
    _, expert_k = kern.shared_down_and_route(x, None, router)
    _, expert_t = twin.shared_down_and_route(x, None, router)
    assert (expert_k == 1).all() and (expert_t == 1).all()


@FAST
@given(dims=dims, dtype=float_dtypes, n_experts=st.sampled_from([1, 4, 8]), rank=st.sampled_from([16, 32]),
       used=st.integers(1, 8), accumulate=st.booleans())
def test_routed_grouped_gemm_matches_twin_and_per_token_definition(dims, dtype, n_experts, rank, used, accumulate):
    gen = _gen(dims["seed"])
    t, d_in, d_out = dims["tokens"], dims["d_in"], dims["d_out"]
    x = _activations(gen, t, d_in, dtype, outliers=False)
    input_scale = _smoothing(gen, d_in)[0]
    f = _qe_factors(gen, d_in, d_out, 8, n_experts, rank)
    # only `used` experts receive tokens: the others must be skipped cleanly
    served = torch.randperm(n_experts, generator=gen)[: min(used, n_experts)]
    expert = served[torch.randint(0, len(served), (t,), generator=gen)].to(torch.int32).to(DEVICE)
    base = torch.randn(t, d_out, generator=gen).to(dtype).to(DEVICE)
    out_k = kern.routed_lowrank(x, expert, f["routed_a"], f["routed_b"], input_scale,
                                base.clone() if accumulate else None)
    out_t = twin.routed_lowrank(x, expert, f["routed_a"], f["routed_b"], input_scale,
                                base.clone() if accumulate else None)
    assert out_k.dtype == dtype and out_k.shape == (t, d_out)
    # the definition, one token at a time in float64 (acceptable only in a test)
    xs = twin.smooth(x, input_scale).double().cpu()
    a64, b64 = f["routed_a"].double().cpu(), f["routed_b"].double().cpu()
    e = expert.long().cpu()
    definition = torch.stack([a64[e[i]] @ (b64[e[i]] @ xs[i]) for i in range(t)])
    bound = torch.stack([a64[e[i]].abs() @ (b64[e[i]].abs() @ xs[i].abs()) for i in range(t)])
    if accumulate:
        definition = definition + base.double().cpu()
        bound = bound + base.double().abs().cpu()
    out_rounding = 2**-10 if dtype == torch.float16 else 1e-6
    _assert_within(out_t, definition, bound, 1e-5 + out_rounding, "routed twin vs definition")
    _assert_within(out_k, out_t, bound, 2e-3 + out_rounding, "routed kernel vs twin")


def test_sort_by_expert_groups_tokens_stably():
    expert = torch.tensor([2, 0, 2, 2, 0, 4], dtype=torch.int32)
    perm, offsets = twin.sort_by_expert(expert, 5)
    assert offsets.tolist() == [0, 2, 2, 5, 5, 6]
    assert perm.tolist() == [1, 4, 0, 2, 3, 5]


@contextlib.contextmanager
def _forced_backend(name):
    before = os.environ.get("QE_KERNELS")
    os.environ["QE_KERNELS"] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ["QE_KERNELS"]
        else:
            os.environ["QE_KERNELS"] = before


def _assert_route_is_an_argmin(expert, logits64, rel=2e-3):
    """The chosen expert's logit ties the minimum within ``rel`` of the row's largest logit."""
    chosen = logits64.gather(1, expert.long().cpu()[:, None])[:, 0]
    assert (chosen - logits64.min(1).values <= rel * logits64.abs().max(1).values).all()


@settings(max_examples=6, deadline=None)
@given(dims=dims, a_bits=st.sampled_from([8, 16]), dtype=float_dtypes, group=st.sampled_from([0, 64]))
def test_qe_layer_triton_equals_torch_and_the_definition(dims, a_bits, dtype, group):
    gen = _gen(dims["seed"])
    t, d_in, d_out = dims["tokens"], dims["d_in"], dims["d_out"]
    gs = _group_size(group, d_in)
    qweight, scales, zeros, w64 = _packed_weight(gen, d_out, d_in, 4, gs, True)
    input_scale, keep = _smoothing(gen, d_in)
    f = _qe_factors(gen, d_in, d_out, 32, 8, 32)
    weights = ops.QELinearWeights(qweight, scales, zeros, bits=4, group_size=gs, symmetric=True, a_bits=a_bits,
                                  bias=torch.randn(d_out, generator=gen).to(DEVICE), input_scale=input_scale,
                                  act_keep=keep if a_bits < 16 else None, **f)
    x = _activations(gen, t, d_in, dtype).reshape(1, t, d_in)  # a batch dimension, flattened inside
    with _forced_backend("triton"):
        y_triton = ops.qe_linear(x, weights)[0]
    with _forced_backend("torch"):
        y_torch = ops.qe_linear(x, weights)[0]
        route_torch = ops.shared_down_and_route(x[0], None, f["router"], input_scale)[1].long().cpu()
    # the definition in float64, given the twin's routing (itself checked to be an argmin)
    xs = twin.smooth(x[0], input_scale).double().cpu()
    logits = xs.abs() @ f["router"].double().cpu().T
    _assert_route_is_an_argmin(route_torch, logits, rel=1e-5)
    xq = xs if a_bits == 16 else fake_quantize_activations((xs * keep.cpu()).float(), a_bits).double()
    sa, sb = f["shared_a"].double().cpu(), f["shared_b"].double().cpu()
    ra, rb = f["routed_a"].double().cpu()[route_torch], f["routed_b"].double().cpu()[route_torch]
    expected = (xq @ w64.T + weights.bias.double().cpu() + xs @ sb.T @ sa.T
                + torch.einsum("tor,tri,ti->to", ra, rb, xs))
    bound = (xq.abs() @ w64.abs().T + weights.bias.double().abs().cpu() + xs.abs() @ sb.abs().T @ sa.abs().T
             + torch.einsum("tor,tri,ti->to", ra.abs(), rb.abs(), xs.abs()))
    rel = 2e-3 + (2**-9 if dtype == torch.float16 else 0)
    _assert_within(y_torch, expected, bound, rel, "torch QE layer vs definition")
    # the Triton router may differ from the twin's only where two logits tie within tf32 error
    with _forced_backend("triton"):
        route_triton = ops.shared_down_and_route(x[0], None, f["router"], input_scale)[1].long().cpu()
    _assert_route_is_an_argmin(route_triton, logits)
    same = route_triton == route_torch
    _assert_within(y_triton[same], y_torch[same], bound[same], rel, "Triton QE layer vs torch")


@pytest.mark.parametrize("compensator", ["none", "lowrank", "quant_experts", "quant_experts_8bit_branch"])
@pytest.mark.parametrize("a_bits", [8, 16])
def test_quant_linear_forward_through_the_kernels_equals_its_torch_forward(compensator, a_bits):
    """The dispatch hook in QuantLinear.forward: forced Triton (interpreter) == the module's own torch path."""
    from qe.compensators.modules import LowRankAdapter, QuantExpertsAdapter

    gen = _gen(21)
    d_in, d_out, t = 150, 70, 9
    weight = torch.randn(d_out, d_in, generator=gen)
    input_scale, keep = _smoothing(gen, d_in)
    exempt = ~keep.cpu()
    layer = QuantLinear.from_quantized(quantize_rtn(weight, 4, 64, False, exempt=exempt), a_bits=a_bits,
                                       bias=torch.randn(d_out, generator=gen), input_scale=input_scale.cpu(),
                                       act_exempt=exempt)
    f = _qe_factors(gen, d_in, d_out, 16, 4, 16)
    if compensator == "lowrank":
        layer.compensator = LowRankAdapter.from_factors(f["shared_a"].cpu(), f["shared_b"].cpu())
    elif compensator.startswith("quant_experts"):
        adapter = QuantExpertsAdapter(d_in, d_out, 16, 4, 16, input_bits=8 if "8bit" in compensator else 16)
        for name, value in (("A_s", "shared_a"), ("B_s", "shared_b"), ("R", "router"), ("A", "routed_a"),
                            ("B", "routed_b")):
            getattr(adapter, name).copy_(f[value])
        layer.compensator = adapter
    layer = layer.to(DEVICE)
    x = _activations(gen, t, d_in, torch.float32).reshape(3, 3, d_in)
    with _forced_backend("torch"):
        y_torch = layer(x)
    calls = []
    real = kern.quantized_linear if a_bits < 16 else kern.weight_only_linear
    with _forced_backend("triton"), pytest.MonkeyPatch.context() as mp:
        mp.setattr(kern, real.__name__, lambda *a, **k: calls.append(1) or real(*a, **k))
        y_triton = layer(x)
    assert y_triton.shape == y_torch.shape == (3, 3, d_out)
    # the 8-bit branch input is not fused: the module's torch path runs
    assert bool(calls) == (compensator != "quant_experts_8bit_branch")
    with _forced_backend("triton"):  # no backward in the kernels: gradients take the torch path
        x_grad = x.clone().requires_grad_(True)
        layer(x_grad).sum().backward()
        assert x_grad.grad is not None
    xs = (x.reshape(t, d_in).double().cpu() / input_scale.double().cpu())
    bound = xs.abs() @ layer.dequantized_weight().double().cpu().abs().T * 2 + layer.bias.abs().double().cpu()
    if compensator != "none":  # low-rank terms at tf32 resolution on a GPU: 2e-3 = 20 × 1e-4
        bound = bound + 20 * xs.abs() @ f["shared_b"].abs().double().cpu().T @ f["shared_a"].abs().double().cpu().T
    if compensator == "quant_experts":
        ra, rb = f["routed_a"].abs().double().cpu(), f["routed_b"].abs().double().cpu()
        bound = bound + 20 * torch.einsum("eor,eri,ti->teo", ra, rb, xs.abs()).amax(1)
    _assert_within(y_triton.reshape(t, d_out), y_torch.reshape(t, d_out), bound, 1e-4, "QuantLinear forward")


@contextlib.contextmanager
def _split_k(n):
    before = kern.FORCE_SPLIT_K
    kern.FORCE_SPLIT_K = n
    try:
        yield
    finally:
        kern.FORCE_SPLIT_K = before


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), tokens=st.sampled_from([1, 5]), d_in=st.integers(130, 600),
       group=st.sampled_from([0, 32, 128]), symmetric=st.booleans(), splits=st.sampled_from([2, 3, 7]),
       dtype=float_dtypes)
def test_split_k_paths_match_the_twins(seed, tokens, d_in, group, symmetric, splits, dtype):
    """Few tokens through a wide layer split the reduction over d_in (atomic fp32 sums):
    the GEMMs, the prologue's low-rank reductions and the routed down-projection."""
    gen = _gen(seed)
    d_out, gs = 70, _group_size(group, d_in)
    qweight, scales, zeros, w64 = _packed_weight(gen, d_out, d_in, 4, gs, symmetric)
    x = _activations(gen, tokens, d_in, dtype)
    input_scale, keep = _smoothing(gen, d_in)
    f = _qe_factors(gen, d_in, d_out, 32, 8, 32)
    bias = torch.randn(d_out, generator=gen).to(DEVICE)
    expert = torch.randint(0, 8, (tokens,), generator=gen).to(torch.int32).to(DEVICE)
    with _split_k(splits):
        pro_k = kern.qe_prologue(x, 8, input_scale, keep, f["shared_b"], f["router"])
        u = pro_k[2]
        y_k = kern.quantized_linear(pro_k[0], pro_k[1], qweight, scales, zeros, bits=4, group_size=gs,
                                    symmetric=symmetric, bias=bias, shared_u=u, shared_a=f["shared_a"],
                                    out_dtype=dtype)
        w_k = kern.weight_only_linear(x, qweight, scales, zeros, bits=4, group_size=gs, input_scale=input_scale,
                                      bias=bias)
        r_k = kern.routed_lowrank(x, expert, f["routed_a"], f["routed_b"], input_scale)
    pro_t = twin.qe_prologue(x, 8, input_scale, keep, f["shared_b"], f["router"])
    assert torch.equal(pro_k[0], pro_t[0]) and torch.equal(pro_k[1], pro_t[1])
    xs = twin.smooth(x, input_scale).double().cpu()
    _assert_within(u, pro_t[2], xs.abs() @ f["shared_b"].abs().double().cpu().T, 2e-3, "split shared down")
    _assert_route_is_an_argmin(pro_k[3], xs.abs() @ f["router"].double().cpu().T)
    y_t = twin.quantized_linear(pro_t[0], pro_t[1], qweight, scales, zeros, bits=4, group_size=gs,
                                symmetric=symmetric, bias=bias, shared_u=u, shared_a=f["shared_a"], out_dtype=dtype)
    out_rounding = 2**-10 if dtype == torch.float16 else 0
    bound = ((pro_t[0].double().abs().cpu() * pro_t[1].double().cpu()[:, None]) @ w64.abs().T
             + bias.abs().double().cpu() + 200 * u.abs().double().cpu() @ f["shared_a"].abs().double().cpu().T)
    _assert_within(y_k, y_t, bound, 1e-5 + out_rounding, "split integer GEMM")
    w_t = twin.weight_only_linear(x, qweight, scales, zeros, bits=4, group_size=gs, input_scale=input_scale, bias=bias)
    _assert_within(w_k, w_t, xs.abs() @ w64.abs().T + bias.abs().double().cpu(),
                   2**-9 if dtype == torch.float16 else 1e-5, "split W-only GEMM")
    r_t = twin.routed_lowrank(x, expert, f["routed_a"], f["routed_b"], input_scale)
    e = expert.long().cpu()
    r_bound = torch.einsum("tor,tri,ti->to", f["routed_a"].abs().double().cpu()[e],
                           f["routed_b"].abs().double().cpu()[e], xs.abs())
    _assert_within(r_k, r_t, r_bound, 2e-3 + out_rounding, "split routed down")


def test_split_k_slices_respect_groups_and_blocks():
    for K, unit, forced in ((18944, 128, 7), (600, 128, 3), (300, 384, 5), (64, 128, 4)):
        with _split_k(forced):
            splits, per = kern._split_k(torch.device("cpu"), 1, K, unit)
        assert per % unit == 0 and splits == -(-K // per) and 1 <= splits <= forced
        assert (splits - 1) * per < K  # no empty slice


# ----------------------------------------------------------------------------- dispatch


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("QE_KERNELS", raising=False)
    assert ops.backend() == ("triton" if torch.cuda.is_available() else "torch")
    monkeypatch.setenv("QE_KERNELS", "torch")
    assert ops.backend() == "torch"
    monkeypatch.setenv("QE_KERNELS", "cuda")
    with pytest.raises(ops.KernelError, match="not a backend"):
        ops.backend()
    monkeypatch.setenv("QE_KERNELS", "triton")
    assert ops.backend() == "triton"  # the interpreter is on (conftest)
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ops.KernelError, match="TRITON_INTERPRET=1"):
            ops.backend()
    monkeypatch.setattr(ops, "triton_available", lambda: False)
    with pytest.raises(ops.KernelError, match="not installed"):
        ops.backend()


def test_dispatch_runs_the_chosen_backend(monkeypatch):
    x = torch.randn(2, 3, 64, device=DEVICE)
    monkeypatch.setenv("QE_KERNELS", "torch")
    codes_torch, scales_torch = ops.quantize_activations(x, 8)
    assert codes_torch.shape == (2, 3, 64) and scales_torch.shape == (2, 3)
    monkeypatch.setenv("QE_KERNELS", "triton")
    calls = []
    real = kern.quantize_activations
    monkeypatch.setattr(kern, "quantize_activations", lambda *a: calls.append(1) or real(*a))
    codes_triton, scales_triton = ops.quantize_activations(x, 8)
    assert calls and torch.equal(codes_triton, codes_torch) and torch.equal(scales_triton, scales_torch)


def test_unsupported_group_size_falls_back_to_the_twin(monkeypatch):
    gen = _gen(5)
    qweight, scales, zeros, _ = _packed_weight(gen, 20, 100, 4, 24, False)
    x = _activations(gen, 3, 100, torch.float32)
    monkeypatch.setenv("QE_KERNELS", "triton")
    ops._warned_group_sizes.discard(24)
    with pytest.warns(UserWarning, match="group size 24"):
        y = ops.weight_only_linear(x, qweight, scales, zeros, bits=4, group_size=24)
    assert torch.equal(y, twin.weight_only_linear(x, qweight, scales, zeros, bits=4, group_size=24))


def test_bad_inputs_raise_one_line_errors():
    x = torch.randn(4, 100)
    qweight = torch.zeros(10, 50, dtype=torch.uint8)  # 4-bit rows of 100 inputs need 52 bytes
    with pytest.raises(ops.KernelError, match="bytes per row"):
        ops.weight_only_linear(x, qweight, torch.ones(10, 1), torch.zeros(10, 1), bits=4, group_size=0)
    with pytest.raises(ops.KernelError, match="activation bits 16"):
        ops.quantize_activations(x, 16)
    with pytest.raises(ops.KernelError, match="keep must be a bool"):
        ops.quantize_activations(x, 8, keep=torch.ones(100))
    with pytest.raises(ops.KernelError, match="scales has shape"):
        ops.weight_only_linear(x, torch.zeros(10, 52, dtype=torch.uint8), torch.ones(10, 3), torch.zeros(10, 3),
                               bits=4, group_size=64)
    with pytest.raises(ops.KernelError, match="expert indices"):
        ops.routed_lowrank(x, torch.full((4,), 9), torch.zeros(2, 5, 3), torch.zeros(2, 3, 100))


def test_autotune_runs_under_the_interpreter_with_a_cpu_timer(monkeypatch):
    """Triton's own timer needs a GPU driver; the kernels pass a CPU timer in interpreter mode."""
    if not kern.INTERPRET:
        pytest.skip("interpreter-only check")
    monkeypatch.setenv("QE_KERNELS_AUTOTUNE", "1")
    gen = _gen(9)
    qweight, scales, zeros, _ = _packed_weight(gen, 64, 64, 4, 0, True)
    codes, x_scales = twin.quantize_activations(_activations(gen, 1, 64, torch.float32), 8)
    y_k = kern.quantized_linear(codes, x_scales, qweight, scales, zeros, bits=4, group_size=0, symmetric=True)
    y_t = twin.quantized_linear(codes, x_scales, qweight, scales, zeros, bits=4, group_size=0, symmetric=True)
    assert kern._tuned_linear.best_config is not None
    assert torch.allclose(y_k, y_t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group_size,n_groups", [(4096, 1), (128, 12), (64, 30), (32, 9), (48, 5)])
@pytest.mark.parametrize("m_bucket", [1, 16, 32, 128])
def test_autotune_configs_never_straddle_groups(group_size, n_groups, m_bucket):
    kept = kern._prune_linear_configs(kern._linear_configs(),
                                      {"group_size": group_size, "n_groups": n_groups, "m_bucket": m_bucket})
    assert kept
    for c in kept:
        assert n_groups == 1 or group_size % c.kwargs["BK"] == 0
        assert c.kwargs["BM"] <= max(16, m_bucket) and c.kwargs["BK"] >= 16


def test_package_imports_and_runs_without_triton(tmp_path):
    """``import triton`` failing must not break ``qe.kernels``: the twins run."""
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, qe.kernels as k\n"
        "assert k.backend() == 'torch' and not k.triton_available()\n"
        "codes, scales = k.quantize_activations(torch.randn(3, 40), 8)\n"
        "assert codes.dtype == torch.int8 and scales.shape == (3,)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "QE_KERNELS": ""}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
