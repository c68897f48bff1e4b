"""The modules a compensator adds to a quantized linear (docs/method.md, inference).

Both read the smoothed, unquantized input ``x̃`` (``(..., d_in)``) and return ``(..., d_out)``;
:class:`qe.quantizers.qlinear.QuantLinear` adds that to its own output. With
``input_bits = 8`` the branch input is first fake-quantized per token (dynamic, symmetric),
and the router reads that same quantized input.

    LowRankAdapter:      y = A (B x̃)
    QuantExpertsAdapter: y = A_s (B_s x̃) + A_{i*} (B_{i*} x̃),   i* = argmin_i (R |x̃|)_i

Both follow the :class:`~qe.compensators.base.CompensatorModule` contract: every tensor is a
registered buffer with its own storage, so ``state_dict`` round-trips through safetensors, and
``layout()`` holds the shapes and options that ``from_layout`` needs to build an empty module
for ``load_state_dict``.

``adapter_bits`` is the precision the factors (and the router) are stored and run in:

* 32: float32 buffers named after the factor (``A``, ``B`` …); a checkpoint stores them in
  ``--adapter-dtype``;
* 16: float16 buffers of the same names, stored as they are;
* 8: symmetric integer codes (``A_codes``, uint8, one byte per value) and one float32 step per
  rank component (``A_scale``: a column of ``A``, a row of ``B``; a row of the router), stored
  as they are; ``A`` is stored transposed so that each step's values form one row;
* 4: the same with 4-bit codes, two per byte, each row packed as the base weights are
  (:mod:`qe.packing`: a row of ``c`` codes takes ``4 · ⌈c / 8⌉`` bytes).

:meth:`FactorModule.factor` returns any factor as float32 whatever its storage; the fit writes a
factor with :meth:`FactorModule.set_factor` and reads back what was stored, so that it refits
the other factor to the stored values (qe.compensators.factor_bits). On CUDA the Triton kernels (:mod:`qe.kernels`) compute the same forwards;
these torch forwards are the reference semantics.
"""

from __future__ import annotations

from typing import Any

import torch

from qe.compensators.base import CompensatorModule
from qe.errors import ConfigError
from qe.packing import pack, packed_columns, unpack
from qe.quantized import dequantize_symmetric, fake_quantize_activations, quantize_symmetric

ROUTINGS = ("router", "random", "oracle")
MAX_EXPERTS = 4096  # a layout asking for more is taken as damaged
ADAPTER_BITS = (32, 16, 8, 4)


def check_adapter_bits(bits: Any, owner: str = "adapter_bits") -> None:
    if bits not in ADAPTER_BITS:
        raise ConfigError(f"{owner}={bits!r} unsupported: use one of {', '.join(map(str, ADAPTER_BITS))}")


def round_factor(t: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """``t`` (float32) as a factor stored in ``bits`` holds it: itself (32), rounded to float16
    (16), or quantized symmetrically with one step per slice along ``dim`` (8)."""
    if bits == 32:
        return t.float()
    if bits == 16:
        return t.half().float()
    if t.numel() == 0:
        return t.float()
    codes, scale = quantize_symmetric(t, bits, dim)
    return dequantize_symmetric(codes, scale, bits)


def _int_in(value: Any, lo: int, hi: int) -> bool:
    return type(value) is int and lo <= value <= hi


def _common_problem(layout: dict[str, Any], d_in: int, d_out: int, keys: set[str]) -> str | None:
    if layout.get("d_in") != d_in or layout.get("d_out") != d_out:
        return "the compensator's d_in/d_out are not the linear's"
    if layout.get("input_bits", 16) not in (8, 16):
        return f"compensator input_bits {layout.get('input_bits')!r} not 8 or 16"
    if layout.get("adapter_bits", 32) not in ADAPTER_BITS:
        return f"compensator adapter_bits {layout.get('adapter_bits')!r} not one of {ADAPTER_BITS}"
    extra = set(layout) - keys - {"type"}  # "type": checkpoints of format 1
    return f"unknown compensator key(s) {sorted(extra)}" if extra else None


def _branch_input(x: torch.Tensor, input_bits: int) -> torch.Tensor:
    return fake_quantize_activations(x, input_bits) if input_bits < 16 else x


def _stored_shape(shape: tuple[int, ...], dim: int) -> tuple[int, ...]:
    """Integer factors are stored with their step dimension last (``A`` transposed), so that one
    step serves one row of codes."""
    if dim not in (-1, -2):
        raise ValueError(f"a factor's step runs along dimension -1 or -2, not {dim}")
    return shape if dim == -1 else (*shape[:-2], shape[-1], shape[-2])


class FactorModule(CompensatorModule):
    """A compensator module whose tensors are factors stored in ``adapter_bits`` (module docstring)."""

    def __init__(self, adapter_bits: int = 32):
        super().__init__()
        check_adapter_bits(adapter_bits)
        self.adapter_bits = adapter_bits
        self._factors: dict[str, tuple[tuple[int, ...], int]] = {}  # name → (shape, dim of one step)
        self._cache: dict[str, torch.Tensor] = {}
        self._caching = True

    def _add_factor(self, name: str, shape: tuple[int, ...], dim: int) -> None:
        self._factors[name] = (tuple(shape), dim)
        bits = self.adapter_bits
        if bits >= 16:
            self.register_buffer(name, torch.zeros(shape, dtype=torch.float32 if bits == 32 else torch.float16))
            return
        stored = _stored_shape(shape, dim)
        rows = 1
        for n in stored[:-1]:
            rows *= n
        width = stored[-1] if bits == 8 else packed_columns(stored[-1], bits)  # int8 codes stay unpacked
        self.register_buffer(f"{name}_codes", torch.zeros(rows, width, dtype=torch.uint8))
        self.register_buffer(f"{name}_scale", torch.ones(*stored[:-1], 1))

    def factor(self, name: str) -> torch.Tensor:
        """The factor ``name`` as float32 (the buffer itself when stored in float32)."""
        if self.adapter_bits == 32:
            return self.get_buffer(name)
        hit = self._cache.get(name)
        if hit is not None:
            return hit
        shape, dim = self._factors[name]
        if self.adapter_bits == 16:
            value = self.get_buffer(name).float()
        else:
            stored = _stored_shape(shape, dim)
            codes = self.get_buffer(f"{name}_codes")
            scale = self.get_buffer(f"{name}_scale")
            if codes.numel() == 0:
                value = scale.new_zeros(shape)
            else:
                if self.adapter_bits != 8:
                    codes = unpack(codes, self.adapter_bits, stored[-1])
                codes = codes.reshape(stored)
                value = dequantize_symmetric(codes, scale, self.adapter_bits)
                value = value if dim == -1 else value.transpose(-1, -2)
        if self._caching:
            self._cache[name] = value
        return value

    def set_factor(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Store ``value`` in this module's precision; return what is stored (float32)."""
        shape, dim = self._factors[name]
        value = value.detach().float().reshape(shape)
        self._cache.pop(name, None)
        if self.adapter_bits >= 16:
            self.get_buffer(name).copy_(value)
            return self.factor(name)
        if value.numel():
            stored = value if dim == -1 else value.transpose(-1, -2)
            codes, scale = quantize_symmetric(stored, self.adapter_bits, -1)
            codes = codes.reshape(-1, stored.shape[-1])
            if self.adapter_bits != 8:
                codes = pack(codes, self.adapter_bits)
            self.get_buffer(f"{name}_codes").copy_(codes)
            self.get_buffer(f"{name}_scale").copy_(scale)
        return self.factor(name)

    def set_caching(self, enabled: bool) -> None:
        self._caching = enabled
        if not enabled:
            self._cache = {}

    def castable_keys(self) -> set[str]:
        # Factors stored in 16 bits or fewer keep their own precision (the fit accounted for it).
        return super().castable_keys() if self.adapter_bits == 32 else set()

    def _apply(self, fn, recurse=True):
        self._cache = {}  # device or dtype changes invalidate the dequantized factors
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = {}
        return super()._load_from_state_dict(*args, **kwargs)


class LowRankAdapter(FactorModule):
    """``y = (x̃ Bᵀ) Aᵀ`` with ``A`` ``(d_out, r)`` and ``B`` ``(r, d_in)``."""

    module_type = "lowrank"

    def __init__(self, d_in: int, d_out: int, rank: int, input_bits: int = 16, adapter_bits: int = 32):
        super().__init__(adapter_bits)
        if input_bits not in (8, 16):
            raise ConfigError(f"branch input bits {input_bits} unsupported: use 8 or 16")
        self.d_in, self.d_out, self.rank, self.input_bits = d_in, d_out, rank, input_bits
        self._add_factor("A", (d_out, rank), dim=-2)
        self._add_factor("B", (rank, d_in), dim=-1)

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, input_bits: int = 16, adapter_bits: int = 32) -> LowRankAdapter:
        m = cls(B.shape[1], A.shape[0], A.shape[1], input_bits, adapter_bits)
        m.set_factor("A", A)
        m.set_factor("B", B)
        return m

    def layout(self) -> dict[str, Any]:
        out = {"d_in": self.d_in, "d_out": self.d_out, "rank": self.rank, "input_bits": self.input_bits}
        if self.adapter_bits != 32:  # older checkpoints have no key: float32
            out["adapter_bits"] = self.adapter_bits
        return out

    @classmethod
    def layout_problem(cls, layout: dict[str, Any], d_in: int, d_out: int) -> str | None:
        problem = _common_problem(layout, d_in, d_out, {"d_in", "d_out", "rank", "input_bits", "adapter_bits"})
        max_rank = min(d_in, d_out)
        if problem is None and not _int_in(layout.get("rank"), 1, max_rank):
            problem = f"rank {layout.get('rank')!r} not in 1..{max_rank}"
        return problem

    @classmethod
    def from_layout(cls, layout: dict[str, Any]) -> LowRankAdapter:
        return cls(layout["d_in"], layout["d_out"], layout["rank"], layout.get("input_bits", 16),
                   layout.get("adapter_bits", 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = _branch_input(x, self.input_bits)
        return (xb @ self.factor("B").to(xb.dtype).T) @ self.factor("A").to(xb.dtype).T

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, input_bits={self.input_bits}, "
                f"adapter_bits={self.adapter_bits}")


class QuantExpertsAdapter(FactorModule):
    """Shared expert plus top-1 routed low-rank experts (docs/method.md, inference).

    Buffers: ``A_s`` ``(d_out, r_s)``, ``B_s`` ``(r_s, d_in)``; ``A`` ``(N, d_out, r_r)``,
    ``B`` ``(N, r_r, d_in)``; router ``R`` ``(N, d_in)``. ``r_s = 0`` means no shared expert,
    ``N = 0`` no routed experts.

    ``routing`` chooses the expert of each token:

    * ``"router"`` (inference): ``i* = argmin_i (R |x̃|)_i``, ties to the lowest index;
    * ``"random"`` (ablation): uniform over experts, drawn from a generator seeded with
      ``seed`` at every call, so a given input always gets the same experts;
    * ``"oracle"`` (ablation): ``argmin_i ‖(E_S − A_i B_i) x̃‖``; it needs the residual weight
      error ``E_S`` ``(d_out, d_in)``, stored as an extra buffer (an ablation-only cost).

    The routed term is computed grouped by expert: tokens are sorted by expert and each
    expert with tokens does one pair of matmuls on its contiguous slice.
    """

    module_type = "quant_experts"

    def __init__(
        self,
        d_in: int,
        d_out: int,
        shared_rank: int,
        num_experts: int,
        expert_rank: int,
        input_bits: int = 16,
        routing: str = "router",
        seed: int = 0,
        adapter_bits: int = 32,
    ):
        super().__init__(adapter_bits)
        if input_bits not in (8, 16):
            raise ConfigError(f"branch input bits {input_bits} unsupported: use 8 or 16")
        if routing not in ROUTINGS:
            raise ConfigError(f"routing {routing!r} unknown: use one of {', '.join(ROUTINGS)}")
        self.d_in, self.d_out = d_in, d_out
        self.shared_rank, self.num_experts, self.expert_rank = shared_rank, num_experts, expert_rank
        self.input_bits, self.routing, self.seed = input_bits, routing, seed
        self._add_factor("A_s", (d_out, shared_rank), dim=-2)
        self._add_factor("B_s", (shared_rank, d_in), dim=-1)
        self._add_factor("A", (num_experts, d_out, expert_rank), dim=-2)
        self._add_factor("B", (num_experts, expert_rank, d_in), dim=-1)
        self._add_factor("R", (num_experts, d_in), dim=-1)
        self.register_buffer("E_S", torch.zeros(d_out, d_in) if routing == "oracle" else None)

    def layout(self) -> dict[str, Any]:
        out = {
            "d_in": self.d_in, "d_out": self.d_out, "shared_rank": self.shared_rank,
            "num_experts": self.num_experts, "expert_rank": self.expert_rank, "input_bits": self.input_bits,
            "routing": self.routing, "seed": self.seed,
        }
        if self.adapter_bits != 32:  # older checkpoints have no key: float32
            out["adapter_bits"] = self.adapter_bits
        return out

    @classmethod
    def layout_problem(cls, layout: dict[str, Any], d_in: int, d_out: int) -> str | None:
        keys = {"d_in", "d_out", "shared_rank", "num_experts", "expert_rank", "input_bits", "routing", "seed",
                "adapter_bits"}
        problem = _common_problem(layout, d_in, d_out, keys)
        if problem:
            return problem
        max_rank = min(d_in, d_out)
        for key in ("shared_rank", "expert_rank"):
            if not _int_in(layout.get(key), 0, max_rank):
                return f"{key} {layout.get(key)!r} not in 0..{max_rank}"
        if not _int_in(layout.get("num_experts"), 0, MAX_EXPERTS):
            return f"num_experts {layout.get('num_experts')!r} not in 0..{MAX_EXPERTS}"
        if layout.get("routing", "router") not in ROUTINGS or not _int_in(layout.get("seed", 0), 0, 2**63 - 1):
            return f"routing must be one of {', '.join(ROUTINGS)} and seed an integer"
        return None

    @classmethod
    def from_layout(cls, layout: dict[str, Any]) -> QuantExpertsAdapter:
        return cls(**{k: v for k, v in layout.items() if k != "type"})  # "type": checkpoints of format 1

    # ------------------------------------------------------------------ routing
    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Expert index ``(T,)`` of each token of ``x`` ``(T, d_in)`` (already branch-quantized)."""
        T = x.shape[0]
        if self.num_experts == 0:
            return torch.zeros(T, dtype=torch.long, device=x.device)
        if self.routing == "router":
            return (x.abs() @ self.factor("R").to(x.dtype).T).argmin(dim=1)
        if self.routing == "random":
            gen = torch.Generator().manual_seed(self.seed)
            return torch.randint(self.num_experts, (T,), generator=gen).to(x.device)
        return self.residual_norms(x).argmin(dim=1)

    def residual_norms(self, x: torch.Tensor) -> torch.Tensor:
        """``‖(E_S − A_i B_i) x̃_t‖`` ``(T, N)``; needs the oracle buffer ``E_S``."""
        if self.E_S is None:
            raise ConfigError("oracle routing needs the residual weight error E_S: build the adapter with routing='oracle'")
        Y = x @ self.E_S.to(x.dtype).T  # (T, d_out): E_S x̃
        norms = x.new_empty(x.shape[0], self.num_experts)
        A, B = self.factor("A"), self.factor("B")
        for i in range(self.num_experts):  # one product per expert over all tokens
            norms[:, i] = (Y - (x @ B[i].to(x.dtype).T) @ A[i].to(x.dtype).T).norm(dim=1)
        return norms

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xb = _branch_input(x, self.input_bits).reshape(-1, self.d_in)
        y = self.shared(xb)
        if self.num_experts > 0:
            y = y + self.routed(xb, self.route(xb))
        return y.reshape(*shape[:-1], self.d_out)

    def forward_with_assignment(self, x: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
        """Forward with a given expert per token (oracle / random evaluations and tests)."""
        shape = x.shape
        xb = _branch_input(x, self.input_bits).reshape(-1, self.d_in)
        y = self.shared(xb)
        if self.num_experts > 0:
            y = y + self.routed(xb, expert_index.reshape(-1))
        return y.reshape(*shape[:-1], self.d_out)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """``A_s (B_s x̃)`` for ``x`` ``(T, d_in)``; zeros without a shared expert."""
        if self.shared_rank == 0:
            return x.new_zeros(x.shape[0], self.d_out)
        return (x @ self.factor("B_s").to(x.dtype).T) @ self.factor("A_s").to(x.dtype).T

    def routed(self, x: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
        """``A_{i_t} (B_{i_t} x̃_t)`` for every token, one matmul pair per expert with tokens."""
        T = x.shape[0]
        out = x.new_zeros(T, self.d_out)
        if T == 0 or self.num_experts == 0:
            return out
        expert_index = expert_index.to(x.device).long()
        order = torch.argsort(expert_index, stable=True)
        counts = torch.bincount(expert_index, minlength=self.num_experts).tolist()
        x_sorted = x[order]
        A, B = self.factor("A"), self.factor("B")
        start = 0
        for i, count in enumerate(counts):
            if count == 0:
                continue
            rows = order[start : start + count]
            chunk = x_sorted[start : start + count]
            out[rows] = (chunk @ B[i].to(x.dtype).T) @ A[i].to(x.dtype).T
            start += count
        return out

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, shared_rank={self.shared_rank}, num_experts={self.num_experts}, "
                f"expert_rank={self.expert_rank}, routing={self.routing}, input_bits={self.input_bits}, "
                f"adapter_bits={self.adapter_bits}")
