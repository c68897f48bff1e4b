"""qe analyze: streamed statistics equal batch ones, planted structure is recovered, and a
run on a tiny VLM writes a complete, schema-valid report."""

import json

import jsonschema
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qe.analysis.analyze import AnalyzeOptions, summarize_linear
from qe.analysis.estimators import ActAbsMax, ActWeight
from qe.analysis.report import load_schema
from qe.analysis.statistics import ImportanceStats, InputStats, LinearStats, choose_sample_positions
from qe.errors import ConfigError
from qe.modality import Modality


def _stats(x, modality, k, estimator, chunks=1, weight=None):
    d_in = x.shape[1]
    positions = choose_sample_positions(x.shape[0], 10_000)
    inp = InputStats(d_in, positions, hessian=True, moments=True, where="t")
    factor = estimator.prepare(weight) if weight is not None else None
    imp = ImportanceStats(d_in, k, factor, estimator, where="t")
    bounds = np.linspace(0, x.shape[0], chunks + 1).astype(int)
    for a, b in zip(bounds[:-1], bounds[1:]):
        inp.update(x[a:b], modality[a:b], int(a))
        imp.update(x[a:b], modality[a:b], int(a))
    return LinearStats("t", inp, imp)


@given(seed=st.integers(0, 1000), chunks=st.integers(2, 5))
@settings(max_examples=10)
def test_streaming_equals_batch(seed, chunks):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, 48, generator=g) * torch.rand(48, generator=g) * 3
    mod = torch.randint(0, 3, (300,), generator=g).to(torch.int8)
    w = torch.randn(16, 48, generator=g)
    one = _stats(x, mod, 4, ActWeight(), 1, w)
    many = _stats(x, mod, 4, ActWeight(), chunks, w)
    # fp32 GEMM per batch, fp64 across batches: chunking changes only fp32 rounding.
    exact = x.double().T @ x.double()
    for h in (one.input.xtx, many.input.xtx):
        assert float((h - exact).norm() / exact.norm()) < 1e-6
    assert torch.equal(one.input.absmax, x.abs().amax(0))
    assert torch.equal(one.importance.counts, many.importance.counts)
    assert torch.equal(one.importance.topk, many.importance.topk)
    assert torch.equal(one.input.sample, many.input.sample)
    assert torch.allclose(one.input.kurtosis(), many.input.kurtosis(), rtol=1e-6, atol=1e-6)
    opts = AnalyzeOptions(k=4, num_experts=2)
    s1, _, _ = summarize_linear(one, 0, "lin", opts)
    s2, _, _ = summarize_linear(many, 0, "lin", opts)
    _assert_close(s1, s2)


def _assert_close(a, b, path="summary"):
    """Equal structure and integers; floats equal up to fp32 summation order."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6, nan_ok=True), path
    elif isinstance(a, str) and path.endswith("finding"):
        pass  # the sentence quotes rounded floats
    else:
        assert a == b, path


def _planted(seed, d_in, k, groups, n_tokens=1200):
    """Activations where channels S are large for 80% of tokens and each group of channels is
    large together for its own tokens."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(d_in, generator=g)
    shared = perm[:k]
    routed = [perm[k + i * k: k + (i + 1) * k] for i in range(groups)]
    x = torch.rand(n_tokens, d_in, generator=g) * 0.1
    owner = torch.randint(0, groups, (n_tokens,), generator=g)
    common = torch.rand(n_tokens, generator=g) < 0.8
    for t in range(n_tokens):
        x[t, routed[int(owner[t])]] += 5 + torch.rand(k, generator=g)
        if common[t]:
            x[t, shared] += 10 + torch.rand(k, generator=g)
    # Tokens without the common channels still rank their own group first, which keeps C_s
    # the k most frequent channels overall (80% of tokens) and each group below it.
    mod = torch.full((n_tokens,), int(Modality.TEXT), dtype=torch.int8)
    return x, mod, shared, routed


@given(seed=st.integers(0, 500), k=st.sampled_from([3, 4, 6]), groups=st.integers(2, 4))
@settings(max_examples=8)
def test_planted_structure_is_recovered(seed, k, groups):
    d_in = k * (1 + groups) + 10
    x, mod, shared, routed = _planted(seed, d_in, k, groups)
    stats = _stats(x, mod, 2 * k, ActAbsMax(), 1)  # top-2k sets: k common + k of the token's group
    summary, rows, _ = summarize_linear(stats, 0, "lin", AnalyzeOptions(k=k, num_experts=groups))
    assert set(summary["token_independent"]) == set(shared.tolist())
    assert set(summary["token_dependent"]) == set(torch.cat(routed).tolist())
    labels = dict(zip(summary["token_dependent"], summary["clusters"]["labels"]))
    found = {frozenset(c for c in summary["token_dependent"] if labels[c] == lab) for lab in set(labels.values())}
    assert found == {frozenset(r.tolist()) for r in routed}
    assert len(rows) == d_in


def test_missing_modality_is_reported_not_divided():
    x = torch.randn(200, 40)
    mod = torch.full((200,), int(Modality.TEXT), dtype=torch.int8)
    stats = _stats(x, mod, 4, ActAbsMax())
    summary, _, _ = summarize_linear(stats, 0, "lin", AnalyzeOptions(k=4, num_experts=2))
    assert summary["missing_modalities"] == ["vision", "answer"]
    assert summary["overlap"]["vision_text"] is None
    assert "no vision or answer tokens" in summary["finding"].lower()


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    from qe.commands.analyze import analyze

    out = tmp_path_factory.mktemp("an") / "report"
    path, summary = analyze("tiny:llava", samples=6, out=out, k=4, num_experts=2, progress=False,
                            plot_blocks=(0, 1))
    return path, summary


def test_report_writes_every_file(tiny_report):
    from PIL import Image

    path, summary = tiny_report
    names = {p.name for p in path.iterdir()}
    assert {"summary.json", "channels.csv", "index.html", "overlap_vs_depth.png",
            "dependent_share_vs_depth.png", "stray_vs_depth.png"} <= names
    pngs = [p for p in path.iterdir() if p.suffix == ".png"]
    assert len(pngs) >= 3 + 2 * 7  # cross-layer + per-layer (frequency, token map, NPMI) for two blocks
    for p in pngs:
        im = np.asarray(Image.open(p).convert("L"))
        assert im.shape[0] > 50 and im.shape[1] > 50 and im.std() > 1  # not blank
    html = (path / "index.html").read_text()
    assert "<table>" in html and summary["layers"][0]["finding"] in html
    rows = (path / "channels.csv").read_text().splitlines()
    assert len(rows) == 1 + sum(layer["d_in"] for layer in summary["layers"])


def test_summary_validates_against_schema(tiny_report):
    path, _ = tiny_report
    data = json.loads((path / "summary.json").read_text())
    jsonschema.validate(data, load_schema())
    assert data["schema_version"] == 2
    assert len(data["layers"]) == 2 * 7
    layer = data["layers"][0]
    assert len(layer["token_independent"]) == 4 and len(layer["token_dependent"]) == 8
    assert sum(layer["tokens"].values()) == data["run"]["calibration"]["tokens"]["text"] + \
        data["run"]["calibration"]["tokens"]["vision"] + data["run"]["calibration"]["tokens"]["answer"]
    assert data["run"]["calibration"]["tokens"]["vision"] > 0
    assert data["run"]["setting"] == "W4A8chsym"  # the default the advice predicts for


def test_advice_follows_the_setting(tiny_report, tmp_path):
    """Weights only: no activation rounding, the whole error is the weights'; more weight bits:
    the same shares of a smaller weight error, so activation rounding's part grows."""
    from qe.commands.analyze import analyze

    _, w4a8 = tiny_report
    _, w4a16 = analyze("tiny:llava", samples=6, out=tmp_path / "a16", k=4, num_experts=2, progress=False,
                       plot_blocks=(), setting="W4A16chsym")
    _, w8a8 = analyze("tiny:llava", samples=6, out=tmp_path / "w8", k=4, num_experts=2, progress=False,
                      plot_blocks=(), setting="W8A8")
    for a, b, c in zip(w4a8["layers"], w4a16["layers"], w8a8["layers"]):
        for base in ("rtn", "gptq"):
            assert b["advice"]["weight_fraction"][base] == 1.0
            assert b["advice"]["predicted_gain"][base] >= a["advice"]["predicted_gain"][base]
            assert c["advice"]["weight_fraction"][base] < a["advice"]["weight_fraction"][base]


def test_bad_input_fails_before_work(tmp_path):
    from qe.commands.analyze import analyze

    with pytest.raises(ConfigError, match="matches no linear; names look like"):
        analyze("tiny:llava", layers="nothing_here", out=tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="exceeds the input width"):
        analyze("tiny:llava", k=1000, out=tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="unknown estimator 'nope'"):
        analyze("tiny:llava", estimator="nope", out=tmp_path / "c", progress=False)
    with pytest.raises(ConfigError, match="activation bits 3 unsupported"):
        analyze("tiny:llava", setting="W4A3", out=tmp_path / "d", progress=False)
    assert not (tmp_path / "a").exists()
