import pytest
from hypothesis import given
from hypothesis import strategies as st

from qe.errors import ConfigError
from qe.settings import QuantSetting, parse_setting, parse_settings


@pytest.mark.parametrize(
    "text,expected",
    [
        ("W4A8", QuantSetting(4, 8, 0, True)),
        ("W4A6", QuantSetting(4, 6, 0, True)),
        ("W3A16", QuantSetting(3, 16, 128, False)),
        ("W3A16g128asym", QuantSetting(3, 16, 128, False)),
        ("W4A16chsym", QuantSetting(4, 16, 0, True)),
        ("W4A16g64sym", QuantSetting(4, 16, 64, True)),
        ("w8a8", QuantSetting(8, 8, 0, True)),
        ("W4A8g128asym", QuantSetting(4, 8, 128, False)),
        ("W4A4KV4", QuantSetting(4, 4, 0, True, kv_bits=4)),
        ("w4a16kv8g64", QuantSetting(4, 16, 64, False, kv_bits=8)),
    ],
)
def test_parse_examples(text, expected):
    assert parse_setting(text) == expected


@given(
    w=st.integers(2, 8),
    a=st.sampled_from([4, 5, 6, 7, 8, 16]),
    g=st.sampled_from([0, 32, 64, 128]),
    sym=st.booleans(),
    kv=st.sampled_from([2, 4, 8, 16]),
)
def test_name_round_trip(w, a, g, sym, kv):
    s = QuantSetting(w, a, g, sym, kv)
    assert parse_setting(s.name) == s
    assert parse_setting(s.short_name) == s


@pytest.mark.parametrize("bad", ["W4", "A8", "W4A8x", "W1A8", "W9A8", "W4A3", "W4A9", "W4A8g0", "", "4A8", "W4A4KV1",
                                 "W4A4KV9", "W4A4KV", "W4A4KV16"])
def test_bad_settings_name_the_forms(bad):
    with pytest.raises(ConfigError) as e:
        parse_setting(bad)
    msg = str(e.value)
    assert "\n" not in msg
    assert "W<bits>A<bits>" in msg or "bits" in msg or "group" in msg


def test_overrides_and_lists():
    s = parse_setting("W4A8").with_overrides(group_size=64, a_bits=6)
    assert s == QuantSetting(4, 6, 64, True)
    assert [x.short_name for x in parse_settings("W4A8, W4A6,W3A16")] == ["W4A8", "W4A6", "W3A16"]
    with pytest.raises(ConfigError):
        parse_settings(" , ")
