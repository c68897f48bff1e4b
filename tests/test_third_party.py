"""A third-party compensator, installed as its own distribution through the ``qe`` entry point
group, round-trips like a built-in one: quantize → load (equal outputs) → eval → interrupted
and resumed (identical tensors) → a compare cell; uninstalled, its checkpoint is refused in
one line naming the plugin and its distribution."""

import json
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import qe
from qe import cli
from qe.commands.compare import CompareOptions, run_compare
from qe.commands.quantize import run_quantize
from qe.compensators.base import Compensator
from qe.errors import ConfigError, ModelError
from qe.models.loading import load_model
from qe.plugins import QEPluginManager, default_manager
from qe.recipe import Recipe

PACKAGE = '''
"""A rank-one correction from the weight error's top singular pair (a third party's plugin)."""
import torch
from qe import hookimpl
from qe.compensators.base import Compensator, CompensatorModule


class RankOneCorrection(CompensatorModule):
    module_type = "thirdparty_rank1"

    def __init__(self, d_in, d_out):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.register_buffer("u", torch.zeros(d_out))
        self.register_buffer("v", torch.zeros(d_in))

    def layout(self):
        return {"d_in": self.d_in, "d_out": self.d_out}

    @classmethod
    def from_layout(cls, layout):
        return cls(layout["d_in"], layout["d_out"])

    def forward(self, x):
        return (x @ self.v.to(x.dtype))[..., None] * self.u.to(x.dtype)


class RankOne(Compensator):
    """Rank-one correction of the weight error (third-party example)."""

    name = "rank1"
    modules = (RankOneCorrection,)

    def fit(self, layer, quantized, plan):
        error = layer.weight - quantized.dequantize()
        U, S, Vh = torch.linalg.svd(error, full_matrices=False)
        m = RankOneCorrection(layer.d_in, layer.d_out)
        m.u.copy_(U[:, 0] * S[0])
        m.v.copy_(Vh[0])
        m.fit_figures = {"singular_value": float(S[0])}
        return m


@hookimpl
def qe_compensators():
    return [RankOne]
'''

RECIPE = Recipe(quantizer="rtn", compensator="rank1", setting="W4A8", samples=2)


def _install(site):
    (site / "qe_rank1_plugin").mkdir(parents=True)
    (site / "qe_rank1_plugin" / "__init__.py").write_text(textwrap.dedent(PACKAGE))
    info = site / "qe_rank1_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qe-rank1-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[qe]\nrank1 = qe_rank1_plugin\n")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The distribution on sys.path while the module's tests run, then removed."""
    site = tmp_path_factory.mktemp("site")
    _install(site)
    sys.path.insert(0, str(site))
    default_manager.cache_clear()
    yield site
    sys.path.remove(str(site))
    sys.modules.pop("qe_rank1_plugin", None)
    default_manager.cache_clear()


@pytest.fixture(scope="module")
def checkpoint(installed, tmp_path_factory):
    loaded = load_model("tiny:llava")
    out = tmp_path_factory.mktemp("q") / "ckpt"
    path, manifest = run_quantize(RECIPE, out=out, loaded=loaded, progress=False)
    return loaded, path, manifest


class _Interrupt:
    @qe.hookimpl
    def qe_block_end(self, block_index, num_blocks, figures):
        if block_index == 0:
            raise KeyboardInterrupt


def test_the_entry_point_plugin_is_found_with_its_distribution(installed):
    entry = default_manager().entries("compensator")["rank1"]
    assert entry.origin == "qe-rank1-plugin 0.1"
    assert default_manager().compensator_modules()["thirdparty_rank1"][0].name == "rank1"


def test_checkpoint_records_the_plugin_and_reloads_to_equal_outputs(checkpoint):
    loaded, path, manifest = checkpoint
    records = [v["compensator"] for v in manifest["layouts"].values()]
    assert records and all(r["module"] == "thirdparty_rank1" and r["plugin"] == "rank1"
                           and r["distribution"] == "qe-rank1-plugin 0.1" for r in records)
    layers = manifest["layers"]
    assert all(r["figures"]["rel_error"] < r["figures"]["rel_error_base"] for r in layers)
    assert all("singular_value" in r["figures"] for r in layers)  # fit figures reach the manifest
    reloaded = qe.load_quantized(path)
    ids = torch.arange(5, 60).reshape(1, -1)
    with torch.no_grad():
        assert torch.equal(reloaded.model(input_ids=ids).logits, loaded.model(input_ids=ids).logits)


def test_qe_eval_reads_the_checkpoint(checkpoint, capsys):
    _, path, _ = checkpoint
    assert cli.main(["eval", "--model", str(path), "--eval-tokens", "512", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "rank1" in out


def test_interrupted_run_resumes_to_identical_tensors(checkpoint, tmp_path):
    _, path, manifest = checkpoint
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_quantize(RECIPE, "tiny:llava", out=out, progress=False,
                     manager=QEPluginManager(extra_plugins=[_Interrupt()]))
    run_quantize(RECIPE, "tiny:llava", out=out, resume=True, progress=False)
    a = load_file(str(path / manifest["shards"][0]))
    b = load_file(str(out / manifest["shards"][0]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_compare_cell(installed, tmp_path):
    opts = CompareOptions(samples=2, eval_tokens=512, caption_nll=False, progress=False)
    _, rows = run_compare("tiny:llava", "rtn", "none,rank1", "W4A8", out=tmp_path / "grid", options=opts)
    by_label = {r["label"]: r for r in rows}
    cell = by_label["rtn+rank1@W4A8"]
    assert cell["status"] == "ok" and cell["added_params"] > 0
    assert cell["mean_rel_error"] < cell["mean_rel_error_base"]
    assert cell["ppl"] != by_label["rtn+none@W4A8"]["ppl"]


def test_uninstalled_plugin_is_named_in_one_line(checkpoint, installed):
    _, path, _ = checkpoint
    sys.path.remove(str(installed))
    sys.modules.pop("qe_rank1_plugin", None)
    default_manager.cache_clear()
    try:
        with pytest.raises(ModelError) as err:
            qe.load_quantized(path)
    finally:
        sys.path.insert(0, str(installed))
        default_manager.cache_clear()
    message = str(err.value)
    assert "\n" not in message and "'rank1'" in message and "qe-rank1-plugin" in message
    assert "pip install qe-rank1-plugin" in message
    manifest = json.loads((path / "qe_manifest.json").read_text())
    assert manifest["format_version"] == 2


class _Bare(Compensator):
    """Returns a plain nn.Module, which no checkpoint could rebuild."""

    name = "bare"
    needs_tokens = True

    def fit(self, layer, quantized, plan):
        return torch.nn.Linear(layer.d_in, layer.d_out, bias=False)


class _BarePlugin:
    @qe.hookimpl
    def qe_compensators(self):
        return [_Bare]


def test_a_module_outside_the_contract_is_refused_in_one_line(tmp_path):
    manager = QEPluginManager(load_entry_points=False, extra_plugins=[_BarePlugin()])
    with pytest.raises(ConfigError, match="subclass qe.compensators.base.CompensatorModule") as err:
        run_quantize(Recipe(compensator="bare", samples=2), "tiny:llava", out=tmp_path / "x", progress=False,
                     manager=manager)
    assert "\n" not in str(err.value) and "'bare'" in str(err.value)


def test_a_plugin_class_outside_its_kinds_base_is_refused():
    class NotACompensator:
        name = "stray"

    class Plugin:
        @qe.hookimpl
        def qe_compensators(self):
            return [NotACompensator]

    with pytest.raises(ConfigError, match="does not subclass qe.compensators.base.Compensator"):
        QEPluginManager(load_entry_points=False, extra_plugins=[Plugin()]).entries("compensator")
