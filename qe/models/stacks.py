"""The vision tower and the projector as stacks of blocks, for ``--scope vision|all``.

A model adapter reads the language model's decoder blocks. For the vision scope the same
pipeline (capture → plan → quantize → fit, block by block) runs over the vision tower's
blocks and then over the projector, through adapters that present those modules as block
stacks: :class:`VisionStackAdapter` (the tower's ``ModuleList`` of encoder blocks) and
:class:`ProjectorStackAdapter` (the projector, one block). Their calibration inputs are
captured at their first block from the image samples' pixel inputs, and every token there is a
vision token. Stacks run in the model's order (tower, projector, language model), so with
``quantized`` propagation each stack is calibrated on the outputs of the quantized stacks
before it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from qe.errors import ConfigError, ModelError
from qe.modality import Modality
from qe.models.base import EncodedSample, ModelAdapter, SmoothingGroup

Scope = Literal["language", "vision", "all"]
SCOPES: tuple[str, ...] = ("language", "vision", "all")

# Linears that read one norm's output inside the vision blocks transformers ships (CLIP and
# SigLIP ``layer_norm1/2``, Qwen-VL ``norm1/2`` (Qwen3-VL ``mlp.linear_fc1``), InternVL ``layernorm_before/after``, Pixtral ``attention_norm``/``ffn_norm``): the
# first norm of each rule that the block has takes the smoothing fold. Linears no rule names
# smooth alone, with an explicit input scale.
_VISION_GROUPS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("layer_norm1",)),
    (("attention.q_proj", "attention.k_proj", "attention.v_proj"), ("layernorm_before", "attention_norm")),
    (("feed_forward.gate_proj", "feed_forward.up_proj"), ("ffn_norm",)),
    (("attn.qkv",), ("norm1",)),
    (("mlp.fc1",), ("layer_norm2", "layernorm_after", "norm2")),
    (("mlp.linear_fc1",), ("norm2",)),
    (("mlp.gate_proj", "mlp.up_proj"), ("norm2",)),
)


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ConfigError(f"--scope {scope!r} unknown: use one of {', '.join(SCOPES)}")
    return scope


class VisionStackAdapter(ModelAdapter):
    """The vision tower's encoder blocks of a model that ``parent`` reads."""

    name = "vision-tower"
    stack = "vision"

    def __init__(self, parent: ModelAdapter, path: str):
        super().__init__()
        self.parent, self.path = parent, path

    def language_model(self, model: nn.Module) -> nn.Module:
        # The module whose call holds the blocks (capture hooks it for between-block inputs).
        parent = self.path.rsplit(".", 1)[0]
        return model.get_submodule(parent)

    def blocks_prefix(self, model: nn.Module) -> str:
        return self.path

    def decoder_blocks(self, model: nn.Module) -> nn.ModuleList:
        blocks = model.get_submodule(self.path)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise ModelError(f"{type(model).__name__}: no vision blocks at {self.path!r}")
        return blocks

    def block_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        if not linears:
            raise ModelError(f"{type(block).__name__} at {self.path} holds no nn.Linear layers")
        return linears

    def smoothing_groups(self, block: nn.Module) -> list[SmoothingGroup]:
        names = list(self.block_linears(block))
        out, used = [], set()
        for linears, norms in _VISION_GROUPS:
            members = [n for n in linears if n in names]
            if not members:
                continue
            norm = next((m for m in norms if _is_module(block, m)), None)
            out.append(SmoothingGroup(members, norm))
            used.update(members)
        out.extend(SmoothingGroup([n], None) for n in names if n not in used)
        return sorted(out, key=lambda g: names.index(g.linears[0]))  # the block's own order

    def capture_modality(self, modality: torch.Tensor, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        # Patch tokens: as many as the captured hidden states hold, all vision.
        return torch.full((hidden.shape[:-1].numel(),), int(Modality.VISION), dtype=torch.int8)

    def calibration_samples(self, encoded: list[EncodedSample]) -> list[EncodedSample]:
        return [e for e in encoded if any(k.startswith("pixel_values") for k in e.inputs)]


class ProjectorStackAdapter(VisionStackAdapter):
    """The projector between the vision tower and the language model, as a one-block stack."""

    name = "projector"
    stack = "projector"

    def block_prefix(self, model: nn.Module, index: int) -> str:
        return self.path

    def decoder_blocks(self, model: nn.Module) -> nn.ModuleList:
        # A list that holds the projector without re-parenting it (names stay the model's).
        return nn.ModuleList([model.get_submodule(self.path)])

    def smoothing_groups(self, block: nn.Module) -> list[SmoothingGroup]:
        # A projector's norm feeds reshaped (pixel-shuffled, merged) features: nothing folds.
        return [SmoothingGroup([n], None) for n in self.block_linears(block)]

    def __init__(self, parent: ModelAdapter, path: str, module: nn.Module):
        super().__init__(parent, path)
        self.module = module

    @torch.no_grad()
    def capture_modality(self, modality: torch.Tensor, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        # A projector may merge patches before its linears (Qwen-VL merges 2 x 2, Idefics3
        # pixel-shuffles): its tokens are the rows its linears read, counted on a dry run.
        rows: set[int] = set()
        handles = [m.register_forward_pre_hook(lambda mod, args: rows.add(args[0].shape[:-1].numel()))
                   for m in self.module.modules() if isinstance(m, nn.Linear)]
        try:
            self.module(hidden, **kwargs)
        finally:
            for h in handles:
                h.remove()
        if len(rows) != 1:
            raise ModelError(f"the linears of the projector at {self.path} read different numbers of tokens "
                             f"({sorted(rows)}): qe cannot calibrate it; use --scope language")
        return torch.full((rows.pop(),), int(Modality.VISION), dtype=torch.int8)


def _is_module(root: nn.Module, name: str) -> bool:
    try:
        root.get_submodule(name)
        return True
    except AttributeError:
        return False


def first_path(model: nn.Module, paths: tuple[str, ...]) -> str | None:
    return next((p for p in paths if _is_module(model, p)), None)


def scope_adapters(adapter: ModelAdapter, model: nn.Module, scope: str) -> list[ModelAdapter]:
    """The adapters of the stacks ``scope`` covers, in the order the model runs them."""
    check_scope(scope)
    out: list[ModelAdapter] = []
    if scope in ("vision", "all"):
        blocks = first_path(model, adapter.vision_blocks_paths)
        if blocks is None:
            raise ConfigError(f"--scope {scope}: adapter {adapter.name!r} knows no vision tower blocks in "
                              f"{type(model).__name__}: use --scope language")
        out.append(VisionStackAdapter(adapter, blocks))
        projector = first_path(model, adapter.projector_paths)
        from qe.quantizers.qlinear import QuantLinear

        linear = (nn.Linear, QuantLinear)  # a projector quantized already (resume) is still one
        if projector is not None and any(isinstance(m, linear) for m in model.get_submodule(projector).modules()):
            out.append(ProjectorStackAdapter(adapter, projector, model.get_submodule(projector)))
    if scope in ("language", "all"):
        out.append(adapter)
    return out


def vision_samples(adapter: ModelAdapter, encoded: list[EncodedSample], scope: str) -> list[EncodedSample]:
    """The calibration samples a vision stack reads; one line when there are none."""
    samples = adapter.calibration_samples(encoded)
    if not samples:
        raise ConfigError(f"--scope {scope} needs image calibration samples and the calibration set has none: "
                          "use --calib images (or a JSONL file with images)")
    return samples
