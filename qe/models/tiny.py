"""Tiny VLMs of every supported family, built offline from config in milliseconds.

They are the test suite's workhorses and let a user try any command without a download:
``--model tiny:<family>``. Every family shares one shape of language model (vocab 1000,
hidden 64, 2 decoder blocks) and uses 32-64 pixel images, so a forward takes milliseconds.
Weights are random (seeded): figures measured on them test plumbing, not quality.

Offline pieces:

* a byte-level BPE tokenizer trained in code on a few kilobytes of English (sentences written
  here and a sample of the pydoc topics) and padded with the family's special tokens at the ids the
  config expects (image token 999, ...);
* the ``*Pil`` image processors (torchvision cannot be installed beside this torch);
* for Qwen-VL, InternVL and SmolVLM, an image-only processor (:func:`image_only_processor_class`),
  because their stock processors build a torchvision video processor.
  ``AutoProcessor`` cannot reload such a processor, so the family adapters rebuild it
  (:meth:`qe.models.families.ImageOnlyProcessorMixin.load_processor`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qe.errors import ModelError
from qe.models.processors import image_only_processor_class, pixtral_processor_class
from qe.paths import atomic_directory, cache_dir

log = logging.getLogger(__name__)

PREFIX = "tiny:"
VERSION = 1
VOCAB_SIZE = 1000
IMAGE_TOKEN_ID = 999
MARKER_FILE = "qe_tiny_model.json"

_TEXT_LLAMA = {
    "model_type": "llama",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
# The same decoder without a model_type (the Qwen-VL configs set their own); mrope_section
# sums to head_dim / 2 = (64 / 4) / 2 = 8.
_TEXT_QWEN_VL = {
    **{k: v for k, v in _TEXT_LLAMA.items() if k != "model_type"},
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
}
_QWEN_SPECIALS = {996: "<|vision_start|>", 997: "<|vision_end|>", 998: "<|video_pad|>", 999: "<|image_pad|>"}
_QWEN_TOKEN_IDS = {"image_token_id": 999, "video_token_id": 998, "vision_start_token_id": 996, "vision_end_token_id": 997}

_QWEN3_VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "out_hidden_size": 64,
                 "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 64,
                 "deepstack_visual_indexes": [0]}
_QWEN3_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
# Config dicts seen to build, run forward and generate with transformers 5.24.
CONFIGS: dict[str, dict[str, Any]] = {
    "llava": {
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8,
                          "projection_dim": 32},
        "text_config": _TEXT_LLAMA,
        "image_token_index": IMAGE_TOKEN_ID,
        "image_seq_length": 16,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
    },
    "llava_siglip": {
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        "text_config": _TEXT_LLAMA,
        "image_token_index": IMAGE_TOKEN_ID,
        "image_seq_length": 16,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
    },
    "qwen2_vl": {
        "text_config": _TEXT_QWEN_VL,
        "vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 4, "mlp_ratio": 2,
                          "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3},
        **_QWEN_TOKEN_IDS,
    },
    "qwen2_5_vl": {
        "text_config": _TEXT_QWEN_VL,
        "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4,
                          "out_hidden_size": 64, "patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "window_size": 56, "fullatt_block_indexes": [1]},
        **_QWEN_TOKEN_IDS,
    },
    "qwen3_vl": {
        "text_config": {**_TEXT_QWEN_VL, "head_dim": 16,
                        "rope_parameters": _QWEN3_ROPE},
        "vision_config": _QWEN3_VISION,
        **_QWEN_TOKEN_IDS,
    },
    # Qwen3-VL with a sparse MLP in its second block: 4 experts, 2 per token (block 0 dense).
    "qwen3_vl_moe": {
        "text_config": {**_TEXT_QWEN_VL, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                        "moe_intermediate_size": 32, "decoder_sparse_step": 1, "mlp_only_layers": [0],
                        "rope_parameters": _QWEN3_ROPE},
        "vision_config": _QWEN3_VISION,
        **_QWEN_TOKEN_IDS,
    },
    # Mistral 3 (Pixtral tower, patch-merging projector, Mistral decoder).
    "mistral3": {
        "vision_config": {"model_type": "pixtral", "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 8, "image_size": 32,
                          "patch_size": 8},
        "text_config": {**_TEXT_LLAMA, "model_type": "mistral"},
        "image_token_index": IMAGE_TOKEN_ID,
        "spatial_merge_size": 2,
        "vision_feature_layer": -1,
    },
    "idefics3": {
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        "text_config": _TEXT_LLAMA,
        "image_token_id": IMAGE_TOKEN_ID,
        "scale_factor": 2,
    },
    "internvl": {
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "image_size": [32, 32], "patch_size": [8, 8]},
        "text_config": {**_TEXT_LLAMA, "model_type": "qwen2"},
        "image_token_id": IMAGE_TOKEN_ID,
        "image_seq_length": 4,
        "downsample_ratio": 0.5,
    },
    "gemma3": {
        "text_config": {
            "model_type": "gemma3_text", "vocab_size": VOCAB_SIZE, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "query_pre_attn_scalar": 16, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"],
            "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        },
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        "mm_tokens_per_image": 4,
        "image_token_index": IMAGE_TOKEN_ID,
        "boi_token_index": 997,
        "eoi_token_index": 998,
    },
    "llava_onevision": {
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        "text_config": {**_TEXT_LLAMA, "model_type": "qwen2"},
        "image_token_index": IMAGE_TOKEN_ID,
        "video_token_index": 998,
        "image_grid_pinpoints": [[32, 32], [32, 64], [64, 32], [64, 64]],
        "vision_feature_select_strategy": "full",
        "vision_feature_layer": -1,
        "vision_aspect_ratio": "anyres_max_9",
    },
}
FAMILIES = tuple(CONFIGS)
# Accepted spellings beside the canonical family names.
# SmolVLM's own processor needs num2words (video timestamps), so the tiny SmolVLM stand-in is
# Idefics3, the architecture SmolVLM shares.
ALIASES = {"smolvlm": "idefics3", "idefics3_smolvlm": "idefics3", "qwen2.5_vl": "qwen2_5_vl", "llava_clip": "llava"}

# Special tokens each family's processor looks up, at the ids its config names.
_SPECIALS: dict[str, dict[int, str]] = {
    "llava": {999: "<image>"},
    "llava_siglip": {999: "<image>"},
    "qwen2_vl": _QWEN_SPECIALS,
    "qwen2_5_vl": _QWEN_SPECIALS,
    "qwen3_vl": _QWEN_SPECIALS,
    "qwen3_vl_moe": _QWEN_SPECIALS,
    "mistral3": {996: "[IMG_BREAK]", 997: "[IMG_END]", 999: "[IMG]"},
    "idefics3": {995: "<global-img>", 996: "<fake_token_around_image>", 997: "<end_of_utterance>", 999: "<image>"},
    "internvl": {996: "<video>", 997: "<img>", 998: "</img>", 999: "<IMG_CONTEXT>"},
    "gemma3": {997: "<start_of_image>", 998: "<end_of_image>", 999: "<image_soft_token>"},
    "llava_onevision": {998: "<video>", 999: "<image>"},
}
# Named tokens Gemma 3's processor reads as tokenizer attributes.
_GEMMA3_NAMED = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
# Named tokens InternVL's processor reads as tokenizer attributes.
_INTERNVL_NAMED = {"start_image_token": "<img>", "end_image_token": "</img>",
                   "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
_BASE_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3


def canonical_family(family: str) -> str:
    name = family.lower().replace("-", "_")
    name = ALIASES.get(name, name)
    if name not in CONFIGS:
        raise ModelError(f"unknown tiny model family {family!r}: choose one of {', '.join(FAMILIES)}")
    return name


# --------------------------------------------------------------------------- tokenizer


# Sentences written for this tokenizer, so its merges do not move when captions are edited.
_OWN_SENTENCES = (
    "A photo of a cat sitting on a wooden table next to a cup of coffee.",
    "The picture shows a red rocket on a launch pad under a dark blue sky.",
    "Describe this image in one sentence.",
    "Two people walk along a beach at sunset while a dog runs ahead of them.",
    "A close-up of a flower with orange petals and green leaves in the background.",
    "The grayscale image shows coins, bricks, gravel and grass in regular patterns.",
    "USER: What is in the picture? ASSISTANT: A small house with a garden.",
    "Quantization maps each weight to one of a few levels and keeps a scale per channel.",
)


def _training_text() -> list[str]:
    """A few kilobytes of English: enough merges for a 1000-token vocabulary."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    return list(_OWN_SENTENCES) + [topics[k] for k in keys[:: max(1, len(keys) // 12)]]


@cache
def _base_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_BASE_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer)
    return tok.to_str()


def tiny_tokenizer(family: str):
    """A ``PreTrainedTokenizerFast`` of exactly 1000 ids with the family's special tokens."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    family = canonical_family(family)
    specials = _SPECIALS[family]
    first_special = min(specials)
    tok = Tokenizer.from_str(_base_tokenizer_json(first_special))
    # Fill any ids the training left unused, then place the specials at their exact ids.
    fillers = [AddedToken(f"<unused{i}>", special=True, normalized=False)
               for i in range(tok.get_vocab_size(), first_special)]
    if fillers:
        tok.add_special_tokens(fillers)
    for token_id in range(first_special, VOCAB_SIZE):
        text = specials.get(token_id, f"<unused{token_id}>")
        tok.add_special_tokens([AddedToken(text, special=True, normalized=False)])
    extra: dict | list = [specials[i] for i in sorted(specials)]
    if family == "internvl":
        extra = dict(_INTERNVL_NAMED)
    if family == "gemma3":
        extra = dict(_GEMMA3_NAMED)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=extra,
    )
    for token_id, text in specials.items():
        got = tokenizer.convert_tokens_to_ids(text)
        if got != token_id:  # a wrong id would silently break image-token masks
            raise ModelError(f"tiny tokenizer for {family}: {text} got id {got}, expected {token_id}")
    if len(tokenizer) != VOCAB_SIZE:
        raise ModelError(f"tiny tokenizer for {family} has {len(tokenizer)} ids, expected {VOCAB_SIZE}")
    return tokenizer


# --------------------------------------------------------------------------- processors


def _processor(family: str, tokenizer):
    import transformers as tf

    if family == "llava":
        image_processor = tf.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        # CLIP's "default" strategy drops the CLS token: 4 x 4 patches = 16 image tokens.
        return tf.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                 vision_feature_select_strategy="default", image_token="<image>",
                                 num_additional_image_tokens=1)
    if family == "llava_siglip":
        image_processor = tf.SiglipImageProcessorPil(size={"height": 32, "width": 32})
        return tf.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                 vision_feature_select_strategy="full", image_token="<image>",
                                 num_additional_image_tokens=0)
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        patch = CONFIGS[family]["vision_config"]["patch_size"]
        side = patch * 2 * 2  # 4 x 4 patches, merged 2 x 2: 4 image tokens
        image_processor = tf.Qwen2VLImageProcessorPil(
            size={"shortest_edge": side * side, "longest_edge": side * side}, patch_size=patch, merge_size=2,
            temporal_patch_size=2)
        return image_only_processor_class(family)(image_processor, tokenizer)
    if family == "mistral3":
        # 32 x 32 pixels in 8-pixel patches, merged 2 x 2: 2 rows of 2 [IMG] tokens, each row
        # ended by [IMG_BREAK] (the last by [IMG_END]).
        image_processor = tf.PixtralImageProcessorPil(size={"longest_edge": 32}, patch_size=8)
        return pixtral_processor_class()(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                         spatial_merge_size=2)
    if family == "idefics3":
        image_processor = tf.Idefics3ImageProcessorPil(
            do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32})
        # (32 / 8)^2 patches / scale_factor^2 = 4 image tokens
        return tf.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4)
    if family == "internvl":
        # One 32 x 32 tile per image (max_patches=1): (32 / 8)^2 patches * downsample 0.5^2 = 4 tokens.
        image_processor = tf.GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, max_patches=1)
        return image_only_processor_class(family)(image_processor, tokenizer, image_seq_length=4)
    if family == "llava_onevision":
        # anyres: a 32 x 32 base view plus up to 2 x 2 tiles of 32 x 32, 16 tokens each (+ row newlines)
        image_processor = tf.LlavaOnevisionImageProcessorPil(
            size={"height": 32, "width": 32}, image_grid_pinpoints=CONFIGS[family]["image_grid_pinpoints"])
        return image_only_processor_class(family)(image_processor, tokenizer, num_image_tokens=16,
                                                  vision_feature_select_strategy="full")
    if family == "gemma3":
        # 32 x 32 pixels, 4 x 4 patches pooled to 2 x 2: 4 image tokens between <start_of_image> and <end_of_image>.
        image_processor = tf.Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, do_pan_and_scan=False)
        return tf.Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4)
    raise ModelError(f"no tiny processor for {family!r}")


# --------------------------------------------------------------------------- models


def tiny_config(family: str):
    import transformers as tf

    family = canonical_family(family)
    classes = {
        "llava": tf.LlavaConfig,
        "llava_siglip": tf.LlavaConfig,
        "qwen2_vl": tf.Qwen2VLConfig,
        "qwen2_5_vl": tf.Qwen2_5_VLConfig,
        "qwen3_vl": tf.Qwen3VLConfig,
        "qwen3_vl_moe": tf.Qwen3VLMoeConfig,
        "mistral3": tf.Mistral3Config,
        "idefics3": tf.Idefics3Config,
        "internvl": tf.InternVLConfig,
        "gemma3": tf.Gemma3Config,
        "llava_onevision": tf.LlavaOnevisionConfig,
    }
    return classes[family](**copy.deepcopy(CONFIGS[family]))


def _model_class(family: str) -> type:
    import transformers as tf

    return {
        "llava": tf.LlavaForConditionalGeneration,
        "llava_siglip": tf.LlavaForConditionalGeneration,
        "qwen2_vl": tf.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration,
        "qwen3_vl": tf.Qwen3VLForConditionalGeneration,
        "qwen3_vl_moe": tf.Qwen3VLMoeForConditionalGeneration,
        "mistral3": tf.Mistral3ForConditionalGeneration,
        "idefics3": tf.Idefics3ForConditionalGeneration,
        "internvl": tf.InternVLForConditionalGeneration,
        "gemma3": tf.Gemma3ForConditionalGeneration,
        "llava_onevision": tf.LlavaOnevisionForConditionalGeneration,
    }[family]


def build_tiny_vlm(family: str, seed: int = 0) -> tuple[nn.Module, Any]:
    """A randomly initialised (seeded) tiny VLM of ``family`` in eval mode, and its processor."""
    family = canonical_family(family)
    config = tiny_config(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _model_class(family)(config).eval()
    processor = _processor(family, tiny_tokenizer(family))
    return model, processor


def save_tiny_model(family: str, path: str | Path, seed: int = 0) -> Path:
    """Write a ``from_pretrained``-loadable directory (model, processor, a qe marker)."""
    family = canonical_family(family)
    path = Path(path)
    model, processor = build_tiny_vlm(family, seed)
    with atomic_directory(path, force=True) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if not (tmp / "tokenizer.json").exists():  # a bare-tokenizer save is enough for reloads
            processor.tokenizer.save_pretrained(tmp)
        marker = {"family": family, "seed": seed, "version": VERSION,
                  "note": "tiny randomly initialised model for tests and dry runs; figures mean nothing"}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2))
    return path


def tiny_model_dir(family: str, seed: int = 0) -> Path:
    """The cached directory of ``tiny:<family>``, written on first use."""
    family = canonical_family(family)
    # The key covers everything the directory is built from, so a stale cache is never read.
    recipe = json.dumps([VERSION, CONFIGS[family], _SPECIALS[family], _training_text()], sort_keys=True)
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:10]
    out = cache_dir() / "tiny" / f"{family}-s{seed}-{digest}"
    if not (out / MARKER_FILE).exists():
        log.info("qe: writing tiny model %s to %s", family, out)
        save_tiny_model(family, out, seed)
    return out


def read_marker(path: str | Path) -> dict | None:
    marker = Path(path) / MARKER_FILE
    return json.loads(marker.read_text()) if marker.is_file() else None


def parse_tiny_name(name: str) -> tuple[str, int] | None:
    """``tiny:<family>`` or ``tiny:<family>@<seed>`` -> (family, seed); None for other names."""
    if not isinstance(name, str) or not name.startswith(PREFIX):
        return None
    rest = name[len(PREFIX):]
    family, _, seed = rest.partition("@")
    try:
        seed_value = int(seed) if seed else 0
    except ValueError:
        raise ModelError(f"cannot read {name!r}: write tiny:<family> or tiny:<family>@<seed>") from None
    return canonical_family(family), seed_value


# tiny:llava with its two decoder blocks offloaded to disk by accelerate and the rest in memory
# (``load_model(..., device_map=LLAVA_BLOCKS_ON_DISK, offload_folder=...)``): a dry run of the
# paths that quantize and load models larger than memory.
LLAVA_BLOCKS_ON_DISK = {
    "model.vision_tower": "cpu",
    "model.multi_modal_projector": "cpu",
    "model.language_model.embed_tokens": "cpu",
    "model.language_model.layers.0": "disk",
    "model.language_model.layers.1": "disk",
    "model.language_model.norm": "cpu",
    "model.language_model.rotary_emb": "cpu",
    "lm_head": "cpu",
}
