"""The embedded default model: real SmolLM2 text behaviour behind a synthetic vision tower."""

import torch

from qe.data.images import builtin_image_captions, default_prompt
from qe.modality import Modality
from qe.models import default_model as default_model_module


def test_text_logits_equal_smollm2_from_gguf(default_model):
    from qe.models.default_model import load_smollm2_from_gguf

    ref, tok = load_smollm2_from_gguf()
    ids = tok("The quick brown fox jumps over the lazy dog. def f(x): return x", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        got = default_model.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


def test_default_model_card_and_notes(default_model):
    assert default_model.synthetic_vision
    assert any("SYNTHETIC" in n for n in default_model.notes)
    assert default_model.adapter.name == "llava"
    assert len(default_model.blocks) == 30


def test_vision_tokens_have_text_scale(default_model):
    """The projector was rescaled so vision embeddings have the RMS of text embeddings."""
    card = default_model.card
    sample = builtin_image_captions("eval")[0]
    enc = default_model.adapter.encode(default_model.processor, sample, default_prompt(), default_model.model)
    with torch.no_grad():
        feats = default_model.model.model.get_image_features(pixel_values=enc.inputs["pixel_values"])
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        feats = torch.cat(list(feats), 0)
    rms = float(feats.pow(2).mean().sqrt())
    assert abs(rms / card["text_embedding_rms"] - 1) < 0.25
    counts = enc.modality_counts()
    assert counts["vision"] == (default_model_module.IMAGE_SIZE // default_model_module.PATCH_SIZE) ** 2
    assert counts["answer"] > 0 and counts["text"] > 0
    assert enc.modality[-1] == int(Modality.ANSWER)


def test_default_model_generates(default_model):
    sample = builtin_image_captions("calib")[0]
    enc = default_model.adapter.encode(default_model.processor, sample, default_prompt(), default_model.model)
    n_prompt = int((enc.modality != int(Modality.ANSWER)).sum())
    inputs = {k: (v[:, :n_prompt] if isinstance(v, torch.Tensor) and v.dim() == 2 else v) for k, v in enc.inputs.items()}
    out = default_model.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == n_prompt + 3
