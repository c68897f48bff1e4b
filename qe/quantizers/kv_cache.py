"""A quantized KV cache, simulated inside attention: the ``KV<b>`` part of a setting (``W4A4KV4``).

What a serving engine keeps in its KV cache are the keys after the rotary embedding (and after
the QK-norm where the family has one) and the values, per token and key-value head. qe
quantizes exactly those. It registers an attention implementation with transformers
(``qe_kv_sdpa`` or ``qe_kv_eager``, wrapping the one the model runs, with the same masks) whose
function receives the keys and values the cache holds, and, for every attention module marked
with :func:`mark_attention`, fake-quantizes them before attending:

    K ← Q_kv(K R),  Q ← Q R,  V ← Q_kv(V R),  out ← attention(Q, K, V) Rᵀ

``R`` is an orthogonal matrix of order ``head_dim``: the normalized Hadamard matrix where qe
knows one of that order, else a seeded random orthogonal matrix. The rotation is exact in full
precision (``Q R (K R)ᵀ = Q Kᵀ`` and ``P (V R) Rᵀ = P V``); it spreads the few large channels
that rotary keys have over the whole head before the grid is set. ``Q_kv`` is dynamic
asymmetric min-max quantization with one scale and zero point per token and head (a group of
``head_dim`` values).

The cache itself (transformers' ``DynamicCache``) keeps the full-precision keys and values, and
the wrapper quantizes all of them at every step. That gives what an engine's quantized cache
gives: each token is quantized on its own, so a token comes out the same whether the cache
wrote it earlier or the whole sequence is attended at once, and quantizing a quantized vector
returns it. Unmarked attention modules run unchanged, so switching a model's implementation
changes nothing until a block is marked. Eager attention is each family's own function (with
its soft-capping or attention sinks); sdpa is transformers' registered one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import cache, lru_cache

import torch
from torch import nn

from qe.errors import ModelError
from qe.transforms.hadamard import hadamard_matrix, has_hadamard, random_orthogonal

IMPLEMENTATION_PREFIX = "qe_kv_"
BASE_IMPLEMENTATIONS = ("sdpa", "eager")

# The attribute of a marked attention module that holds its cache bits: on the module itself,
# so a deep copy of a quantized model (qe compare's cells, a user's copy) stays quantized.
BITS_ATTRIBUTE = "qe_kv_cache_bits"


def fake_quantize_kv(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` ``(..., head_dim)`` quantized and dequantized on one asymmetric min-max grid of
    ``2^bits`` levels per vector along the last dimension, in ``x``'s dtype (float32 inside)."""
    xf = x.float()
    lo = xf.amin(-1, keepdim=True)
    hi = xf.amax(-1, keepdim=True)
    levels = 2 ** bits - 1
    scale = ((hi - lo) / levels).clamp_min(1e-12)
    codes = ((xf - lo) / scale).round().clamp(0, levels)
    return (codes * scale + lo).to(x.dtype)


@lru_cache(maxsize=16)
def head_rotation(head_dim: int, device: str = "cpu") -> torch.Tensor:
    """The ``(head_dim, head_dim)`` float32 orthogonal ``R`` (see the module docstring)."""
    r = hadamard_matrix(head_dim) if has_hadamard(head_dim) else random_orthogonal(head_dim, seed=0)
    return r.float().to(device)


def quantized_attention(base: Callable) -> Callable:
    """An attention function with transformers' signature that quantizes the keys and values of
    marked modules (module docstring) and calls ``base`` with them."""

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs):
        bits = marked_bits(module)
        if bits is None:
            return base(module, query, key, value, *args, **kwargs)
        r = head_rotation(key.shape[-1], str(key.device))
        dtype = key.dtype
        # Rotated in float32 and rounded once, so a half-precision model adds no rounding of its own.
        query = (query.float() @ r).to(dtype)
        key = fake_quantize_kv((key.float() @ r).to(dtype), bits)
        value = fake_quantize_kv((value.float() @ r).to(dtype), bits)
        out, weights = base(module, query, key, value, *args, **kwargs)
        return (out.float() @ r.T).to(out.dtype), weights  # out: (batch, tokens, heads, head_dim)

    return attention


@cache
def family_eager_attention(attention_type: type) -> Callable | None:
    """The eager attention function of the modeling file that defines ``attention_type``:
    transformers registers no eager implementation, each family passes its own as the default
    (with its own arguments: soft-capping, attention sinks)."""
    return vars(sys.modules[attention_type.__module__]).get("eager_attention_forward")


def _eager(module: nn.Module, *args, **kwargs):
    fn = family_eager_attention(type(module))
    assert fn is not None, "enable() checked that the family has an eager attention function"
    return fn(module, *args, **kwargs)


def _register(base_name: str) -> str:
    """Register the wrapped implementation of ``base_name`` (and its masks) once; its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = IMPLEMENTATION_PREFIX + base_name
    if name not in ALL_ATTENTION_FUNCTIONS:
        base = _eager if base_name == "eager" else ALL_ATTENTION_FUNCTIONS[base_name]
        AttentionInterface.register(name, quantized_attention(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_name])
    return name


def enable(language_model: nn.Module, attention: nn.Module) -> None:
    """Switch the language model's attention (``attention``: one of its attention modules) to
    the wrapped implementation, transparent until a block is marked; a one-line error for an
    implementation qe cannot wrap."""
    config = language_model.config
    current = config._attn_implementation or "eager"
    if current.startswith(IMPLEMENTATION_PREFIX):
        return
    if current not in BASE_IMPLEMENTATIONS:
        raise ModelError(f"the language model runs {current!r} attention, and a quantized KV cache (KV<bits> in the "
                         f"setting) wraps only {' or '.join(BASE_IMPLEMENTATIONS)}: load the model with sdpa "
                         "attention (qe's default), or drop KV<bits> from the setting")
    if current == "eager" and family_eager_attention(type(attention)) is None:
        raise ModelError(f"{type(attention).__name__} runs eager attention, and its modeling file has no "
                         "eager_attention_forward for a quantized KV cache to wrap: drop KV<bits> from the setting")
    config._attn_implementation = _register(current)


def mark_attention(module: nn.Module, bits: int) -> None:
    """Quantize the KV cache of this attention module to ``bits`` (under an enabled model)."""
    module.__dict__[BITS_ATTRIBUTE] = bits  # a plain attribute, not a buffer: no state dict or offload hook sees it


def marked_bits(module: nn.Module) -> int | None:
    """The cache bits :func:`mark_attention` gave this module, or None."""
    return module.__dict__.get(BITS_ATTRIBUTE)
