"""Mixture-of-experts decoders: each expert as its own linears.

transformers 5.x stores a sparse MLP's experts fused, as 3-D parameters of one module
(``gate_up_proj`` ``(E, 2·I, d)``, ``down_proj`` ``(E, d, I)``) called with the router's
top-k choices. qe quantizes and compensates ``nn.Linear`` layers with the tokens that reach
them, so :func:`unfuse_experts` replaces each such module by :class:`RoutedExperts`: a list
of :class:`ExpertMLP` (``gate_proj``, ``up_proj``, ``down_proj`` linears) whose forward is
the fused one's, expert by expert. Each expert then sees exactly the tokens routed to it,
and its :attr:`ExpertMLP.routed` rows tell the statistics hooks which tokens those are.

The same replacement runs when a checkpoint is loaded (on the meta device, before the
quantized modules are installed), so ``load_quantized`` rebuilds the structure it saved.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, d: int, inter: int, act_fn: nn.Module, device=None, dtype=None):
        super().__init__()
        self.gate_proj = nn.Linear(d, inter, bias=False, device=device, dtype=dtype)
        self.up_proj = nn.Linear(d, inter, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(inter, d, bias=False, device=device, dtype=dtype)
        self.act_fn = act_fn
        # Rows (of the flattened batch) routed to this expert during the current call; the
        # statistics hooks read them to tag each routed token with its modality and position.
        self.routed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class RoutedExperts(nn.ModuleList):
    """Experts as separate :class:`ExpertMLP` modules, called like the fused module they
    replace: ``(hidden (N, d), top_k_index (N, k), top_k_weights (N, k)) -> (N, d)``."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        # Experts in index order, as the fused loop; an index past the last expert is a dropped choice.
        hit = [e for e in torch.unique(top_k_index).tolist() if 0 <= e < len(self)]
        for e in hit:
            token_idx, k_pos = torch.where(top_k_index == e)
            expert = self[e]
            expert.routed = token_idx
            try:
                y = expert(hidden_states[token_idx])
            finally:
                expert.routed = None
            y = y * top_k_weights[token_idx, k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _fused_shapes(module: nn.Module) -> tuple[int, int, int] | None:
    """(experts, hidden, intermediate) of a fused experts module of the layout above, else None."""
    gate_up = module._parameters.get("gate_up_proj")
    down = module._parameters.get("down_proj")
    if gate_up is None or down is None or gate_up.dim() != 3 or down.dim() != 3:
        return None
    if module._parameters.get("gate_up_proj_bias") is not None or module._parameters.get("down_proj_bias") is not None:
        return None  # biased experts (gpt-oss) follow another formula
    e, two_i, d = gate_up.shape
    if two_i % 2 or tuple(down.shape) != (e, d, two_i // 2) or not isinstance(getattr(module, "act_fn", None), nn.Module):
        return None
    return e, d, two_i // 2


@torch.no_grad()
def _unfused(module: nn.Module, shapes: tuple[int, int, int]) -> RoutedExperts:
    e, d, inter = shapes
    gate_up, down = module.gate_up_proj, module.down_proj
    experts = RoutedExperts([ExpertMLP(d, inter, module.act_fn, device=gate_up.device, dtype=gate_up.dtype)
                             for _ in range(e)])
    if gate_up.device.type != "meta":
        for i, ex in enumerate(experts):
            ex.gate_proj.weight.copy_(gate_up[i, :inter])
            ex.up_proj.weight.copy_(gate_up[i, inter:])
            ex.down_proj.weight.copy_(down[i])
    return experts


@torch.no_grad()
def _same_function(fused: nn.Module, experts: RoutedExperts, d: int) -> bool:
    """Whether the unfused experts compute what the fused module does, on a probe batch."""
    n = len(experts)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, d, generator=g).to(fused.gate_up_proj)
    k = min(2, n)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(16)]).to(x.device)
    w = torch.rand(16, k, generator=g).to(x)
    try:
        ref = fused(x, idx, w)
    except Exception:  # a fused forward with another call signature: leave it fused
        return False
    got = experts(x, idx, w)
    tol = 1e-4 if x.dtype == torch.float32 else 1e-2
    return bool(torch.allclose(ref, got, rtol=tol, atol=tol))


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module of ``model`` by :class:`RoutedExperts`; return their
    names. A module whose forward the replacement does not reproduce (checked on a probe
    batch, except on the meta device) is left fused, with a warning: its experts stay in full
    precision."""
    done = []
    for name, module in list(model.named_modules()):
        if isinstance(module, RoutedExperts):
            continue
        shapes = _fused_shapes(module)
        if shapes is None:
            continue
        if module.gate_up_proj.device.type == "meta" and getattr(module, "_hf_hook", None) is not None:
            # offloaded by accelerate: the weights live in its offload store, not here
            log.warning("qe: %s is offloaded: its experts are left fused, in full precision", name)
            continue
        experts = _unfused(module, shapes)
        if module.gate_up_proj.device.type != "meta" and not _same_function(module, experts, shapes[1]):
            log.warning("qe: %s (%s) does not compute act(gate)·up → down per expert as expected: its experts "
                        "are left fused, in full precision", name, type(module).__name__)
            continue
        model.set_submodule(name, experts)
        done.append(name)
    return done


def expert_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The routed experts' linears of one block, by name relative to the block."""
    out: dict[str, nn.Linear] = {}
    for path, module in block.named_modules():
        if isinstance(module, RoutedExperts):
            for i, ex in enumerate(module):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    lin = getattr(ex, proj)
                    if isinstance(lin, nn.Linear):
                        out[f"{path}.{i}.{proj}"] = lin
    return out


def routed_owner(block: nn.Module, linear_name: str) -> ExpertMLP | None:
    """The expert a linear belongs to, or None for a linear every token reaches."""
    parent = linear_name.rsplit(".", 1)[0] if "." in linear_name else ""
    try:
        owner = block.get_submodule(parent)
    except AttributeError:
        return None
    return owner if isinstance(owner, ExpertMLP) else None
