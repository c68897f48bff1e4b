"""Adapters for the transformers-native VLM families beyond LLaVA.

Each family keeps the Llama-style decoder that :class:`~qe.models.base.ModelAdapter`
reads; an adapter here names where the language model sits, the image placeholder of the
plain prompt format and, where the stock processor cannot be loaded offline, how to rebuild
it. Remote-code checkpoints (InternVL2 with fused ``wqkv``) are not covered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qe.errors import ModelError
from qe.models.base import ModelAdapter


class ImageOnlyProcessorMixin:
    """For families whose stock processor builds a torchvision video processor.

    torchvision cannot be installed beside every torch, and ``AutoProcessor`` then falls back
    to a bare tokenizer; these adapters rebuild an image-only processor from the checkpoint's
    tokenizer and (PIL) image processor files instead.
    """

    @classmethod
    def processor_init_kwargs(cls, config) -> dict[str, Any]:
        return {}

    @classmethod
    def load_processor(cls, path: str | Path, config=None):
        """The image-only processor of the checkpoint at ``path`` (None: use AutoProcessor)."""
        from qe.models.processors import image_only_processor_class

        model_type = getattr(config, "model_type", None) or cls.model_types[0]
        processor_cls = image_only_processor_class(model_type)
        try:
            return processor_cls.from_pretrained(str(path), **cls.processor_init_kwargs(config))
        except ImportError as e:  # e.g. SmolVLM's processor needs num2words
            raise ModelError(f"cannot build the {model_type} processor: {str(e).splitlines()[0]}") from None
        except (OSError, ValueError, TypeError) as e:
            raise ModelError(
                f"cannot build the {model_type} processor from {path}: {str(e).splitlines()[0]}; the folder needs "
                "the tokenizer files and preprocessor_config.json (or processor_config.json)"
            ) from None


class QwenVLAdapter(ImageOnlyProcessorMixin, ModelAdapter):
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE: M-RoPE decoder at ``model.language_model``.

    Qwen3-VL-MoE's sparse blocks hold fused experts; :meth:`ModelAdapter.prepare_model`
    presents each expert as its own ``gate/up/down_proj`` linears (:mod:`qe.models.moe`).

    Their processors emit ``mm_token_type_ids`` (0 text, 1 image, 2 video) beside
    ``image_grid_thw``; the model needs both to place image tokens in its 3-D rotary
    positions. Answer tokens appended by :meth:`encode` are text (0).

    Qwen3-VL adds "deepstack" visual features to the hidden states of image tokens after
    each of its first decoder layers, in the language model's loop rather than inside the
    blocks: capture keeps them with each batch and the block walker adds them between blocks
    (:meth:`after_block`), or the vision tokens of the blocks after them would drift.
    """

    name = "qwen-vl"
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
    language_model_path = "model.language_model"
    image_placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    vision_blocks_paths = ("model.visual.blocks",)
    projector_paths = ("model.visual.merger",)  # Qwen3-VL's deepstack mergers stay in full precision

    def between_blocks_inputs(self, language_model_kwargs: dict[str, Any]) -> dict[str, Any]:
        # Qwen3-VL's deepstack: after decoder block i < len(embeds), the i-th visual feature map
        # is added to the hidden states at the visual positions.
        embeds = language_model_kwargs.get("deepstack_visual_embeds")
        mask = language_model_kwargs.get("visual_pos_masks")
        if embeds is None or mask is None:
            return {}
        return {"deepstack_visual_embeds": [e.detach() for e in embeds], "visual_pos_masks": mask.detach()}

    def after_block(self, index: int, hidden: torch.Tensor, between: dict[str, Any]) -> torch.Tensor:
        embeds = between.get("deepstack_visual_embeds")
        if not embeds or index >= len(embeds):
            return hidden
        mask = between["visual_pos_masks"].to(hidden.device)
        out = hidden.clone()
        out[mask, :] = out[mask, :] + embeds[index].to(hidden.device, hidden.dtype)
        return out

    def _image_marker(self, processor) -> str:
        image_token = getattr(processor, "image_token", None) or "<|image_pad|>"
        return f"<|vision_start|>{image_token}<|vision_end|>"


class Idefics3Adapter(ImageOnlyProcessorMixin, ModelAdapter):
    """Idefics3 and SmolVLM: Llama decoder at ``model.text_model``, pixel-shuffle connector.

    The processor wraps each image's ``<image>`` tokens in ``<fake_token_around_image>`` and a
    ``<global-img>`` tag; only ``<image>`` tokens count as vision. SmolVLM's stock processor
    builds a torchvision video processor, so for it an image-only processor is rebuilt.
    """

    name = "idefics3"
    model_types = ("idefics3", "smolvlm")
    language_model_path = "model.text_model"
    image_placeholder = "<image>"
    vision_blocks_paths = ("model.vision_model.encoder.layers",)
    projector_paths = ("model.connector",)

    @classmethod
    def load_processor(cls, path: str | Path, config=None):
        if getattr(config, "model_type", None) == "smolvlm":
            return super().load_processor(path, config)
        return None  # Idefics3Processor has no video part: AutoProcessor loads it


class InternVLAdapter(ImageOnlyProcessorMixin, ModelAdapter):
    """InternVL (transformers-native ``InternVLForConditionalGeneration``, InternVL3 ``-hf``).

    Each image becomes ``<img>`` + ``<IMG_CONTEXT>`` x N + ``</img>``; only the context tokens
    count as vision. The processor's ``image_seq_length`` comes from the model config.
    """

    name = "internvl"
    model_types = ("internvl",)
    language_model_path = "model.language_model"
    image_placeholder = "<IMG_CONTEXT>"
    vision_blocks_paths = ("model.vision_tower.encoder.layer",)
    projector_paths = ("model.multi_modal_projector",)

    @classmethod
    def processor_init_kwargs(cls, config) -> dict[str, Any]:
        seq = getattr(config, "image_seq_length", None)
        return {"image_seq_length": int(seq)} if seq else {}


class Gemma3Adapter(ModelAdapter):
    """Gemma 3: a decoder with four norms per block and two kinds of attention layers.

    The MLP reads ``pre_feedforward_layernorm`` (``post_attention_layernorm`` normalises the
    attention output before the residual add, so smoothing folded there would change the
    model): gate/up smooth into the former. Its RMSNorms scale by ``(1 + w)``, which the
    smoothing fold handles. Sliding-window and global layers get their own masks and rotary
    embeddings from the language model, so capture keeps each block's arguments.
    """

    name = "gemma3"
    model_types = ("gemma3",)
    language_model_path = "model.language_model"
    image_placeholder = "<start_of_image>"
    vision_blocks_paths = ("model.vision_tower.vision_model.encoder.layers", "model.vision_tower.encoder.layers")
    projector_paths = ("model.multi_modal_projector",)  # a weight matrix, no nn.Linear: stays as it is
    kwargs_differ_by_block = True
    mlp_input_norm = "pre_feedforward_layernorm"


class LlavaOnevisionAdapter(ImageOnlyProcessorMixin, ModelAdapter):
    """LLaVA-OneVision: SigLIP tower, anyres tiling (a base view plus tiles, each row of tiles
    ended by a newline embedding) and a Qwen2 decoder at ``model.language_model``. Its stock
    processor builds a torchvision video processor, so an image-only processor is rebuilt;
    every ``<image>`` position (newlines included) counts as vision."""

    name = "llava-onevision"
    model_types = ("llava_onevision",)
    language_model_path = "model.language_model"
    image_placeholder = "<image>"
    vision_blocks_paths = ("model.vision_tower.vision_model.encoder.layers", "model.vision_tower.encoder.layers")
    projector_paths = ("model.multi_modal_projector",)

    @classmethod
    def processor_init_kwargs(cls, config) -> dict[str, Any]:
        side = config.vision_config.image_size // config.vision_config.patch_size
        return {"num_image_tokens": side * side,
                "vision_feature_select_strategy": config.vision_feature_select_strategy}


class Mistral3Adapter(ModelAdapter):
    """Mistral 3 (Mistral-Small-3.x): Pixtral tower, a projector that merges 2 x 2 patches, and
    a Mistral decoder at ``model.language_model``. The processor writes each image row's
    ``[IMG]`` tokens followed by ``[IMG_BREAK]`` (the last row by ``[IMG_END]``); only ``[IMG]``
    tokens count as vision. transformers' ``PixtralProcessor`` is declared to need torchvision,
    so the processor is rebuilt on the PIL image processor
    (:func:`qe.models.processors.pixtral_processor_class`)."""

    name = "mistral3"
    model_types = ("mistral3",)
    language_model_path = "model.language_model"
    image_placeholder = "[IMG]"
    vision_blocks_paths = ("model.vision_tower.transformer.layers",)
    projector_paths = ("model.multi_modal_projector",)

    @classmethod
    def load_processor(cls, path: str | Path, config=None):
        import json

        from transformers import AutoTokenizer, PixtralImageProcessorPil

        from qe.models.processors import pixtral_processor_class

        path = Path(path)
        settings: dict[str, Any] = {}
        f = path / "processor_config.json"
        if f.is_file():
            saved = json.loads(f.read_text())
            settings = {k: saved[k] for k in ("patch_size", "spatial_merge_size", "image_token", "image_break_token",
                                              "image_end_token") if k in saved}
        if config is not None:
            settings.setdefault("patch_size", config.vision_config.patch_size)
            settings.setdefault("spatial_merge_size", config.spatial_merge_size)
        try:
            return pixtral_processor_class()(image_processor=PixtralImageProcessorPil.from_pretrained(str(path)),
                                             tokenizer=AutoTokenizer.from_pretrained(str(path)), **settings)
        except (OSError, ValueError, TypeError) as e:
            raise ModelError(f"cannot build the mistral3 processor from {path}: {str(e).splitlines()[0]}; the folder "
                             "needs the tokenizer files and preprocessor_config.json") from None


FAMILY_ADAPTERS = [QwenVLAdapter, Idefics3Adapter, InternVLAdapter, Gemma3Adapter, LlavaOnevisionAdapter,
                   Mistral3Adapter]
