"""Faults that used to lose work or lie, and hostile inputs: each one fails in one line, or
the run continues where it stopped and gives the same result."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import qe
from qe import cli
from qe.commands import quantize as qmod
from qe.commands.compare import CompareOptions, collect_rows, run_compare
from qe.commands.quantize import partial_dir, run_quantize
from qe.errors import ConfigError, DataError, ModelError, NumericalError, QEError
from qe.models.loading import load_model
from qe.recipe import Recipe

RECIPE = Recipe(quantizer="gptq", compensator="lowrank[rank=4]", setting="W4A8", samples=2)


class _Fault(Exception):
    """Stands for SIGKILL or a full disk: nothing after the fault point runs."""


@pytest.fixture(scope="module")
def tiny_dir():
    from qe.models import tiny

    return str(tiny.tiny_model_dir("llava"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("ref") / "ckpt"
    path, manifest = run_quantize(RECIPE, tiny_dir, out=out, progress=False)
    return path, manifest


# --------------------------------------------------------------------------- 1. a restartable finish


@pytest.mark.parametrize("phase", ["shards", "config", "records", "manifest", "cleanup", "rename", "swap"])
def test_fault_at_each_phase_of_the_finish_then_resume(tmp_path, monkeypatch, reference, tiny_dir, phase, same_checkpoint_tensors):
    ref_path, _ = reference
    out = tmp_path / "ckpt"
    if phase in ("rename", "swap"):  # these phases replace an existing --out (with --force)
        out.mkdir()
        (out / "old.txt").write_text("old")

    def fault(name):
        if name == phase:
            raise _Fault(name)

    monkeypatch.setattr(qmod, "_phase", fault)
    with pytest.raises(_Fault):
        run_quantize(RECIPE, tiny_dir, out=out, progress=False, force=True)
    monkeypatch.setattr(qmod, "_phase", lambda name: None)
    assert qmod.has_partial_run(out)
    (partial_dir(out) / "qe_manifest.tmp").write_text("{")  # a write the fault cut short
    path, manifest = run_quantize(RECIPE, tiny_dir, out=out, progress=False, resume=True, force=True)
    same_checkpoint_tensors(ref_path, path)
    assert not partial_dir(out).exists() and not (out / "old.txt").exists()
    assert not list(out.glob("block-*")) and not (out / "progress.json").exists()
    qe.load_quantized(out)  # every file hashed and present


_KILL = """
import os, signal, sys
import torch
torch.set_num_threads(1)  # as in this process (conftest), so the figures are bit-identical
from qe.commands import quantize as q
from qe.recipe import Recipe

def kill(name):
    if name == sys.argv[3]:
        os.kill(os.getpid(), signal.SIGKILL)

q._phase = kill
q.run_quantize(Recipe(quantizer="gptq", compensator="lowrank[rank=4]", setting="W4A8", samples=2), sys.argv[1],
               out=sys.argv[2], progress=False)
"""


@pytest.mark.parametrize("phase", ["records", "cleanup"])
def test_sigkill_during_the_finish_then_resume(tmp_path, reference, tiny_dir, phase, same_checkpoint_tensors):
    """A real SIGKILL (no exception handler runs, the lock dies with the process)."""
    out = tmp_path / "ckpt"
    r = subprocess.run([sys.executable, "-c", _KILL, tiny_dir, str(out), phase], capture_output=True, text=True,
                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert r.returncode == -9, r.stderr[-2000:]
    assert not out.exists() and qmod.has_partial_run(out)
    path, _ = run_quantize(RECIPE, tiny_dir, out=out, progress=False, resume=True)
    same_checkpoint_tensors(reference[0], path)


def test_a_lost_block_file_is_quantized_again(tmp_path, reference, tiny_dir, monkeypatch, caplog, same_checkpoint_tensors):
    monkeypatch.setattr(qmod, "_phase", lambda name: (_ for _ in ()).throw(_Fault(name)) if name == "shards" else None)
    out = tmp_path / "ckpt"
    with pytest.raises(_Fault):
        run_quantize(RECIPE, tiny_dir, out=out, progress=False)
    monkeypatch.setattr(qmod, "_phase", lambda name: None)
    (partial_dir(out) / "block-00001.safetensors").write_bytes(b"damaged")
    caplog.set_level("WARNING", logger="qe")
    run_quantize(RECIPE, tiny_dir, out=out, progress=False, resume=True)
    assert "saved block 1 is unreadable" in caplog.text and "from block 1 of 2" in caplog.text
    same_checkpoint_tensors(reference[0], out)


def test_disk_full_during_the_finish_is_one_line_and_resumable(tmp_path, monkeypatch, reference, tiny_dir, same_checkpoint_tensors):
    import errno

    from qe import checkpoint

    real = checkpoint.save_tensors

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_tensors", full)
    out = tmp_path / "ckpt"
    with pytest.raises(QEError, match="No space left.*--resume"):
        run_quantize(RECIPE, tiny_dir, out=out, progress=False)
    monkeypatch.setattr(checkpoint, "save_tensors", real)
    run_quantize(RECIPE, tiny_dir, out=out, progress=False, resume=True)
    same_checkpoint_tensors(reference[0], out)


def test_disk_full_between_blocks_is_one_line_and_resumable(tmp_path, monkeypatch, reference, tiny_dir, same_checkpoint_tensors):
    import errno

    from qe import checkpoint

    real, calls = checkpoint.save_safetensors, []

    def full_on_second(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, metadata)

    monkeypatch.setattr(checkpoint, "save_safetensors", full_on_second)
    out = tmp_path / "ckpt"
    with pytest.raises(QEError, match="No space left.*block-00001.*--resume"):
        run_quantize(RECIPE, tiny_dir, out=out, progress=False)
    monkeypatch.setattr(checkpoint, "save_safetensors", real)
    run_quantize(RECIPE, tiny_dir, out=out, progress=False, resume=True)
    same_checkpoint_tensors(reference[0], out)


# --------------------------------------------------------------------------- resume rules (#25)


class _Interrupt:
    @qe.hookimpl
    def qe_block_end(self, block_index, num_blocks, figures):
        if block_index == 0:
            raise KeyboardInterrupt


def _interrupted(tmp_path, tiny_dir, recipe=RECIPE, dtype="float32"):
    from qe.plugins import QEPluginManager

    out = tmp_path / "ckpt"
    manager = QEPluginManager(load_entry_points=False, extra_plugins=[_Interrupt()])
    with pytest.raises(KeyboardInterrupt):
        run_quantize(recipe, tiny_dir, out=out, progress=False, manager=manager, dtype=dtype)
    return out


def test_resume_with_another_dtype_is_refused_naming_it(tmp_path, tiny_dir):
    out = _interrupted(tmp_path, tiny_dir)
    with pytest.raises(ConfigError, match="dtype 'float32' -> 'bfloat16'"):
        run_quantize(RECIPE, "no/such-model-never-loaded", out=out, progress=False, resume=True, dtype="bfloat16")
    with pytest.raises(ConfigError, match="recipe setting 'W4A8' -> 'W4A6'"):
        run_quantize(RECIPE.replace(setting="W4A6"), tiny_dir, out=out, progress=False, resume=True)
    other = tmp_path / "other-model"
    shutil.copytree(tiny_dir, other)
    with pytest.raises(ConfigError, match="model '.*' -> '.*other-model'"):
        run_quantize(RECIPE, str(other), out=out, progress=False, resume=True)


def test_resume_with_other_data_is_refused(tmp_path, tiny_dir):
    out = _interrupted(tmp_path, tiny_dir)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a different calibration text"}\n' * 2)
    with pytest.raises(ConfigError, match="recipe calib"):
        run_quantize(RECIPE.replace(calib=str(data)), tiny_dir, out=out, progress=False, resume=True)


def test_a_partial_run_is_never_deleted_silently(tmp_path, tiny_dir, caplog):
    out = _interrupted(tmp_path, tiny_dir)
    with pytest.raises(QEError, match="a partial run .* exists.*--resume to continue, --force to start over"):
        run_quantize(RECIPE, tiny_dir, out=out, progress=False)
    assert qmod.has_partial_run(out)
    caplog.set_level("WARNING", logger="qe")
    run_quantize(RECIPE, tiny_dir, out=out, progress=False, resume=True)
    assert "resuming" in caplog.text and "from block 1 of 2" in caplog.text
    caplog.clear()
    run_quantize(RECIPE, tiny_dir, out=tmp_path / "fresh", progress=False, resume=True)
    assert "nothing to resume" in caplog.text


def test_ctrl_c_says_how_to_resume(tmp_path, monkeypatch, capsys, tiny_dir):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    from qe.pipeline import QuantizationPipeline

    real = QuantizationPipeline.run

    def run_then_interrupt(self, encoded, *, on_block_done=None, **k):
        def save_then_stop(i, res):
            on_block_done(i, res)
            raise KeyboardInterrupt

        return real(self, encoded, on_block_done=save_then_stop, **k)

    monkeypatch.setattr(QuantizationPipeline, "run", run_then_interrupt)
    out = tmp_path / "q"
    argv = ["quantize", "--model", tiny_dir, "--samples", "2", "--out", str(out), "--quiet"]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and f"resume with: qe quantize --model {tiny_dir}" in err and err.strip().endswith(
        "--resume")


# --------------------------------------------------------------------------- 2, 3. compare


OPTS = CompareOptions(samples=2, eval_tokens=512, caption_nll=False, progress=False)


def test_compare_rows_come_from_the_current_keys_only(tmp_path, tiny_dir):
    out = tmp_path / "g"
    _, first = run_compare(tiny_dir, "rtn", "none", "W4A8", out=out, options=OPTS)
    other = CompareOptions(samples=2, eval_tokens=1024, caption_nll=False, progress=False)
    _, second = run_compare(tiny_dir, "rtn", "none", "W4A8", out=out, options=other, force=True)
    # not the first run's 512-token figures
    assert all(r["eval_tokens"] > f["eval_tokens"] for r, f in zip(second, first)) and len(second) == 2
    csv = (out / "results.csv").read_text()
    assert str(first[0]["ppl"]) not in csv and str(second[0]["ppl"]) in csv
    # back to the first options: its cells are current again (reused, not recomputed)
    _, third = run_compare(tiny_dir, "rtn", "none", "W4A8", out=out, options=OPTS, force=True)
    assert [r["ppl"] for r in third] == [r["ppl"] for r in first]
    # the calibration file changes, then changes back
    data = tmp_path / "c.jsonl"
    data.write_text('{"text": "one calibration text about cats"}\n' * 2)
    o1 = CompareOptions(samples=2, eval_tokens=512, caption_nll=False, progress=False, calib=str(data))
    out2 = tmp_path / "g2"
    _, a = run_compare(tiny_dir, "rtn", "lowrank[rank=2]", "W4A8", out=out2, options=o1)
    data.write_text('{"text": "another calibration text, about dogs and ships"}\n' * 2)
    _, b = run_compare(tiny_dir, "rtn", "lowrank[rank=2]", "W4A8", out=out2, options=o1)
    assert b[1]["mean_rel_error"] != a[1]["mean_rel_error"]
    data.write_text('{"text": "one calibration text about cats"}\n' * 2)
    _, c = run_compare(tiny_dir, "rtn", "lowrank[rank=2]", "W4A8", out=out2, options=o1)
    assert c[1]["mean_rel_error"] == a[1]["mean_rel_error"]
    assert collect_rows(out2)[1]["mean_rel_error"] == a[1]["mean_rel_error"]
    assert len(collect_rows(out2, all_cells=True)) == 2  # the benchmarks' view: one row per label


class _FailOnce:
    failures = 0

    @qe.hookimpl
    def qe_layer_start(self, block_index, layer_name):
        if _FailOnce.failures < 2:
            _FailOnce.failures += 1
            raise RuntimeError(f"deliberate failure {_FailOnce.failures}")


def test_failed_cell_is_retried_and_keeps_its_errors(tmp_path, tiny_dir):
    from qe.plugins import QEPluginManager

    _FailOnce.failures = 0
    manager = QEPluginManager(load_entry_points=False, extra_plugins=[_FailOnce()])
    out = tmp_path / "g"
    _, rows = run_compare(tiny_dir, "rtn", "lowrank[rank=2]", "W4A8", out=out, options=OPTS, manager=manager)
    assert rows[1]["status"] == "error" and rows[1]["errors"] == [rows[1]["error"]]
    _, rows = run_compare(tiny_dir, "rtn", "lowrank[rank=2]", "W4A8", out=out, options=OPTS, manager=manager)
    assert rows[1]["status"] == "error" and len(rows[1]["errors"]) == 2
    _, rows = run_compare(tiny_dir, "rtn", "lowrank[rank=2]", "W4A8", out=out, options=OPTS, manager=manager)
    assert rows[1]["status"] == "ok" and len(rows[1]["previous_errors"]) == 2
    assert "deliberate failure 2" in rows[1]["previous_errors"][1]


def test_compare_and_eval_honour_dtype(tmp_path, tiny_dir, monkeypatch):
    import qe.commands.compare as compare
    import qe.commands.evaluate as evaluate

    seen = []

    def fake_load(model, **k):
        seen.append(k.get("dtype"))
        raise QEError("stop here")

    monkeypatch.setattr(compare, "load_model", fake_load)
    monkeypatch.setattr(evaluate, "load_model", fake_load)
    assert cli.main(["compare", "--model", tiny_dir, "--quantizers", "rtn", "--compensators", "none", "--settings",
                     "W4A8", "--dtype", "bfloat16", "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert cli.main(["eval", "--model", tiny_dir, "--dtype", "bfloat16", "--quiet"]) == 2
    assert seen == ["bfloat16", "bfloat16"]
    assert CompareOptions(dtype="bf16").describe()["dtype"] == "bfloat16"
    assert "dtype" not in CompareOptions().describe()  # float32 grids keep their keys


# --------------------------------------------------------------------------- 5, 6, 7. early checks, the lock


def _no_load(monkeypatch):
    import qe.commands.analyze as analyze
    import qe.commands.compare as compare

    def boom(*a, **k):
        raise AssertionError("the model must not load")

    for mod in (qmod, analyze, compare):
        monkeypatch.setattr(mod, "load_model", boom)


def test_outputs_and_data_are_checked_before_the_model_loads(tmp_path, monkeypatch, tiny_dir):
    from qe.commands.analyze import analyze

    _no_load(monkeypatch)
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(QEError, match="exists"):
        analyze(tiny_dir, out=existing, samples=2, progress=False)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(QEError, match="is a file"):
        run_quantize(RECIPE, tiny_dir, out=a_file, force=True, progress=False)
    with pytest.raises(QEError, match="is a file"):
        run_compare(tiny_dir, "rtn", "none", "W4A8", out=a_file, options=OPTS)
    with pytest.raises(QEError, match="is a file, so nothing"):
        run_quantize(RECIPE, tiny_dir, out=a_file / "sub", progress=False)
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root can write anywhere
            with pytest.raises(QEError, match="not writable"):
                run_quantize(RECIPE, tiny_dir, out=locked / "q", progress=False)
    finally:
        locked.chmod(0o700)
    from qe import paths

    monkeypatch.setattr(paths.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 1))
    with pytest.raises(QEError, match="free on its disk"):
        run_quantize(RECIPE, tiny_dir, out=tmp_path / "q", progress=False)
    monkeypatch.undo()
    _no_load(monkeypatch)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        run_quantize(RECIPE.replace(calib=str(bad)), tiny_dir, out=tmp_path / "q", progress=False)
    with pytest.raises(DataError, match="bad.jsonl:2"):
        run_compare(tiny_dir, "rtn", "none", "W4A8", out=tmp_path / "c",
                    options=CompareOptions(calib=str(bad), progress=False))
    with pytest.raises(ConfigError, match="unknown calibration source"):
        analyze(tiny_dir, calib="no-such-source", out=tmp_path / "a", progress=False)


def test_a_second_run_into_the_same_out_fails_at_once(tmp_path, tiny_dir):
    from qe.paths import output_lock

    out = tmp_path / "q"
    with output_lock(out):
        with pytest.raises(QEError, match="another qe run .* is writing"):
            run_quantize(RECIPE, tiny_dir, out=out, progress=False)
        with pytest.raises(QEError, match="another qe run"):
            run_compare(tiny_dir, "rtn", "none", "W4A8", out=out, options=OPTS)
        # from another process too (flock is per open file)
        code = ("import sys; from qe.paths import output_lock\n"
                "try:\n    output_lock(sys.argv[1]).__enter__()\nexcept Exception as e:\n    print(e); sys.exit(3)")
        r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True)
        assert r.returncode == 3 and f"(pid {os.getpid()})" in r.stdout
    with output_lock(out):  # released
        pass


# --------------------------------------------------------------------------- 8, 9, 10. a checkpoint stays inside itself


@pytest.fixture()
def ckpt(tmp_path, reference):
    copy = tmp_path / "copy"
    shutil.copytree(reference[0], copy)
    return copy


def _edit(path: Path, fn) -> None:
    m = json.loads((path / "qe_manifest.json").read_text())
    fn(m)
    (path / "qe_manifest.json").write_text(json.dumps(m))


def test_shard_names_are_confined(ckpt, tmp_path):
    outside = tmp_path / "secret.safetensors"
    save_file({"x": torch.zeros(3)}, str(outside))
    original = (ckpt / "qe_manifest.json").read_text()
    for name in [str(outside), "../secret.safetensors", "sub/x.safetensors", ".."]:
        (ckpt / "qe_manifest.json").write_text(original)

        def point(m, name=name):
            m["files"][name] = {"bytes": 1, "sha256": "0" * 64}
            m["shards"] = [name]

        _edit(ckpt, point)
        with pytest.raises(ModelError, match="not a plain file name") as e:
            qe.load_quantized(ckpt)
        assert "bytes" not in str(e.value)  # says nothing about the outside file
    (ckpt / "qe_manifest.json").write_text(original)
    (ckpt / "link.safetensors").symlink_to(outside)
    _edit(ckpt, lambda m: (m["files"].update({"link.safetensors": {"bytes": 1, "sha256": "0" * 64}}),
                           m.update(shards=["link.safetensors"])))
    with pytest.raises(ModelError, match="leads outside"):
        qe.load_quantized(ckpt)


def test_unlisted_shards_and_files_are_refused(ckpt):
    m = json.loads((ckpt / "qe_manifest.json").read_text())
    shard = m["shards"][0]
    shutil.copy(ckpt / shard, ckpt / "extra.safetensors")
    _edit(ckpt, lambda m: m.update(shards=[shard, "extra.safetensors"]))
    with pytest.raises(ModelError, match="does not hash .*extra.safetensors"):
        qe.load_quantized(ckpt)
    from qe import checkpoint

    m = json.loads((ckpt / "qe_manifest.json").read_text())
    with pytest.raises(ModelError, match="not among the manifest's hashed files"):
        checkpoint.load_tensors(torch.nn.Module(), ckpt, m["shards"], {}, files=m["files"])
    _edit(ckpt, lambda m: m.update(shards=[shard]))
    with pytest.raises(ModelError, match="does not hash .*extra.safetensors"):
        qe.load_quantized(ckpt)
    (ckpt / "extra.safetensors").unlink()
    (ckpt / "tokenizer_config.json").write_text(json.loads(json.dumps("{}")))  # altered, listed: hash mismatch
    with pytest.raises(ModelError, match="truncated or altered|SHA-256"):
        qe.load_quantized(ckpt)


def test_remote_code_is_refused_without_the_flag(ckpt, tmp_path, tiny_dir):
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_dir, model_dir)
    for d in (model_dir, ckpt):
        (d / "evil.py").write_text(code)
        cfg = json.loads((d / "config.json").read_text())
        cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForImageTextToText": "evil.EvilModel"}
        (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="auto_map.*--trust-remote-code"):
        load_model(str(model_dir))
    from qe import checkpoint

    # a checkpoint re-hashed by the attacker is still refused
    _edit(ckpt, lambda m: m.update(files={**m["files"], **checkpoint.file_records(ckpt, ["config.json", "evil.py"])}))
    with pytest.raises(ModelError, match="auto_map.*--trust-remote-code"):
        qe.load_quantized(ckpt)
    assert not marker.exists()
    assert cli.main(["info", "--model", str(model_dir), "--quiet"]) == 2


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(files=list(m["files"])), "\"files\" must be an object"),
    (lambda m: m.pop("layouts"), "\"layouts\" is missing"),
    (lambda m: m.update(shards="model.safetensors"), "\"shards\" must be a list"),
    (lambda m: next(iter(m["layouts"].values()))["linear"].update(bits=99), "bits 99"),
    (lambda m: next(iter(m["layouts"].values()))["linear"].update(in_features=-4), "size -4x"),
    (lambda m: next(iter(m["layouts"].values()))["linear"].update(out_features=10**12), "size"),
    (lambda m: next(iter(m["layouts"].values()))["compensator"]["layout"].update(rank=10**9), "rank 1000000000"),
    (lambda m: next(iter(m["layouts"].values()))["compensator"].update(module="nope"), "plugin .* not installed"),
    (lambda m: next(iter(m["layouts"].values()))["linear"].pop("group_size"), "missing"),
    (lambda m: m["layouts"].update({"../../etc": m["layouts"][next(iter(m["layouts"]))]}), "not a module name"),
    (lambda m: m["layouts"].update({"model.nothing_here": m["layouts"][next(iter(m["layouts"]))]}), "no such module"),
    (lambda m: m.update(tied={"a b": "c"}), "\"tied\""),
    (lambda m: m["files"].pop("config.json"), "does not hash .*config.json"),
    (lambda m: m["model"].update(name=None), "model.name"),
])
def test_malformed_manifests_are_one_line(ckpt, edit, match):
    _edit(ckpt, edit)
    with pytest.raises(ModelError, match=match) as e:
        qe.load_quantized(ckpt)
    assert "\n" not in str(e.value)


def test_missing_config_and_bad_json_are_one_line(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(ModelError, match="missing config.json"):
        qe.load_quantized(ckpt)
    (ckpt / "qe_manifest.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ModelError, match="not valid JSON"):
        qe.load_quantized(ckpt)


def test_layer_error_reference_is_verified(tmp_path, tiny_dir, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_dir, model_dir)
    path, _ = run_quantize(Recipe(samples=2), str(model_dir), out=tmp_path / "q", progress=False)
    from qe import checkpoint

    m = checkpoint.read_manifest(path)
    assert checkpoint.verified_reference(m, path) == str(model_dir.resolve())
    weights = next(model_dir.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-5] ^= 1
    weights.write_bytes(bytes(data))
    assert cli.main(["eval", "--model", str(path), "--metric", "layer-error", "--quiet", "--samples", "1"]) == 2
    assert "changed since quantization: pass --reference" in capsys.readouterr().err


# --------------------------------------------------------------------------- 11, 12, 13. numbers and inputs


def test_non_finite_plugin_parameters_are_refused():
    from qe.composition import resolve_composition

    for spec in ("gptq[damp=inf]", "gptq[damp=nan]", "gptq[damp=-inf]"):
        with pytest.raises(ConfigError, match="not a finite number"):
            resolve_composition(spec, "none", "W4A8")


def test_nan_in_any_written_tensor_is_refused(tmp_path, monkeypatch):
    """The data-free (RTN) path writes norms and every other tensor: NaN anywhere is refused."""
    loaded = load_model("tiny:llava")
    norm = loaded.adapter.decoder_blocks(loaded.model)[1].input_layernorm
    with torch.no_grad():
        norm.weight[0] = float("nan")
    with pytest.raises(NumericalError, match="input_layernorm.weight"):
        run_quantize(Recipe(samples=2), out=tmp_path / "q", loaded=loaded, progress=False)
    loaded = load_model("tiny:llava")
    with torch.no_grad():
        loaded.model.get_input_embeddings().weight[3, 0] = float("inf")
    with pytest.raises(NumericalError, match="NaN or Inf"):
        run_quantize(Recipe(samples=2), out=tmp_path / "q2", loaded=loaded, progress=False)


def test_gptq_never_writes_codes_from_nan():
    from qe.quantizers.gptq import gptq_quantize

    torch.manual_seed(0)
    w, x = torch.randn(8, 16), torch.randn(64, 16)
    with pytest.raises(NumericalError, match="GPTQ codes"):  # an infinite damping gives NaN columns
        gptq_quantize(w, x.T @ x, bits=4, group_size=0, symmetric=True, damp=float("inf"))


def test_shards_follow_the_umask(reference):
    path, manifest = reference
    mask = os.umask(0)
    os.umask(mask)
    for name in manifest["shards"]:
        assert (path / name).stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("argv, match", [
    (["info", "--device", "foo"], "is not a device"),
    (["info", "--device", "cuda:7"], "CUDA"),
    (["quantize", "--device", "cuda", "--out", "/tmp/x"], "CUDA"),
    (["info", "--model", "./no/such/dir"], "does not exist"),
    (["info", "--model", "/no/such/dir"], "does not exist"),
    (["info", "--dtype", "float8"], "unknown dtype"),
])
def test_one_line_errors_before_any_work(argv, match, capsys):
    if "cuda" in " ".join(argv) and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the device")
    assert cli.main(argv + ["--quiet"]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


def test_unwritable_cache_is_one_line(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    cache.write_text("a file where the cache folder should be (unwritable, even for root)")
    monkeypatch.setenv("QE_CACHE_DIR", str(cache))
    assert cli.main(["info", "--model", "tiny:qwen2-vl@77", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "set QE_CACHE_DIR to a writable directory" in err and err.count("\n") == 1


def test_unwritable_output_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    assert cli.main(["info", "--model", "tiny:llava", "--out", str(blocker / "info.json"), "--quiet"]) == 2
    assert "nothing can be written below it" in capsys.readouterr().err


def test_pickle_only_model_directory_is_refused(tmp_path, capsys, tiny_dir):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(Path(tiny_dir) / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"not read")
    assert cli.main(["info", "--model", str(d), "--quiet"]) == 2
    assert "pickle weights" in capsys.readouterr().err


def test_decompression_bomb_image_is_one_line(tmp_path):
    from PIL import Image

    from qe.data.sources import read_jsonl

    img = tmp_path / "bomb.png"
    Image.new("L", (1, 1)).save(img)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"image": str(img), "text": "a caption"}) + "\n")
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 0.6  # the 1-pixel image stands for a huge one
    try:
        with pytest.raises(DataError, match="decompression"):
            read_jsonl(data)
    finally:
        Image.MAX_IMAGE_PIXELS = old


def test_more_samples_than_the_source_has_says_how_many(caplog):
    from qe.data.samples import Sample
    from qe.data.sources import take_samples

    caplog.set_level("WARNING", logger="qe")
    got = take_samples([Sample(text="a"), Sample(text="b")], 5, "my.jsonl")
    assert len(got) == 2 and "--samples 5 asked, but my.jsonl has 2: using all 2" in caplog.text


def test_info_uses_the_device(capsys, tmp_path):
    from qe.commands.info import model_info

    assert model_info("tiny:llava", device="cpu")["device"] == "cpu"
