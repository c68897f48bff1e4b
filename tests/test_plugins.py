"""The plugin core: naming grammar, typed configs, registration, third-party entry points."""

import sys
import textwrap
from dataclasses import dataclass
from typing import Literal

import pytest

from qe.errors import ConfigError
from qe.plugins import QEPluginManager, build_config, parse_plugin_ref, split_plugin_list


def test_parse_plugin_ref():
    ref = parse_plugin_ref("lowrank[rank=64;method=lqer]")
    assert ref.name == "lowrank" and dict(ref.params) == {"rank": "64", "method": "lqer"}
    assert str(ref) == "lowrank[rank=64;method=lqer]"
    assert parse_plugin_ref(" rtn ").name == "rtn"
    for bad in ["", "a[b]", "a[b=1", "a]b", "a=b"]:
        with pytest.raises(ConfigError):
            parse_plugin_ref(bad)


def test_split_plugin_list_respects_brackets():
    assert split_plugin_list("none,lowrank[rank=64;method=lqer],qe[alphas=none,0.5]") == [
        "none", "lowrank[rank=64;method=lqer]", "qe[alphas=none,0.5]"]


@dataclass(frozen=True)
class _Cfg:
    rank: int = 8
    alpha: float = 0.5
    on: bool = False
    method: Literal["a", "b"] = "a"
    alphas: tuple[float | None, ...] = (None, 0.5)
    inner: str = "rtn"

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError("rank must be at least 1")


def test_build_config_converts_types():
    cfg = build_config(_Cfg, [("rank", "16"), ("alpha", "0.25"), ("on", "true"), ("method", "B"),
                              ("alphas", "none/0.25/0.75")], "x")
    assert cfg == _Cfg(16, 0.25, True, "b", (None, 0.25, 0.75))


@pytest.mark.parametrize("params,needle", [
    ([("rnk", "1")], "no parameter 'rnk'"),
    ([("rank", "x")], "not an integer"),
    ([("on", "maybe")], "not a boolean"),
    ([("method", "c")], "choose one of a, b"),
    ([("rank", "0")], "at least 1"),
])
def test_build_config_errors_are_one_line(params, needle):
    with pytest.raises(ConfigError) as e:
        build_config(_Cfg, params, "compensator x")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_builtins_registered_through_hooks():
    m = QEPluginManager(load_entry_points=False)
    assert {"act-weight", "act-absmax", "hessian-diag"} <= set(m.names("estimator"))
    assert "rtn" in m.names("quantizer")
    assert "none" in m.names("compensator")
    assert {"llava", "generic"} <= set(m.names("model_adapter"))
    assert {"images", "pydoc"} <= set(m.names("calibration_source"))
    assert all(e.origin == "built-in" for e in m.entries("quantizer").values())


def test_unknown_plugin_lists_what_exists():
    m = QEPluginManager(load_entry_points=False)
    with pytest.raises(ConfigError) as e:
        m.resolve("quantizer", "nope")
    assert "unknown quantizer 'nope'" in str(e.value) and "rtn" in str(e.value)
    with pytest.raises(ConfigError) as e:
        m.resolve("quantizer", "rtn[bogus=1]")
    assert "no parameter 'bogus'" in str(e.value)


PLUGIN_MODULE = '''
from dataclasses import dataclass
import torch
import qe
from qe.analysis.estimators import Estimator


@dataclass(frozen=True)
class SquareConfig:
    power: float = 2.0


class SquareEstimator(Estimator):
    """|x|^p importance, from a third-party package."""

    name = "square"
    Config = SquareConfig

    def score(self, x, channel_factor):
        return x.abs() ** self.config.power


events = []


@qe.hookimpl
def qe_estimators():
    return [SquareEstimator]


@qe.hookimpl
def qe_layer_end(block_index, layer_name, figures):
    events.append((block_index, layer_name))
'''


def _install_fake_distribution(root, dist="qe-square-plugin", version="1.2.3", module="qe_square_plugin"):
    (root / f"{module}.py").write_text(textwrap.dedent(PLUGIN_MODULE))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[qe]\nsquare = {module}\n")
    (info / "RECORD").write_text("")


def test_third_party_distribution_is_listed_and_used(tmp_path, monkeypatch):
    import torch

    _install_fake_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        m = QEPluginManager(load_entry_points=True)
        entry = m.entries("estimator")["square"]
        assert entry.origin == "qe-square-plugin 1.2.3"
        assert "power=2.0" in entry.parameters
        est = m.create("estimator", "square[power=3]")
        x = torch.tensor([[-2.0, 1.0, 0.5]])
        assert torch.allclose(est.score(x, est.prepare(torch.ones(4, 3))), x.abs() ** 3)
        # Event hooks of the third party are called by the pipeline's manager.
        m.hook.qe_layer_end(block_index=3, layer_name="layer", figures={})
        assert sys.modules["qe_square_plugin"].events == [(3, "layer")]
    finally:
        sys.modules.pop("qe_square_plugin", None)


def test_cli_plugins_lists_third_party(tmp_path, monkeypatch, capsys):
    from qe import cli, plugins

    _install_fake_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.default_manager.cache_clear()
    try:
        assert cli.main(["plugins"]) == 0
        out = capsys.readouterr().out
        assert "square" in out and "qe-square-plugin 1.2.3" in out and "[built-in]" in out
        assert "transforms:" in out and "smoothquant" in out  # the transform kind is listed
        hooks = out.split("event hooks", 1)[1]
        for name in ("qe_run_start", "qe_block_start", "qe_layer_start", "qe_layer_end", "qe_block_end", "qe_run_end"):
            assert name in hooks
        assert "implemented by: square (qe-square-plugin 1.2.3)" in hooks  # the third party's qe_layer_end
    finally:
        plugins.default_manager.cache_clear()
        sys.modules.pop("qe_square_plugin", None)


def test_duplicate_names_are_refused(tmp_path, monkeypatch):
    import qe
    from qe.analysis.estimators import ActWeight

    class Dup:
        @qe.hookimpl
        def qe_estimators(self):
            return [ActWeight]

    m = QEPluginManager(load_entry_points=False, extra_plugins=[Dup()])
    with pytest.raises(ConfigError, match="registered twice"):
        m.entries("estimator")
