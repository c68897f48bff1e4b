"""Captured activations past --max-activation-memory live in memory-mapped files: the values
are unchanged, the accounting follows the live tensors, no file outlives its tensor, and a
quantization whose activations went to disk writes the same checkpoint."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qe.activations import ActivationStore
from qe.commands.quantize import run_quantize
from qe.errors import ConfigError
from qe.models import tiny
from qe.models.loading import Placement, load_model, parse_activation_memory
from qe.recipe import Recipe

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(1, 7), min_size=1, max_size=3), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_a_spilled_tensor_keeps_its_values_shape_and_dtype(shape, dtype, seed, tmp_path_factory):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    store = ActivationStore(limit_bytes=0, folder=tmp_path_factory.mktemp("spill"))
    kept = store.keep(t)
    assert kept.shape == t.shape and kept.dtype == t.dtype
    assert torch.equal(kept, t)
    assert store.on_disk_bytes == t.numel() * t.element_size() and store.in_memory_bytes == 0


def test_memory_first_then_files_and_the_accounting_follows_live_tensors(tmp_path):
    store = ActivationStore(limit_bytes=2 * 4 * 100, folder=tmp_path)
    a, b, c = (torch.full((100,), float(i)) for i in range(3))
    ka, kb, kc = store.keep(a), store.keep(b), store.keep(c)
    assert torch.equal(kb, b)
    assert (store.in_memory_bytes, store.on_disk_bytes) == (800, 400)
    assert ka.data_ptr() == a.data_ptr()  # in memory: the same storage, no copy
    assert kc.data_ptr() != c.data_ptr() and torch.equal(kc, c)
    assert list(tmp_path.iterdir()) == []  # the file is unlinked once mapped
    assert store.keep(kc) is kc and store.keep(ka) is ka  # kept once, counted once
    assert (store.in_memory_bytes, store.on_disk_bytes) == (800, 400)
    del ka, kc
    gc.collect()
    assert (store.in_memory_bytes, store.on_disk_bytes) == (400, 0)
    # Freed memory is used again before any file.
    kd = store.keep(torch.ones(100))
    assert (store.in_memory_bytes, store.on_disk_bytes) == (800, 0) and kd.sum() == 100


def test_without_a_limit_or_placement_activations_stay_where_they_are():
    t = torch.randn(3, 4)
    assert ActivationStore().keep(t) is t
    assert ActivationStore(host=True).keep(t).data_ptr() == t.data_ptr()


def test_an_unwritable_folder_is_one_line(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    store = ActivationStore(limit_bytes=0, folder=blocked / "sub")
    with pytest.raises(ConfigError, match="cannot keep captured activations in .*--max-activation-memory") as info:
        store.keep(torch.ones(4))
    assert "\n" not in str(info.value)


def test_a_failed_mapping_is_one_line_and_leaves_no_file(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("unable to mmap 16 bytes: Cannot allocate memory (12)")

    monkeypatch.setattr(torch, "from_file", refuse)
    store = ActivationStore(limit_bytes=0, folder=tmp_path)
    with pytest.raises(ConfigError, match="unable to mmap"):
        store.keep(torch.ones(4))
    assert list(tmp_path.iterdir()) == []


def test_sizes_parse_and_bad_sizes_are_one_line():
    assert parse_activation_memory("2KiB") == 2048
    assert parse_activation_memory(None) is None
    with pytest.raises(ConfigError, match="--max-activation-memory 'lots'"):
        parse_activation_memory("lots")


def test_quantizing_with_activations_on_disk_writes_the_same_checkpoint(tmp_path, same_checkpoint_tensors):
    """Every block's inputs and outputs go through files (limit 0), for a model held in memory."""
    path = str(tiny.tiny_model_dir("llava"))
    recipe = Recipe(quantizer="gptq", compensator="qe[k=4;num_experts=2;shared_rank=4;expert_rank=2]",
                    setting="W4A8", samples=3)
    ref_dir, _ = run_quantize(recipe, path, out=tmp_path / "ref", progress=False)
    spilled = load_model(path, placement=Placement(max_activation_memory=0, offload_folder=str(tmp_path / "spill")))
    out_dir, _ = run_quantize(recipe, out=tmp_path / "spilled", progress=False, loaded=spilled)
    gc.collect()
    assert spilled.activations.spilled_bytes > 0
    assert spilled.activations.on_disk_bytes == 0  # every spilled activation was freed with its block
    same_checkpoint_tensors(ref_dir, out_dir)
    assert not any((tmp_path / "spill").glob("activations-*"))


def test_the_cli_refuses_a_bad_activation_size_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qe", "quantize", "--model", "tiny:llava", "--max-activation-memory",
                           "much", "--out", str(tmp_path / "q"), "--quiet"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "--max-activation-memory 'much'" in proc.stderr
    assert not (tmp_path / "q").exists()
