"""Adapter selection, the generic fallback, family adapters' details and load_model's pass-through."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qe.errors import ModelError
from qe.models import tiny
from qe.models.builtin import GenericAdapter
from qe.models.families import Idefics3Adapter, InternVLAdapter, QwenVLAdapter
from qe.models.loading import load_model, select_adapter


class OddBlock(nn.Module):
    """A decoder block with names no adapter knows."""

    def __init__(self, d=8):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mix = nn.Linear(d, 2 * d)
        self.out = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.out(torch.relu(self.mix(self.norm(x))))


class OddModel(nn.Module):
    def __init__(self, n=3, d=8):
        super().__init__()
        self.vision_blocks = nn.ModuleList([OddBlock(d) for _ in range(n + 2)])  # larger, but vision
        self.embed = nn.Embedding(10, d)
        self.blocks = nn.ModuleList([OddBlock(d) for _ in range(n)])
        self.head = nn.Linear(d, 10)


class FlatModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)


class VisionOnlyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_tower = nn.Module()
        self.vision_tower.layers = nn.ModuleList([OddBlock() for _ in range(2)])


def test_generic_fallback_reads_an_unusual_layout():
    model = OddModel()
    adapter = select_adapter(model)
    assert isinstance(adapter, GenericAdapter)
    assert adapter.blocks_prefix(model) == "blocks"  # not the larger vision ModuleList
    blocks = adapter.decoder_blocks(model)
    assert blocks is model.blocks
    assert adapter.language_model(model) is model
    linears = adapter.block_linears(blocks[0])
    assert list(linears) == ["mix", "out"]
    assert linears["mix"] is model.blocks[0].mix
    groups = adapter.smoothing_groups(blocks[0])
    # unknown layout: no folding target is guessed; each linear keeps its own explicit scale
    assert [(g.linears, g.norm) for g in groups] == [(["mix"], None), (["out"], None)]


def test_generic_fallback_uses_llama_groups_when_names_are_llama():
    model = nn.Module()
    model.decoder = nn.Module()
    inner = tiny.build_tiny_vlm("llava")[0].model.language_model
    model.decoder.stack = inner.layers
    adapter = select_adapter(model)
    assert isinstance(adapter, GenericAdapter)
    assert adapter.blocks_prefix(model) == "decoder.stack"
    groups = adapter.smoothing_groups(adapter.decoder_blocks(model)[0])
    assert groups[0].norm == "input_layernorm" and groups[2].norm == "post_attention_layernorm"


@pytest.mark.parametrize("model", [FlatModel(), VisionOnlyModel()], ids=["no-modulelist", "vision-only"])
def test_unreadable_model_error_says_what_was_looked_for(model):
    with pytest.raises(ModelError) as err:
        select_adapter(model)
    message = str(err.value)
    assert type(model).__name__ in message
    assert "ModuleList" in message and "nn.Linear" in message
    assert "qwen2_vl" in message and "idefics3" in message  # the family model types it knows
    assert "\n" not in message


def test_family_adapter_on_wrong_layout_names_the_path():
    with pytest.raises(ModelError, match="model.text_model"):
        Idefics3Adapter().decoder_blocks(OddModel())
    with pytest.raises(ModelError, match="model.language_model"):
        QwenVLAdapter().language_model(OddModel())


def test_family_adapters_are_registered_and_ordered():
    from qe.plugins import default_manager

    names = set(default_manager().entries("model_adapter"))
    assert {"llava", "qwen-vl", "idefics3", "internvl", "causal-lm", "generic"} <= names
    for cls in (QwenVLAdapter, Idefics3Adapter, InternVLAdapter):
        assert cls.priority > GenericAdapter.priority


def test_qwen_plain_prompt_wraps_the_image_token():
    _, processor = tiny.build_tiny_vlm("qwen2_vl")
    text = QwenVLAdapter().format_prompt(processor, "Describe.")
    assert "<|vision_start|><|image_pad|><|vision_end|>" in text and text.endswith("ASSISTANT:")


def test_image_only_processor_needs_its_files(tmp_path):
    config = tiny.tiny_config("qwen2_vl")
    with pytest.raises(ModelError, match="preprocessor_config.json"):
        QwenVLAdapter.load_processor(tmp_path, config)


def test_smolvlm_processor_is_rebuilt_image_only_or_says_what_is_missing():
    import importlib.util

    from transformers import SmolVLMConfig

    path = tiny.tiny_model_dir("idefics3")  # same tokenizer and image processor files as SmolVLM's
    config = SmolVLMConfig(**tiny.CONFIGS["idefics3"])
    if importlib.util.find_spec("num2words") is None:
        with pytest.raises(ModelError, match="num2words"):
            Idefics3Adapter.load_processor(path, config)
    else:
        processor = Idefics3Adapter.load_processor(path, config)
        assert type(processor).__name__ == "ImageOnlySmolVLMProcessor"
    assert Idefics3Adapter.load_processor(path, tiny.tiny_config("idefics3")) is None  # AutoProcessor's job


def test_internvl_processor_takes_image_seq_length_from_config():
    path = tiny.tiny_model_dir("internvl")
    config = tiny.tiny_config("internvl")
    assert InternVLAdapter.load_processor(path, config).image_seq_length == config.image_seq_length == 4


def test_causal_lm_loads_with_tokenizer_and_causal_adapter(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tiny.tiny_tokenizer("llava").save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    assert lm.adapter.name == "causal-lm"
    assert lm.adapter.blocks_prefix(lm.model) == "model.layers"
    assert lm.tokenizer("a cat")["input_ids"]


def test_load_model_passes_placement_options_to_transformers(monkeypatch, tmp_path):
    import transformers

    path = tiny.tiny_model_dir("llava")
    seen = {}
    original = transformers.AutoModelForImageTextToText.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", spy)
    lm = load_model(str(path), device_map={"": "cpu"}, max_memory={"cpu": "2GiB"}, offload_folder=tmp_path)
    assert seen["device_map"] == {"": "cpu"}
    assert seen["max_memory"] == {"cpu": "2GiB"}
    assert seen["offload_folder"] == str(tmp_path)
    assert seen["dtype"] == torch.float32
    assert lm.blocks[0].self_attn.q_proj.weight.device.type == "cpu"


def test_load_model_dtype_and_bad_names():
    lm = load_model("tiny:llava", dtype="bf16")
    assert lm.blocks[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    from qe.errors import ModelError as E

    with pytest.raises(E, match="unknown dtype"):
        load_model("tiny:llava", dtype="float8")
    with pytest.raises(E, match="cannot load model"):
        load_model("/nonexistent/model/dir")
