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
for ``load_state_dict``. On CUDA the Triton kernels (:mod:`qe.kernels`) compute the same forwards;
these torch forwards are the reference semantics.
"""

from __future__ import annotations

from typing import Any

import torch

from qe.compensators.base import CompensatorModule
from qe.errors import ConfigError
from qe.quantized import fake_quantize_activations

ROUTINGS = ("router", "random", "oracle")
MAX_EXPERTS = 4096  # a layout asking for more is taken as damaged


def _int_in(value: Any, lo: int, hi: int) -> bool:
    return type(value) is int and lo <= value <= hi


def _common_problem(layout: dict[str, Any], d_in: int, d_out: int, keys: set[str]) -> str | None:
    if layout.get("d_in") != d_in or layout.get("d_out") != d_out:
        return "the compensator's d_in/d_out are not the linear's"
    if layout.get("input_bits", 16) not in (8, 16):
        return f"compensator input_bits {layout.get('input_bits')!r} not 8 or 16"
    extra = set(layout) - keys - {"type"}  # "type": checkpoints of format 1
    return f"unknown compensator key(s) {sorted(extra)}" if extra else None


def _branch_input(x: torch.Tensor, input_bits: int) -> torch.Tensor:
    return fake_quantize_activations(x, input_bits) if input_bits < 16 else x


class LowRankAdapter(CompensatorModule):
    """``y = (x̃ Bᵀ) Aᵀ`` with ``A`` ``(d_out, r)`` and ``B`` ``(r, d_in)``."""

    module_type = "lowrank"

    def __init__(self, d_in: int, d_out: int, rank: int, input_bits: int = 16):
        super().__init__()
        if input_bits not in (8, 16):
            raise ConfigError(f"branch input bits {input_bits} unsupported: use 8 or 16")
        self.d_in, self.d_out, self.rank, self.input_bits = d_in, d_out, rank, input_bits
        self.register_buffer("A", torch.zeros(d_out, rank))
        self.register_buffer("B", torch.zeros(rank, d_in))

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, input_bits: int = 16) -> LowRankAdapter:
        m = cls(B.shape[1], A.shape[0], A.shape[1], input_bits)
        m.A.copy_(A)
        m.B.copy_(B)
        return m

    def layout(self) -> dict[str, Any]:
        return {"d_in": self.d_in, "d_out": self.d_out, "rank": self.rank, "input_bits": self.input_bits}

    @classmethod
    def layout_problem(cls, layout: dict[str, Any], d_in: int, d_out: int) -> str | None:
        problem = _common_problem(layout, d_in, d_out, {"d_in", "d_out", "rank", "input_bits"})
        max_rank = min(d_in, d_out)
        if problem is None and not _int_in(layout.get("rank"), 1, max_rank):
            problem = f"rank {layout.get('rank')!r} not in 1..{max_rank}"
        return problem

    @classmethod
    def from_layout(cls, layout: dict[str, Any]) -> LowRankAdapter:
        return cls(layout["d_in"], layout["d_out"], layout["rank"], layout.get("input_bits", 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = _branch_input(x, self.input_bits)
        return (xb @ self.B.to(xb.dtype).T) @ self.A.to(xb.dtype).T

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, input_bits={self.input_bits}"


class QuantExpertsAdapter(CompensatorModule):
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
    ):
        super().__init__()
        if input_bits not in (8, 16):
            raise ConfigError(f"branch input bits {input_bits} unsupported: use 8 or 16")
        if routing not in ROUTINGS:
            raise ConfigError(f"routing {routing!r} unknown: use one of {', '.join(ROUTINGS)}")
        self.d_in, self.d_out = d_in, d_out
        self.shared_rank, self.num_experts, self.expert_rank = shared_rank, num_experts, expert_rank
        self.input_bits, self.routing, self.seed = input_bits, routing, seed
        self.register_buffer("A_s", torch.zeros(d_out, shared_rank))
        self.register_buffer("B_s", torch.zeros(shared_rank, d_in))
        self.register_buffer("A", torch.zeros(num_experts, d_out, expert_rank))
        self.register_buffer("B", torch.zeros(num_experts, expert_rank, d_in))
        self.register_buffer("R", torch.zeros(num_experts, d_in))
        self.register_buffer("E_S", torch.zeros(d_out, d_in) if routing == "oracle" else None)

    def layout(self) -> dict[str, Any]:
        return {
            "d_in": self.d_in, "d_out": self.d_out, "shared_rank": self.shared_rank,
            "num_experts": self.num_experts, "expert_rank": self.expert_rank, "input_bits": self.input_bits,
            "routing": self.routing, "seed": self.seed,
        }

    @classmethod
    def layout_problem(cls, layout: dict[str, Any], d_in: int, d_out: int) -> str | None:
        keys = {"d_in", "d_out", "shared_rank", "num_experts", "expert_rank", "input_bits", "routing", "seed"}
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
            return (x.abs() @ self.R.to(x.dtype).T).argmin(dim=1)
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
        for i in range(self.num_experts):  # one product per expert over all tokens
            norms[:, i] = (Y - (x @ self.B[i].to(x.dtype).T) @ self.A[i].to(x.dtype).T).norm(dim=1)
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
        return (x @ self.B_s.to(x.dtype).T) @ self.A_s.to(x.dtype).T

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
        start = 0
        for i, count in enumerate(counts):
            if count == 0:
                continue
            rows = order[start : start + count]
            chunk = x_sorted[start : start + count]
            out[rows] = (chunk @ self.B[i].to(x.dtype).T) @ self.A[i].to(x.dtype).T
            start += count
        return out

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, shared_rank={self.shared_rank}, num_experts={self.num_experts}, "
                f"expert_rank={self.expert_rank}, routing={self.routing}, input_bits={self.input_bits}")
