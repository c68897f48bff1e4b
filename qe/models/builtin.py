"""Built-in model adapters (registered through the ``qe_model_adapters`` hook)."""

from __future__ import annotations

from torch import nn

from qe.errors import ModelError
from qe.hookspecs import hookimpl
from qe.models.base import LLAMA_LINEARS, ModelAdapter, SmoothingGroup
from qe.models.families import FAMILY_ADAPTERS


class LlavaAdapter(ModelAdapter):
    """LLaVA / LLaVA-NeXT style models (CLIP or SigLIP tower, MLP projector, any Llama-style LM)."""

    name = "llava"
    model_types = ("llava", "llava_next")
    language_model_path = "model.language_model"
    image_placeholder = "<image>"
    vision_blocks_paths = ("model.vision_tower.encoder.layers", "model.vision_tower.vision_model.encoder.layers")
    projector_paths = ("model.multi_modal_projector",)


class CausalLMAdapter(ModelAdapter):
    """Text-only Llama-style causal LMs (Llama, Qwen2, Mistral, SmolLM2): every token is text."""

    name = "causal-lm"
    priority = 5
    model_types = ("llama", "qwen2", "qwen3", "mistral", "gemma", "phi3")
    language_model_path = "model"


_VISION_WORDS = ("vision", "visual", "image", "vit", "patch")


class GenericAdapter(ModelAdapter):
    """Fallback for unknown models: the largest non-vision ModuleList of blocks holding linears."""

    name = "generic"
    priority = 0

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return cls._find_blocks(model) is not None

    @staticmethod
    def _find_blocks(model: nn.Module) -> str | None:
        best, best_params = None, 0
        for path, mod in model.named_modules():
            if not isinstance(mod, nn.ModuleList) or len(mod) < 1:
                continue
            if any(w in path.lower() for w in _VISION_WORDS):
                continue
            if not any(isinstance(m, nn.Linear) for m in mod[0].modules()):
                continue
            n = sum(p.numel() for p in mod.parameters())
            if n > best_params:
                best, best_params = path, n
        return best

    def _path(self, model: nn.Module) -> str:
        path = self._find_blocks(model)
        if path is None:
            raise ModelError(
                f"{type(model).__name__}: no adapter fits and the generic fallback found no ModuleList of "
                "decoder blocks with nn.Linear layers outside the vision tower; write a model adapter plugin"
            )
        return path

    def language_model(self, model: nn.Module) -> nn.Module:
        parent = self._path(model).rsplit(".", 1)[0] if "." in self._path(model) else ""
        return model.get_submodule(parent) if parent else model

    def blocks_prefix(self, model: nn.Module) -> str:
        return self._path(model)

    def decoder_blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self._path(model))

    def block_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        if not linears:
            raise ModelError(f"block {type(block).__name__} holds no nn.Linear layers")
        return linears

    def smoothing_groups(self, block: nn.Module) -> list[SmoothingGroup]:
        names = list(self.block_linears(block))
        if set(names) <= set(LLAMA_LINEARS):
            return super().smoothing_groups(block)
        # Unknown layout: no folding, each linear smooths alone with an explicit scale.
        return [SmoothingGroup([n], None) for n in names]


@hookimpl
def qe_model_adapters():
    return [LlavaAdapter, *FAMILY_ADAPTERS, CausalLMAdapter, GenericAdapter]
