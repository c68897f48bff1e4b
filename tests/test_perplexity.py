"""Perplexity: exact on constructed models, equal to a direct loop on real ones, windows as documented."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from qe.data.text import pydoc_text, tokenize_text
from qe.errors import ConfigError, DataError
from qe.evaluation.perplexity import (
    PerplexityResult,
    ScoredWindow,
    perplexity,
    perplexity_of_text_file,
    score_windows,
    sliding_windows,
)
from qe.models import tiny
from qe.models.loading import load_model


class Output:
    def __init__(self, logits):
        self.logits = logits


class SuccessorModel(nn.Module):
    """Logits one-hot (scaled by ``sharpness``) on ``successor[token]``: a bigram oracle."""

    def __init__(self, successor: torch.Tensor, sharpness: float = 1e4):
        super().__init__()
        vocab = len(successor)
        self.table = nn.Embedding(vocab, vocab)
        with torch.no_grad():
            self.table.weight.zero_()
            self.table.weight[torch.arange(vocab), successor] = sharpness

    def get_input_embeddings(self):
        return self.table

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return Output(self.table(input_ids))  # (B, L, V)


def _chain(successor: torch.Tensor, start: int, length: int) -> np.ndarray:
    ids = [start]
    for _ in range(length - 1):
        ids.append(int(successor[ids[-1]]))
    return np.array(ids)


@given(
    vocab=st.integers(min_value=2, max_value=50),
    seed=st.integers(min_value=0, max_value=2**16),
    n_windows=st.integers(min_value=1, max_value=5),
    window=st.integers(min_value=2, max_value=40),
    batch_size=st.integers(min_value=1, max_value=4),
)
def test_perfect_next_token_model_has_perplexity_one(vocab, seed, n_windows, window, batch_size):
    g = torch.Generator().manual_seed(seed)
    successor = torch.randint(0, vocab, (vocab,), generator=g)
    ids = _chain(successor, int(torch.randint(0, vocab, (1,), generator=g)), n_windows * window)
    windows = [ids[i * window : (i + 1) * window] for i in range(n_windows)]
    result = perplexity(SuccessorModel(successor), windows, batch_size=batch_size, progress=False)
    assert result.ppl == pytest.approx(1.0, abs=1e-9)
    assert result.tokens == n_windows * (window - 1) and result.windows == n_windows


def test_one_wrong_token_costs_exactly_its_nll():
    vocab, sharp = 7, 5.0
    successor = torch.tensor([1, 2, 3, 4, 5, 6, 0])
    ids = _chain(successor, 0, 10)
    ids[6] = (ids[6] + 3) % vocab  # break one step: position 6 is mispredicted and mispredicts 7
    result = perplexity(SuccessorModel(successor, sharp), [ids], progress=False)
    # logits are (sharp on one class, 0 elsewhere): NLL is log(e^s + V - 1) - s when right, log(...) when wrong
    log_z = math.log(math.exp(sharp) + vocab - 1)
    right, wrong = log_z - sharp, log_z
    expected = (7 * right + 2 * wrong) / 9
    assert result.nll == pytest.approx(expected, rel=1e-6)
    assert result.ppl == pytest.approx(math.exp(expected), rel=1e-6)


def test_uniform_model_has_perplexity_of_the_vocabulary():
    model = SuccessorModel(torch.arange(13), sharpness=0.0)
    result = perplexity(model, [np.arange(13), np.arange(13)[::-1].copy()], progress=False)
    assert result.ppl == pytest.approx(13.0, rel=1e-6)


def _direct_perplexity(model, windows) -> float:
    """Token by token: -log p(x_{t+1} | x_{<=t}) from one forward per window, summed in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.as_tensor(w, dtype=torch.long)[None]
            logits = model(input_ids=ids).logits[0].double()
            for t in range(len(w) - 1):
                log_probs = logits[t] - torch.logsumexp(logits[t], dim=0)
                total -= float(log_probs[w[t + 1]])
                count += 1
    return math.exp(total / count)


@pytest.fixture(scope="module")
def tiny_text_ids():
    return tokenize_text(tiny.tiny_tokenizer("llava"), pydoc_text()[:6000])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "causal"])
def test_equals_a_direct_cross_entropy_loop(family, tiny_text_ids):
    if family == "causal":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4)).eval()
        with torch.no_grad():  # sharpen the random logits so perplexity is far from uniform
            model.lm_head.weight.mul_(40)
    else:
        model = tiny.build_tiny_vlm(family, seed=2)[0]
        with torch.no_grad():
            model.lm_head.weight.mul_(40)
    window = 48
    windows = [tiny_text_ids[i * window : (i + 1) * window] for i in range(5)]
    got = perplexity(model, windows, batch_size=2, progress=False)
    expected = _direct_perplexity(model, windows)
    assert got.ppl == pytest.approx(expected, rel=1e-5)
    assert abs(expected - 1000) / 1000 > 0.05  # far from uniform: the comparison has teeth
    assert perplexity(model, windows, batch_size=5, progress=False).ppl == pytest.approx(got.ppl, rel=1e-6)


def test_default_windows_come_from_the_held_out_text():
    lm = load_model("tiny:llava")
    result = perplexity(lm, max_tokens=4 * 512 + 100, batch_size=4, progress=False)
    assert result.windows == 4 and result.tokens == 4 * 511
    assert math.isfinite(result.ppl) and result.ppl > 1
    assert isinstance(result, PerplexityResult) and set(result.to_dict()) == {"ppl", "nll", "tokens", "windows", "seconds"}
    with pytest.raises(DataError, match="less than one window"):
        perplexity(lm, max_tokens=100, progress=False)


def test_bad_calls():
    model = SuccessorModel(torch.arange(5))
    with pytest.raises(ConfigError, match="tokenizer"):
        perplexity(model)
    with pytest.raises(ConfigError, match="max_tokens"):
        perplexity(model, [np.arange(5)], max_tokens=3)
    with pytest.raises(DataError, match="at least one window"):
        perplexity(model, [])
    with pytest.raises(DataError, match="at least 2 tokens"):
        perplexity(model, [np.arange(1)])
    with pytest.raises(ConfigError, match="LoadedModel or an nn.Module"):
        perplexity("gpt2", [np.arange(5)])


@given(
    n=st.integers(min_value=2, max_value=300),
    window=st.integers(min_value=2, max_value=64),
    stride_fraction=st.floats(min_value=0.0, max_value=1.0),
)
def test_sliding_windows_score_each_token_at_most_once(n, window, stride_fraction):
    stride = max(1, round(stride_fraction * window))
    ids = np.arange(n)
    if n < window:
        with pytest.raises(DataError, match="fewer than one window"):
            sliding_windows(ids, window, stride)
        return
    windows = sliding_windows(ids, window, stride)
    scored = np.concatenate([w.ids[w.first_target :] for w in windows])
    assert len(scored) == len(set(scored.tolist()))  # never twice
    assert all(len(w.ids) == window and 1 <= w.first_target < window for w in windows)
    assert windows[-1].ids[-1] == n - 1  # the text is covered to its end
    if stride < window:  # overlapping windows: every token after the first is predicted
        assert sorted(scored.tolist()) == list(range(1, n))
    else:  # the protocol's non-overlapping windows: the starts of later full windows are context only
        assert set(range(1, n)) - set(scored.tolist()) == {k * window for k in range(1, n // window)}


def test_text_file_with_stride_equal_window_matches_the_protocol(tmp_path, tiny_text_ids):
    lm = load_model("tiny:llava")
    text = pydoc_text()[:3000]
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    ids = tokenize_text(lm.tokenizer, text)
    window = 64
    n_full = len(ids) // window
    from_file = perplexity_of_text_file(lm, path, window=window, stride=window)
    tail = len(ids) - n_full * window
    expected_tokens = n_full * (window - 1) + (tail if tail else 0)
    assert from_file.tokens == expected_tokens
    # the same windows scored by hand: protocol windows plus the moved-back last window
    windows = [ScoredWindow(ids[i * window : (i + 1) * window], 1) for i in range(n_full)]
    if tail:
        windows.append(ScoredWindow(ids[-window:], window - tail))
    assert from_file.ppl == pytest.approx(score_windows(lm.model, windows).ppl, rel=1e-9)
    overlapping = perplexity_of_text_file(lm, path, window=window, stride=16)
    assert overlapping.tokens == len(ids) - 1


def test_text_file_errors(tmp_path):
    lm = load_model("tiny:llava")
    short = tmp_path / "short.txt"
    short.write_text("Too short.", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{short}: the text has \d+ tokens, fewer than one window of 512"):
        perplexity_of_text_file(lm, short)
    with pytest.raises(DataError, match="not found"):
        perplexity_of_text_file(lm, tmp_path / "none.txt")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="not UTF-8"):
        perplexity_of_text_file(lm, binary)
    with pytest.raises(ConfigError, match="stride"):
        sliding_windows(np.arange(100), 10, 11)


@pytest.mark.slow
def test_default_vlm_text_path_equals_the_plain_language_model(default_model):
    """The embedded VLM's text-only forward scores text as a plain causal LM with its weights does."""
    from transformers import LlamaForCausalLM
    from transformers.initialization import no_init_weights

    from qe.evaluation.perplexity import heldout_windows

    windows = heldout_windows(default_model.tokenizer, window=256, max_tokens=256)
    assert len(windows) == 1
    vlm = perplexity(default_model, windows, progress=False)
    text_config = default_model.model.config.text_config
    with no_init_weights():  # every weight is overwritten below
        lm = LlamaForCausalLM(text_config).eval()
    lm.model.load_state_dict(default_model.adapter.language_model(default_model.model).state_dict())
    lm.lm_head.weight = lm.model.embed_tokens.weight  # tied, as in SmolLM2
    plain = perplexity(lm, windows, progress=False)
    assert vlm.tokens == plain.tokens == 255
    assert vlm.ppl == pytest.approx(plain.ppl, rel=1e-5)
    assert 3 < vlm.ppl < 40  # a real language model on English text, not a random one
