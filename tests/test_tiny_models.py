"""Tiny offline VLMs of every family: adapters, structure, encoding, forward, ``qe info``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qe.data.images import builtin_image_captions, default_prompt, sample_image
from qe.errors import ModelError
from qe.modality import Modality
from qe.models import tiny
from qe.models.base import LLAMA_LINEARS
from qe.models.loading import load_model

EXPECTED_ADAPTER = {
    "llava": "llava",
    "llava_siglip": "llava",
    "qwen2_vl": "qwen-vl",
    "qwen2_5_vl": "qwen-vl",
    "qwen3_vl": "qwen-vl",
    "qwen3_vl_moe": "qwen-vl",
    "idefics3": "idefics3",
    "internvl": "internvl",
    "gemma3": "gemma3",
    "llava_onevision": "llava-onevision",
    "mistral3": "mistral3",
}
# The norm each smoothing group folds into (Gemma 3's MLP reads its pre-feedforward norm).
EXPECTED_NORMS = {"gemma3": ["input_layernorm", None, "pre_feedforward_layernorm", None]}
EXPECTED_BLOCKS_PATH = {
    "idefics3": "model.text_model.layers",
}


@pytest.fixture(scope="module")
def loaded():
    cache: dict[str, object] = {}

    def get(family):
        if family not in cache:
            cache[family] = load_model(f"tiny:{family}")
        return cache[family]

    return get


@pytest.fixture(scope="module")
def image_sample():
    return builtin_image_captions("calib")[0]


def test_every_family_has_an_expected_adapter():
    assert set(EXPECTED_ADAPTER) == set(tiny.FAMILIES)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_structure(family, loaded):
    lm = loaded(family)
    assert lm.adapter.name == EXPECTED_ADAPTER[family]
    assert lm.adapter.blocks_prefix(lm.model) == EXPECTED_BLOCKS_PATH.get(family, "model.language_model.layers")
    blocks = lm.blocks
    assert len(blocks) == 2
    for i, block in enumerate(blocks):
        linears = lm.adapter.block_linears(block)
        if family == "qwen3_vl_moe" and i == 1:  # the sparse block: 4 routed experts, unfused
            experts = [f"mlp.experts.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")]
            assert list(linears) == list(LLAMA_LINEARS[:4]) + experts
            groups = lm.adapter.smoothing_groups(block)
            assert [g.linears for g in groups][2:4] == [["mlp.experts.0.gate_proj", "mlp.experts.0.up_proj"],
                                                       ["mlp.experts.0.down_proj"]]
            assert all(g.norm is None for g in groups[2:])  # the router reads that norm too: never folded
            continue
        assert list(linears) == list(LLAMA_LINEARS)
        assert linears["self_attn.q_proj"].in_features == 64
        assert linears["mlp.down_proj"].in_features == 128
        groups = lm.adapter.smoothing_groups(block)
        assert [g.linears for g in groups] == [
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            ["self_attn.o_proj"],
            ["mlp.gate_proj", "mlp.up_proj"],
            ["mlp.down_proj"],
        ]
        assert [g.norm for g in groups] == EXPECTED_NORMS.get(family, ["input_layernorm", None, "post_attention_layernorm", None])
        # the folding target is the norm that really produces the group's input
        assert block.get_submodule("input_layernorm").weight.shape == (64,)
    assert lm.adapter.image_token_id(lm.model) == tiny.IMAGE_TOKEN_ID
    assert len(lm.tokenizer) == tiny.VOCAB_SIZE
    assert any("tiny" in n for n in lm.notes)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_encode_matches_processor_and_forward_runs(family, loaded, image_sample):
    lm = loaded(family)
    enc = lm.adapter.encode(lm.processor, image_sample, default_prompt(), lm.model)

    # Reference: the processor's own output for the same prompt and image.
    prompt_text = lm.adapter.format_prompt(lm.processor, default_prompt())
    ref = lm.processor(text=[prompt_text], images=[sample_image(image_sample)], return_tensors="pt")
    n_prompt = ref["input_ids"].shape[1]
    n_image = int((ref["input_ids"] == tiny.IMAGE_TOKEN_ID).sum())
    answer = lm.tokenizer(" " + image_sample.text.strip(), add_special_tokens=False)["input_ids"]
    counts = enc.modality_counts()
    assert n_image > 0
    assert counts == {"text": n_prompt - n_image, "vision": n_image, "answer": len(answer)}

    ids = enc.inputs["input_ids"][0]
    T = enc.num_tokens
    assert ids.shape == (T,)
    assert torch.equal(ids[:n_prompt], ref["input_ids"][0])
    assert ids[n_prompt:].tolist() == answer
    assert bool((ids[enc.modality == Modality.VISION] == tiny.IMAGE_TOKEN_ID).all())
    for key, value in enc.inputs.items():  # every per-token tensor covers the answer too
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[0] == 1 and key in ref and \
                ref[key].shape == (1, n_prompt):
            assert value.shape == (1, T), key
    assert bool((enc.inputs["attention_mask"] == 1).all())
    if "mm_token_type_ids" in ref:  # Qwen-VL: 1 exactly on image tokens, 0 on text and answer
        expected = (enc.modality == Modality.VISION).long()
        assert torch.equal(enc.inputs["mm_token_type_ids"][0].long(), expected)

    with torch.no_grad():
        out = lm.model(**enc.inputs)
    assert out.logits.shape == (1, T, tiny.VOCAB_SIZE)
    assert bool(torch.isfinite(out.logits).all())


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_info_command_path(family):
    from qe.commands.info import model_info, render_info

    info = model_info(f"tiny:{family}")
    assert info["adapter"] == EXPECTED_ADAPTER[family]
    assert info["num_blocks"] == 2
    # per block: q, o 64x64; k, v 64x32 (2 kv heads of 16); gate, up, down 64x128
    assert info["decoder_linear_parameters"] == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)
    sample = info["calibration_sample"]
    assert sample["modality_tokens"]["vision"] > 0 and sample["modality_tokens"]["answer"] > 0
    assert sum(sample["modality_tokens"].values()) == sample["tokens"]
    text = render_info(info)
    assert "self_attn.q_proj" in text and "tiny" in text


def test_build_is_seeded():
    a, _ = tiny.build_tiny_vlm("llava", seed=3)
    b, _ = tiny.build_tiny_vlm("llava", seed=3)
    c, _ = tiny.build_tiny_vlm("llava", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_saved_model_matches_in_memory_build(tmp_path):
    model, processor = tiny.build_tiny_vlm("qwen2_vl", seed=1)
    tiny.save_tiny_model("qwen2_vl", tmp_path / "m", seed=1)
    lm = load_model(str(tmp_path / "m"))
    assert type(lm.processor).__name__ == type(processor).__name__ == "ImageOnlyQwen2VLProcessor"
    ids = torch.randint(4, 990, (1, 12))
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids).logits, model(input_ids=ids).logits)
    text = "A photo of a cat."
    assert lm.tokenizer(text)["input_ids"] == processor.tokenizer(text)["input_ids"]


def test_seed_in_name_and_unknown_family():
    assert tiny.parse_tiny_name("tiny:llava@3") == ("llava", 3)
    assert tiny.parse_tiny_name("tiny:SmolVLM") == ("idefics3", 0)
    assert tiny.parse_tiny_name("tiny:idefics3-smolvlm") == ("idefics3", 0)
    assert tiny.parse_tiny_name("some/model") is None
    with pytest.raises(ModelError, match="qwen2_vl"):
        load_model("tiny:gpt5")
    with pytest.raises(ModelError, match="tiny:<family>@<seed>"):
        tiny.parse_tiny_name("tiny:llava@x")


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3", "internvl"])
def test_tokenizer_specials_at_config_ids(family):
    tok = tiny.tiny_tokenizer(family)
    assert len(tok) == tiny.VOCAB_SIZE
    for token_id, text in tiny._SPECIALS[family].items():
        assert tok.convert_tokens_to_ids(text) == token_id
        # a special token is never split, whatever text surrounds it
        assert tok(f"ab{text}cd", add_special_tokens=False)["input_ids"].count(token_id) == 1


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_tokenizer_round_trips_text(text):
    tok = tiny.tiny_tokenizer("llava")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert all(0 <= i < tiny.VOCAB_SIZE for i in ids)
    assert tok.decode(ids) == text


def test_gemma3_smoothing_folds_into_the_norm_the_mlp_reads(loaded):
    """Folding s into the pre-feedforward norm and multiplying gate/up by s keeps the block's
    output; folding it into the post-attention norm (the generic layout) would not."""
    from qe.transforms.smoothing import fold_into_norm, smooth_weight

    lm = loaded("gemma3")
    block = lm.blocks[0]
    hidden = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(0))
    position = torch.arange(6)[None]
    rotary = lm.adapter.language_model(lm.model).rotary_emb
    kwargs = {"position_embeddings": rotary(hidden, position, "sliding_attention"), "attention_mask": None,
              "position_ids": position}
    with torch.no_grad():
        before = block(hidden, **kwargs)
        s = torch.rand(64, generator=torch.Generator().manual_seed(1)) + 0.5
        for norm in ("pre_feedforward_layernorm", "post_attention_layernorm"):
            import copy

            b = copy.deepcopy(block)
            assert fold_into_norm(b.get_submodule(norm), s)
            for name in ("mlp.gate_proj", "mlp.up_proj"):
                lin = b.get_submodule(name)
                lin.weight.copy_(smooth_weight(lin.weight, s))
            after = b(hidden, **kwargs)
            same = torch.allclose(after, before, rtol=1e-4, atol=1e-5)
            assert same == (norm == "pre_feedforward_layernorm"), norm
