"""The ``rotate`` transform: orthogonal rotations that leave the full-precision model unchanged
and spread activation outliers over all channels, so that 4-bit activations lose less.

Two kinds of rotation (docs/method.md, rotations):

* **the residual stream**, offline: every vector of the stream is multiplied by one orthogonal
  ``Q`` (``d × d``): the embeddings (``E ← E Q``), what vision features enter it through (the
  projector's last linear, ``W ← Qᵀ W``), the linears that write into it (o_proj, down_proj:
  ``W ← Qᵀ W``) and those that read it (q/k/v, gate/up, the LM head: ``W ← W diag(g) Q``, after
  folding the gain ``g`` of the RMSNorm before them, whose weight becomes the identity).
  RMSNorm without a gain commutes with ``Q`` (it divides by the norm of the vector, which
  ``Q`` keeps), so the model's outputs are unchanged. Tied embeddings are untied first (the
  head gets ``diag(g) Q`` folded in, the embeddings only ``Q``). ``Q`` is a randomized
  Hadamard matrix (``kind=hadamard``: ``diag(±1) H``) or a seeded Haar-random orthogonal one
  (``kind=random``).
* **online**, inside the blocks: o_proj and down_proj read activations no offline rotation
  reaches, so their inputs are rotated when the layer runs, ``x ← (x ⊙ r) H`` (``r`` seeded
  signs, ``H`` the Hadamard matrix of the input width, applied by a fast Walsh–Hadamard
  transform), and their weights hold ``W diag(r) H`` so the product is unchanged. Before
  quantization the layer is a :class:`RotatedLinear`; the quantized layer keeps ``r`` in
  ``QuantLinear.input_rotation``.

Where an adapter says the residual stream cannot be rotated (Gemma 3's norms after the
attention and MLP outputs; the generic adapter), only the online rotations are made, with a
warning in the run's record. ``smooth=NAME`` runs a smoothing transform (``smoothquant``,
``awq``, ``alpha-search``, with its default parameters) per group afterwards, in the rotated basis.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from qe.errors import ConfigError, ModelError
from qe.transforms import smoothing
from qe.transforms.base import GroupContext, GroupScales, ModelContext, Transform
from qe.transforms.hadamard import hadamard_rows, has_hadamard, random_orthogonal, random_signs

# --------------------------------------------------------------------------- online rotation


def _rotate_input(module: RotatedLinear, args: tuple):
    from qe.kernels.ops import hadamard_transform

    x = args[0]
    return (hadamard_transform(x, module.input_rotation.to(x.device)), *args[1:])


class RotatedLinear(nn.Linear):
    """An ``nn.Linear`` whose input is rotated online, ``x ← (x ⊙ r) H``, before it is read, by a
    forward pre-hook registered first (so statistics hooks added later see the rotated input);
    ``weight`` is already ``W diag(r) H``. It stands for the layer until it is quantized."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("input_rotation", torch.ones(in_features, dtype=torch.int8, device=device))
        self.register_forward_pre_hook(_rotate_input)

    @classmethod
    def from_linear(cls, lin: nn.Linear, signs: torch.Tensor) -> RotatedLinear:
        """``lin`` with its weight moved into the rotated basis (``W diag(r) H``)."""
        w = lin.weight
        new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
        new.weight = nn.Parameter(hadamard_rows(w.detach(), signs).to(w.dtype), requires_grad=w.requires_grad)
        if lin.bias is not None:
            new.bias = lin.bias
        new.input_rotation = signs.to(device=w.device, dtype=torch.int8)
        return new


def online_rotation(module: nn.Module) -> torch.Tensor | None:
    """The signs of a linear's online rotation, or None when it has none."""
    return module.input_rotation if isinstance(module, RotatedLinear) else None


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "little")


# --------------------------------------------------------------------------- norms


def _norm_kind(norm: nn.Module) -> str | None:
    """``"rms"`` (``x̂ · w``) or ``"gemma"`` (``x̂ · (1 + w)``) for an RMSNorm whose gain can be
    taken out (checked on a copy with a probe input); None otherwise (LayerNorm subtracts the
    mean, which a rotation does not commute with)."""
    kinds = [k for k in smoothing._candidate_kinds(norm) if k in ("rms", "gemma")]
    weight = getattr(norm, "weight", None)
    if not kinds or not isinstance(weight, torch.Tensor) or getattr(norm, "bias", None) is not None:
        return None
    probe = torch.randn(4, weight.numel(), generator=torch.Generator().manual_seed(0)).to(weight)
    tol = 1e-4 if weight.dtype in (torch.float32, torch.float64) else 2e-2
    with torch.no_grad():
        expected = norm(probe).float()
        for kind in kinds:
            trial = copy.deepcopy(norm)
            gain = _gain(trial, kind)
            _reset(trial, kind)
            got = trial(probe).float() * gain.float()
            if torch.allclose(got, expected, rtol=tol, atol=tol * float(expected.abs().max().clamp_min(1e-30))):
                return kind
    return None


def _gain(norm: nn.Module, kind: str) -> torch.Tensor:
    w = norm.weight.detach().double()
    return 1.0 + w if kind == "gemma" else w


def _reset(norm: nn.Module, kind: str) -> None:
    with torch.no_grad():
        norm.weight.fill_(0.0 if kind == "gemma" else 1.0)


# --------------------------------------------------------------------------- residual stream


@dataclass
class _Reader:
    norm: nn.Module
    kind: str
    linears: list[nn.Linear]


def _residual_plan(model: nn.Module, adapter) -> tuple[list[_Reader], list[nn.Linear]] | str:
    """Every (norm, linears) pair that reads the residual stream and every linear that writes
    into it, or why the stream cannot be rotated."""
    issue = adapter.residual_rotation_issue(model)
    if issue:
        return issue
    readers: list[_Reader] = []
    writers: list[nn.Linear] = []
    final = adapter.final_norm(model)
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return "the model has no linear LM head"
    kind = _norm_kind(final)
    if kind is None:
        return f"the final norm ({type(final).__name__}) is not an RMSNorm whose gain can be folded"
    readers.append(_Reader(final, kind, [head]))
    for i, block in enumerate(adapter.decoder_blocks(model)):
        linears = adapter.block_linears(block)
        reading: set[str] = set()
        for group in adapter.smoothing_groups(block):
            if group.norm not in (adapter.attention_input_norm, adapter.mlp_input_norm):
                continue
            norm = block.get_submodule(group.norm)
            kind = _norm_kind(norm)
            if kind is None:
                return f"block {i}'s {group.norm} ({type(norm).__name__}) is not an RMSNorm whose gain can be folded"
            readers.append(_Reader(norm, kind, [linears[n] for n in group.linears]))
            reading.update(group.linears)
        writing = [n for n in adapter.residual_output_linears if n in linears]
        for n in linears:
            if n not in reading and n not in writing:
                return f"block {i}'s {n} neither reads nor writes the residual stream as the adapter describes it"
        writers.extend(linears[n] for n in writing)
    return readers, writers


class ResidualRotation:
    """The residual stream's orthogonal ``Q`` (``d × d``): ``diag(r) H`` for ``kind=hadamard``
    (applied by butterflies), a seeded Haar-random matrix for ``kind=random``."""

    def __init__(self, d: int, kind: str, seed: int):
        self.d, self.kind = d, kind
        if kind == "random":
            self.q: torch.Tensor | None = random_orthogonal(d, seed)
            self.signs = None
        else:
            if not has_hadamard(d):
                raise ConfigError(f"rotate: no Hadamard matrix of order {d} (the hidden size) is known to qe: "
                                  "use rotate[kind=random]")
            self.q, self.signs = None, random_signs(d, seed)

    def matrix(self) -> torch.Tensor:
        """``Q`` as a dense float64 matrix."""
        return self.q if self.q is not None else hadamard_rows(torch.eye(self.d, dtype=torch.float64), self.signs)

    def right(self, w: torch.Tensor) -> torch.Tensor:
        """``w Q`` in float64 for ``w`` ``(r, d)``."""
        if self.q is not None:
            return w.double() @ self.q.to(w.device)
        return hadamard_rows(w, self.signs)


@torch.no_grad()
def rotate_residual(model: nn.Module, adapter, q: ResidualRotation) -> None:
    """Rotate the residual stream of ``model`` by ``q`` in place (see the module docstring)."""
    plan = _residual_plan(model, adapter)
    if isinstance(plan, str):
        raise ModelError(f"cannot rotate the residual stream: {plan}")
    readers, writers = plan
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head.weight is emb.weight:  # tied: the head gets the final norm's gain, the embeddings do not
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            config.tie_word_embeddings = False

    def rows(w: torch.Tensor, gain: torch.Tensor | None = None) -> None:  # rows read the stream: w ← w diag(g) Q
        x = w.double() if gain is None else w.double() * gain.to(w.device)
        w.copy_(q.right(x).to(w.dtype))

    def columns(w: torch.Tensor) -> None:  # rows are outputs in the stream: w ← Qᵀ w = (wᵀ Q)ᵀ
        w.copy_(q.right(w.double().T).T.to(w.dtype))

    rows(emb.weight)
    for name in adapter.vision_output_vectors:
        try:
            vec = model.get_parameter(name)
        except AttributeError:
            continue
        vec.copy_(q.right(vec.double()[None, :])[0].to(vec.dtype))
    for lin in [*adapter.vision_output_modules(model).values(), *writers]:
        columns(lin.weight)
        if lin.bias is not None:
            lin.bias.copy_(q.right(lin.bias.double()[None, :])[0].to(lin.bias.dtype))
    for r in readers:
        gain = _gain(r.norm, r.kind)
        for lin in r.linears:
            rows(lin.weight, gain)
        _reset(r.norm, r.kind)


# --------------------------------------------------------------------------- the plugin


@dataclass(frozen=True)
class RotateConfig:
    kind: Literal["hadamard", "random"] = "hadamard"  # the residual stream's rotation
    seed: int = 0  # of the random signs (hadamard) or matrix (random), and of the online rotations' signs
    online: bool = True  # rotate o_proj's and down_proj's inputs online
    smooth: str = "none"  # a smoothing transform run per group after the rotation (its defaults)

    def __post_init__(self) -> None:
        if self.smooth != "none":
            from qe.plugins import default_manager

            entries = default_manager().entries("transform")
            if self.smooth not in entries:
                raise ConfigError(f"rotate: smooth={self.smooth!r} is not a transform; use one of "
                                  f"{', '.join(sorted(n for n in entries if n != 'rotate'))}")
            if self.smooth == "rotate":
                raise ConfigError("rotate: smooth=rotate would rotate twice; name a smoothing transform "
                                  "(smoothquant, awq, alpha-search)")


class Rotate(Transform):
    """Orthogonal rotations (residual stream offline, o_proj/down_proj inputs online), then optional smoothing."""

    name = "rotate"
    Config = RotateConfig

    def __init__(self, config: RotateConfig | None = None):
        super().__init__(config)
        self.smoothing: Transform | None = None
        if self.config.smooth != "none":
            from qe.plugins import default_manager

            self.smoothing = default_manager().create("transform", self.config.smooth)
            self.needs_hessian = self.smoothing.needs_hessian  # type: ignore[misc]

    def needs_calibration(self) -> bool:
        return self.smoothing is not None and self.smoothing.needs_calibration()

    def smooths(self) -> bool:
        return self.smoothing is not None and self.smoothing.smooths()

    def changes_model(self) -> bool:
        return True

    def group_scales(self, group: GroupContext) -> GroupScales | None:
        return self.smoothing.group_scales(group) if self.smoothing is not None else None

    def prepare_model(self, model: ModelContext) -> list[str]:
        return rotate_model(model, kind=self.config.kind, seed=self.config.seed, online=self.config.online)


def rotate_model(ctx: ModelContext, *, kind: str = "hadamard", seed: int = 0, online: bool = True) -> list[str]:
    """Apply the residual rotation (where the adapter allows it) and the online rotations (to
    the residual-writing linears among ``ctx.linears``); return warnings."""
    model, adapter = ctx.model, ctx.adapter
    warnings: list[str] = []
    plan = _residual_plan(model, adapter)
    if isinstance(plan, str):
        warnings.append(f"rotate: the residual stream is not rotated ({plan}); only the online rotations apply")
    else:
        d = model.get_input_embeddings().weight.shape[1]
        rotate_residual(model, adapter, ResidualRotation(d, kind, seed))
    if not online:
        return warnings
    blocks = adapter.decoder_blocks(model)
    prefix = adapter.blocks_prefix(model)
    skipped = []
    for i, block in enumerate(blocks):
        for name in adapter.residual_output_linears:
            full = f"{prefix}.{i}.{name}"
            lin = ctx.linears.get(full)
            if lin is None or isinstance(lin, RotatedLinear):
                continue
            if not has_hadamard(lin.in_features):
                skipped.append(full)
                continue
            rotated = RotatedLinear.from_linear(lin, random_signs(lin.in_features, _seed_for(seed, full)))
            block.set_submodule(name, rotated)
            ctx.linears[full] = rotated
    if skipped:
        warnings.append(f"rotate: no Hadamard matrix of the input width of {len(skipped)} linear(s) "
                        f"({skipped[0]}, ...): they are not rotated online")
    return warnings
