"""Calibration and evaluation data: built-in images, the text protocol, user JSONL files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qe.data.images import _catalog, _load_reference, builtin_image_captions, load_image, sample_image, to_rgb
from qe.data.sources import BuiltinImages, JsonlSource, PydocText, read_jsonl, resolve_source, take_samples
from qe.data.text import (
    CALIB_WINDOWS,
    WINDOW,
    calibration_starts,
    calibration_windows,
    eval_starts,
    eval_windows,
    pydoc_text,
    split_tokens,
    tokenize_text,
)
from qe.errors import ConfigError, DataError

# --------------------------------------------------------------------------- built-in images


def test_builtin_set_splits_by_image():
    entries = _catalog()["images"]
    assert len(entries) == 26
    assert len({e["id"] for e in entries}) == 26 and len({e["source"] for e in entries}) == 26
    calib, held_out = builtin_image_captions("calib"), builtin_image_captions("eval")
    calib_images = {s.image for s in calib}
    eval_images = {s.image for s in held_out}
    assert calib_images and eval_images and not calib_images & eval_images
    assert len(calib) + len(held_out) == len(builtin_image_captions()) == sum(len(e["captions"]) for e in entries)
    assert all(s.text.strip() and s.has_image for s in calib + held_out)


@pytest.mark.parametrize("split", ["calib", "eval"])
def test_first_samples_cover_distinct_images(split):
    samples = builtin_image_captions(split)
    n_images = len({s.image for s in samples})
    assert len({s.image for s in samples[:n_images]}) == n_images


def test_bad_split_name():
    with pytest.raises(ValueError, match="calib or eval"):
        builtin_image_captions("train")


def test_every_builtin_image_loads_as_rgb():
    for entry in _catalog()["images"]:
        image = load_image(entry["source"], origin=entry["id"])
        assert image.mode == "RGB" and min(image.size) >= 64, entry["id"]


def test_transparent_pixels_become_white():
    from PIL import Image

    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((1, 1), (10, 20, 30, 255))
    rgb = to_rgb(rgba)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 1)) == (10, 20, 30)
    assert to_rgb(Image.new("L", (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)


# --------------------------------------------------------------------------- text protocol


@given(
    n=st.integers(min_value=40, max_value=5000),
    window=st.integers(min_value=2, max_value=24),
    n_windows=st.integers(min_value=1, max_value=70),
    max_tokens=st.none() | st.integers(min_value=0, max_value=5000),
)
def test_calibration_and_held_out_windows_never_overlap(n, window, n_windows, max_tokens):
    ids = np.arange(n)  # token value = position, so windows reveal where they come from
    parts = split_tokens(ids)
    cut = parts.eval_offset
    assert cut == int(n * 0.6) and len(parts.calib_ids) + len(parts.eval_ids) == n
    if len(parts.calib_ids) < window:
        with pytest.raises(DataError, match="fewer than one window"):
            calibration_windows(parts.calib_ids, n_windows, window)
        return
    calib = calibration_windows(parts.calib_ids, n_windows, window)
    held = eval_windows(parts.eval_ids, window, max_tokens)
    assert len(calib) == n_windows
    assert all(len(w) == window for w in calib + held)
    calib_positions = set(np.concatenate(calib).tolist())
    held_positions = np.concatenate(held).tolist() if held else []
    assert max(calib_positions) < cut <= min(held_positions, default=cut)
    assert len(held_positions) == len(set(held_positions))  # held-out windows do not overlap
    usable = len(parts.eval_ids) if max_tokens is None else min(len(parts.eval_ids), max_tokens)
    assert len(held) == usable // window  # only the trailing partial window is dropped
    starts = calibration_starts(len(parts.calib_ids), n_windows, window)
    assert starts[0] == 0  # spread over the whole calibration part
    assert n_windows == 1 or starts[-1] == len(parts.calib_ids) - window
    assert np.all(np.diff(starts) >= 0)
    assert list(eval_starts(len(parts.eval_ids), window, max_tokens)) == [int(w[0]) - cut for w in held]


def test_text_protocol_is_the_sorted_pydoc_topics():
    from pydoc_data.topics import topics

    text = pydoc_text()
    first, last = sorted(topics)[0], sorted(topics)[-1]
    assert text.startswith(topics[first]) and text.endswith(topics[last])
    assert text.count("\n\n") >= len(topics) - 1


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from qe.models.default_model import ensure_default_model

    return AutoTokenizer.from_pretrained(ensure_default_model())


@pytest.mark.slow
def test_pydoc_split_matches_the_anchor_protocol(smollm2_tokenizer):
    ids = tokenize_text(smollm2_tokenizer, pydoc_text())
    assert len(ids) == 113_108
    parts = split_tokens(ids)
    assert len(parts.calib_ids) == 67_864 and len(parts.eval_ids) == 45_244
    calib = calibration_windows(parts.calib_ids)
    held = eval_windows(parts.eval_ids)
    assert len(calib) == CALIB_WINDOWS == 64 and len(held) == 88
    assert sum(len(w) - 1 for w in held) == 44_968  # predicted tokens (docs/protocol.md)
    # the source plugin hands out exactly these windows
    source = PydocText()
    calib_samples = source.samples(smollm2_tokenizer, "calib")
    eval_samples = source.samples(smollm2_tokenizer, "eval")
    assert [s.token_ids for s in calib_samples] == [tuple(int(t) for t in w) for w in calib]
    assert len(eval_samples) == 88 and all(len(s.token_ids) == WINDOW for s in eval_samples)


# --------------------------------------------------------------------------- JSONL files


@pytest.fixture
def png(tmp_path):
    from PIL import Image

    path = tmp_path / "img.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return path


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_reads_the_three_record_kinds(tmp_path, png):
    f = _write(tmp_path / "c.jsonl", [
        json.dumps({"image": "img.png", "text": "A red square."}),  # relative to the file
        "",
        json.dumps({"image": str(png), "prompt": "What colour?", "text": "Red."}),
        json.dumps({"text": "Plain text for calibration."}),
    ])
    samples = read_jsonl(f)
    assert [s.origin for s in samples] == [f"{f}:1", f"{f}:3", f"{f}:4"]
    assert samples[0].image == str(png) and samples[0].prompt is None
    assert samples[1].prompt == "What colour?"
    assert samples[2].image is None and samples[2].text == "Plain text for calibration."
    assert sample_image(samples[0]).getpixel((0, 0)) == (200, 10, 10)
    assert isinstance(resolve_source(str(f)), JsonlSource)
    assert resolve_source(str(f)).samples() == samples


@pytest.mark.parametrize(
    "bad_line, line_no, message",
    [
        ('{"text": "fine"', 2, "not valid JSON"),
        ('["text"]', 2, "JSON object"),
        ('{"text": "x", "caption": "y"}', 2, "unknown field"),
        ('{"image": "img.png"}', 2, '"text" must be a non-empty string'),
        ('{"text": "   "}', 2, '"text" must be a non-empty string'),
        ('{"image": "missing.png", "text": "x"}', 2, "not found"),
        ('{"image": 3, "text": "x"}', 2, "file path"),
        ('{"prompt": "p", "text": "x"}', 2, 'needs an "image"'),
        ('{"image": "img.png", "prompt": 5, "text": "x"}', 2, "must be a string"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, png, bad_line, line_no, message):
    f = _write(tmp_path / "bad.jsonl", [json.dumps({"image": "img.png", "text": "ok"}), bad_line])
    with pytest.raises(DataError) as err:
        read_jsonl(f)
    assert f"{f}:{line_no}" in str(err.value)
    assert message in str(err.value)


def test_jsonl_unreadable_image_fails_at_read_time(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"this is not a PNG file at all")
    f = _write(tmp_path / "c.jsonl", [json.dumps({"text": "t"}), json.dumps({"image": "broken.png", "text": "x"})])
    with pytest.raises(DataError, match=rf"{f}:2: cannot read image"):
        read_jsonl(f)


def test_jsonl_not_utf8(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"{f}:2: not UTF-8"):
        read_jsonl(f)


def test_jsonl_empty_and_missing(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="holds no samples"):
        read_jsonl(empty)
    with pytest.raises(DataError, match="not found"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_load_image_errors_name_the_record(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataError, match=r"cannot read image .*\(my.jsonl:7\)"):
        load_image(str(tmp_path / "broken.jpg"), origin="my.jsonl:7")
    with pytest.raises(DataError, match="not found"):
        load_image(str(tmp_path / "none.png"))
    with pytest.raises(DataError, match="unknown built-in image"):
        _load_reference("nowhere:x")


def test_named_sources_and_take_samples():
    assert isinstance(resolve_source(None), BuiltinImages)
    assert isinstance(resolve_source("pydoc"), PydocText)
    with pytest.raises(ConfigError):
        resolve_source("no-such-source")
    samples = BuiltinImages().samples(None, "calib")
    assert take_samples(samples, None) == samples
    assert take_samples(samples, 3) == samples[:3]
    with pytest.raises(ConfigError, match="at least 1"):
        take_samples(samples, 0)
    with pytest.raises(DataError, match="no samples"):
        take_samples([], 2)


# --------------------------------------------------------------------------- mixed calibration

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qe.data.calibration import calibration_set, default_calibration, tokens_by_source  # noqa: E402
from qe.data.samples import Sample  # noqa: E402
from qe.data.sources import MixedCalibration, MixedConfig, interleave  # noqa: E402


@given(st.integers(0, 40), st.integers(0, 40), st.floats(0.0, 1.0))
def test_interleave_keeps_the_share_in_every_prefix(n_first, n_second, share):
    first = [Sample(text=f"a{i}") for i in range(n_first)]
    second = [Sample(text=f"b{i}") for i in range(n_second)]
    out = interleave(first, second, share)
    assert sorted(s.text for s in out) == sorted(s.text for s in first + second)  # nothing lost or doubled
    assert [s for s in out if s.text.startswith("a")] == first  # each list keeps its order
    taken = 0
    for n, s in enumerate(out, 1):
        taken += s.text.startswith("a")
        if taken < n_first and n - taken < n_second:  # both lists still have samples
            assert abs(taken - round(n * share)) <= 1


def test_mixed_source_and_the_synthetic_vision_default():
    from qe.models.loading import load_model

    loaded = load_model("tiny:llava")
    assert default_calibration(loaded)[0] == "images"  # a (tiny) VLM with its own vision tower
    loaded.card = {**(loaded.card or {}), "synthetic_vision_tower": True}
    name, why = default_calibration(loaded)
    assert name == "mixed" and "synthetic" in why
    described, encoded = calibration_set(loaded, None, 6)
    assert described.startswith("mixed") and "default" in described
    counts = tokens_by_source(encoded)
    assert set(counts) == {"pydoc", "builtin"} and counts["pydoc"] == 3 * 512
    assert sum(counts.values()) == sum(e.num_tokens for e in encoded)
    samples = MixedCalibration(MixedConfig(text_share=0.25, window=64)).samples(loaded.tokenizer)
    origins = [s.origin.split(":")[0] for s in samples]
    assert origins[:8].count("pydoc") == 2 and origins[:16].count("pydoc") == 4
