"""Blocks offloaded to disk by accelerate: onloaded() makes them real, and they compute the same."""

from __future__ import annotations

import pytest
import torch

from qe.models import tiny
from qe.models.loading import load_model
from qe.models.offload import execution_device, is_offloaded, onloaded
from qe.models.tiny import LLAVA_BLOCKS_ON_DISK as DISK_MAP


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tiny.tiny_model_dir("llava")
    reference = load_model(str(path))
    offloaded = load_model(str(path), device_map=DISK_MAP, offload_folder=tmp_path_factory.mktemp("offload"))
    return reference, offloaded


def _block_inputs(loaded, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, T, 64, generator=g)
    lm = loaded.adapter.language_model(loaded.model)
    position_embeddings = lm.rotary_emb(hidden, torch.arange(T)[None])
    return hidden, position_embeddings


def _out(result):
    return result[0] if isinstance(result, tuple) else result


def test_blocks_are_offloaded_to_meta(pair):
    _, off = pair
    for block in off.blocks:
        assert is_offloaded(block)
        assert all(p.device.type == "meta" for p in block.parameters())
    assert not is_offloaded(off.adapter.language_model(off.model).embed_tokens)
    assert execution_device(off.blocks[0]) == torch.device("cpu")


@pytest.mark.parametrize("index", [0, 1])
def test_onloaded_weights_equal_originals(pair, index):
    ref, off = pair
    block, ref_block = off.blocks[index], ref.blocks[index]
    reference = dict(ref_block.named_parameters())
    with onloaded(block, "cpu") as b:
        assert b is block
        got = dict(block.named_parameters())
        assert got.keys() == reference.keys()
        for name, value in got.items():
            assert value.device.type == "cpu"
            assert torch.equal(value, reference[name]), name
    assert all(p.device.type == "meta" for p in block.parameters())  # dropped again on exit


@pytest.mark.parametrize("index", [0, 1])
def test_onloaded_block_forward_equals_plain_block(pair, index):
    ref, off = pair
    hidden, pe = _block_inputs(ref, seed=index)
    with torch.no_grad():
        expected = _out(ref.blocks[index](hidden, position_embeddings=pe))
        with onloaded(off.blocks[index]):
            first = _out(off.blocks[index](hidden, position_embeddings=pe))
            # forwards inside the context must not drop the weights for the next read
            assert off.blocks[index].self_attn.q_proj.weight.device.type == "cpu"
            second = _out(off.blocks[index](hidden, position_embeddings=pe))
    assert torch.equal(first, expected)
    assert torch.equal(second, expected)


def test_offloaded_model_forward_still_works_outside_onloaded(pair):
    ref, off = pair
    ids = torch.randint(4, 990, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(off.model(input_ids=ids).logits, ref.model(input_ids=ids).logits, atol=1e-6)


def test_onloaded_is_a_no_op_for_plain_modules(pair):
    ref, _ = pair
    block = ref.blocks[0]
    before = {n: (p.data_ptr(), p.device) for n, p in block.named_parameters()}
    assert not is_offloaded(block) and execution_device(block) is None
    with onloaded(block, "meta") as b:  # not moved, even when a device is named
        assert b is block
        assert {n: (p.data_ptr(), p.device) for n, p in block.named_parameters()} == before
    assert {n: (p.data_ptr(), p.device) for n, p in block.named_parameters()} == before


def test_weights_are_dropped_even_when_the_body_raises(pair):
    _, off = pair
    with pytest.raises(RuntimeError, match="boom"):
        with onloaded(off.blocks[0]):
            raise RuntimeError("boom")
    assert all(p.device.type == "meta" for p in off.blocks[0].parameters())
    with onloaded(off.blocks[0]):  # and can be onloaded again
        assert off.blocks[0].mlp.down_proj.weight.device.type == "cpu"


def test_streamed_statistics_equal_without_offload(pair):
    """The block loop reads an offloaded model block by block: every streamed statistic (and
    the analysis built on them) equals the in-memory model's."""
    from qe.analysis.analyze import AnalyzeOptions, run_analysis
    from qe.data.calibration import calibration_set

    ref, off = pair
    _, encoded = calibration_set(ref, None, 3)
    opts = AnalyzeOptions(k=4, num_experts=2, progress=False, plot_blocks=())
    a = run_analysis(ref, encoded, opts)
    b = run_analysis(off, encoded, opts)
    assert [s["name"] for s in a.layers] == [s["name"] for s in b.layers]
    for x, y in zip(a.layers, b.layers):
        assert x["token_independent"] == y["token_independent"]
        assert x["token_dependent"] == y["token_dependent"]
        assert x["tokens"] == y["tokens"]
        assert x["outliers"]["max_abs"] == y["outliers"]["max_abs"]
        assert x["advice"]["predicted_gain"] == y["advice"]["predicted_gain"]  # the error model read the weights
    assert [r["f_all"] for r in a.channel_rows] == [r["f_all"] for r in b.channel_rows]
    # the blocks went back to disk
    assert all(p.device.type == "meta" for block in off.blocks for p in block.parameters())


class _SharedWeights(dict):
    """A CPU-offload weights map as accelerate shares it between every offloaded module of a
    model: copying one block must never copy it."""

    def __deepcopy__(self, memo):
        raise AssertionError("the model-wide offload weights map was deep-copied")


def test_an_in_memory_copy_shares_the_offload_weights_map():
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from accelerate.utils import PrefixedDataset

    from qe.models.offload import in_memory_copy

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    x = torch.randn(3, 8)
    want = block(x)
    shared = _SharedWeights({f"block.{k}": v.detach().clone() for k, v in block.state_dict().items()})
    add_hook_to_module(block, AlignDevicesHook(execution_device="cpu", offload=True, place_submodules=True,
                                               weights_map=PrefixedDataset(shared, "block.")))
    assert is_offloaded(block)
    with onloaded(block, "cpu"):
        clone = in_memory_copy(block, "cpu")
    assert not is_offloaded(clone) and all(t.device.type == "cpu" for t in clone.state_dict().values())
    torch.testing.assert_close(clone(x), want)
    assert all(t.device.type == "meta" for t in block.state_dict().values())  # the original stays offloaded


def test_a_copy_of_an_offloaded_model_shares_its_offloaded_weights(pair):
    """qe compare quantizes each cell in a copy of the model: the copy must read the same
    offloaded weights, not hold a second copy of them (with CPU offload that is the model)."""
    from qe.models.offload import _align_hooks

    ref, off = pair
    copy = off.copy()

    def maps(model):
        return [id(h.weights_map) for m in model.modules() for h in _align_hooks(m) if h.weights_map is not None]

    assert maps(off.model) and maps(copy.model) == maps(off.model)
    ids = torch.tensor([[5, 17, 300, 42]])
    with torch.no_grad():
        torch.testing.assert_close(copy.model(input_ids=ids).logits, ref.model(input_ids=ids).logits)
