"""The quantized linear module that replaces ``nn.Linear`` in a quantized model.

    x ← ((x ⊙ r) H) / √n                      (online rotation; absent unless a rotation asked for one)
    x̃ = x / input_scale                       (explicit smoothing; absent when folded into a norm)
    y = Q_a(x̃ ⊙ act_keep) · Q_w(W̃)ᵀ + b + compensator(x̃)

``Q_w(W̃)`` is stored packed (:mod:`qe.packing`) with per-row or per-group scales
and zero points; ``Q_a`` is per-token dynamic symmetric (or static per-tensor) fake
quantization; ``act_keep`` zeroes the exempt channels before ``Q_a`` so their outliers do not
set the per-token scale (those channels reach the output only through the compensator,
which reads the unquantized ``x̃``). The online rotation (``input_rotation`` holds the signs
``r``; ``H`` is the Hadamard matrix of order ``in_features``, :mod:`qe.transforms.hadamard`)
is what the ``rotate`` transform puts before o_proj and down_proj: ``Q_w(W̃)`` then holds the
weight in the rotated basis, and everything after it (smoothing, the compensator) reads the
rotated input. The forward picks the Triton kernels on CUDA and their
torch twins elsewhere (``QE_KERNELS=torch|triton`` forces one, see :mod:`qe.kernels`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qe.packing import pack, packed_columns, unpack
from qe.quantized import QuantizedWeight, dequantize, fake_quantize_activations

if TYPE_CHECKING:
    from qe.compensators.base import CompensatorModule


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int,
        symmetric: bool,
        a_bits: int = 16,
        bias: bool = False,
        input_scale: bool = False,
        act_keep: bool = False,
        static_act_scale: bool = False,
        input_rotation: bool = False,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric, self.a_bits = bits, group_size, symmetric, a_bits
        n_groups = 1 if group_size == 0 else -(-in_features // group_size)
        self.register_buffer("qweight", torch.zeros(out_features, packed_columns(in_features, bits), dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, n_groups))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("input_scale", torch.ones(in_features) if input_scale else None)
        self.register_buffer("act_keep", torch.ones(in_features, dtype=torch.bool) if act_keep else None)
        self.register_buffer("static_act_scale", torch.ones(()) if static_act_scale else None)
        # ±1 signs r of the online rotation (int8: exact in any dtype, and model.to(dtype) leaves them)
        self.register_buffer("input_rotation", torch.ones(in_features, dtype=torch.int8) if input_rotation else None)
        self.compensator: CompensatorModule | None = None
        self._dequantized: torch.Tensor | None = None  # cache for the torch path
        self._keep_dequantized = True

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_quantized(
        cls,
        q: QuantizedWeight,
        *,
        a_bits: int,
        bias: torch.Tensor | None = None,
        input_scale: torch.Tensor | None = None,
        act_exempt: torch.Tensor | None = None,
        static_act_scale: torch.Tensor | None = None,
        compensator: CompensatorModule | None = None,
        input_rotation: torch.Tensor | None = None,
    ) -> QuantLinear:
        d_out, d_in = q.shape
        m = cls(
            d_in, d_out, bits=q.bits, group_size=q.group_size, symmetric=q.symmetric, a_bits=a_bits,
            bias=bias is not None, input_scale=input_scale is not None, act_keep=act_exempt is not None,
            static_act_scale=static_act_scale is not None, input_rotation=input_rotation is not None,
        )
        codes = q.codes.clone()
        if q.exempt is not None:
            # Exempt columns dequantize to exactly zero: store the zero point as their code.
            g = q.group_index()
            codes[:, q.exempt] = q.zeros[:, g[q.exempt]].round().to(codes.dtype)
        m.qweight.copy_(pack(codes, q.bits))
        m.scales.copy_(q.scales)
        m.zeros.copy_(q.zeros)
        if bias is not None:
            m.bias.copy_(bias)
        if input_scale is not None:
            m.input_scale.copy_(input_scale)
        if act_exempt is not None:
            m.act_keep.copy_(~act_exempt)
        if static_act_scale is not None:
            m.static_act_scale.copy_(static_act_scale.reshape(()))  # one per-tensor scale, whatever its shape
        if input_rotation is not None:
            m.input_rotation.copy_(input_rotation.to(torch.int8))
        m.compensator = compensator
        return m

    def layout(self) -> dict[str, Any]:
        """What :meth:`from_layout` needs to rebuild an empty module (saved in the manifest)."""
        return {
            "in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
            "group_size": self.group_size, "symmetric": self.symmetric, "a_bits": self.a_bits,
            "bias": self.bias is not None, "input_scale": self.input_scale is not None,
            "act_keep": self.act_keep is not None, "static_act_scale": self.static_act_scale is not None,
            **({"input_rotation": True} if self.input_rotation is not None else {}),
        }

    @classmethod
    def from_layout(cls, layout: dict[str, Any]) -> QuantLinear:
        layout = dict(layout)
        return cls(layout.pop("in_features"), layout.pop("out_features"), **layout)

    # ------------------------------------------------------------------ weights
    @property
    def keep_dequantized(self) -> bool:
        """Whether the torch path keeps the dequantized float weight (and the compensator its
        dequantized factors) between forwards. Off for offloaded modules, where the caches
        would keep a float copy of every weight in memory; turning it off drops them."""
        return self._keep_dequantized

    @keep_dequantized.setter
    def keep_dequantized(self, keep: bool) -> None:
        self._keep_dequantized = keep
        if not keep:
            self._dequantized = None
        if self.compensator is not None:
            self.compensator.set_caching(keep)

    def forget_dequantized(self) -> None:
        """Drop the kept dequantized weight until a forward needs it again (the setting of
        :attr:`keep_dequantized` stays as it is)."""
        self._dequantized = None

    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.bits, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes(), self.scales, self.zeros, self.group_size, dtype)

    def _apply(self, fn, recurse=True):
        self._dequantized = None  # device or dtype changes invalidate the cache
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._dequantized = None
        return super()._load_from_state_dict(*args, **kwargs)

    # ------------------------------------------------------------------ forward
    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        """The online rotation ``((x ⊙ r) H) / √n``, or ``x`` when the layer has none."""
        if self.input_rotation is None:
            return x
        from qe.kernels.ops import hadamard_transform

        return hadamard_transform(x, self.input_rotation.to(x.device))

    def smooth_input(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.input_scale.to(x.dtype) if self.input_scale is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from qe.kernels.ops import forward_quant_linear  # lazy: qe.kernels imports qe.quantizers

        x = self.rotate_input(x)
        fused = forward_quant_linear(self, x)  # None unless the Triton backend covers this module
        if fused is not None:
            return fused
        xs = self.smooth_input(x)
        xq = xs if self.act_keep is None else xs * self.act_keep.to(xs.dtype)
        xq = fake_quantize_activations(xq, self.a_bits, self.static_act_scale)
        weight = self._dequantized
        if weight is None or weight.dtype != x.dtype:
            weight = self.dequantized_weight(x.dtype)
            self._dequantized = weight if self.keep_dequantized else None
        y = torch.nn.functional.linear(xq, weight, self.bias.to(x.dtype) if self.bias is not None else None)
        if self.compensator is not None:
            y = y + self.compensator(xs).to(y.dtype)
        return y

    def storage_bytes(self, include_compensator: bool = True) -> int:
        n = sum(b.numel() * b.element_size() for b in self.buffers(recurse=False) if b is not None)
        if include_compensator and self.compensator is not None:
            n += sum(t.numel() * t.element_size() for t in self.compensator.state_dict().values())
        return n

    def extra_repr(self) -> str:
        gran = "ch" if self.group_size == 0 else f"g{self.group_size}"
        return (f"in={self.in_features}, out={self.out_features}, W{self.bits}A{self.a_bits}{gran}"
                f"{'sym' if self.symmetric else 'asym'}, smoothed={self.input_scale is not None}"
                f"{', rotated' if self.input_rotation is not None else ''}")
