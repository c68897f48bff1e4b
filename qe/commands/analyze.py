"""``qe analyze``: which input channels matter for which tokens and modalities, per layer."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import re
import time
from pathlib import Path

from qe.data.calibration import calibration_set, data_hash, token_counts
from qe.models.loading import LoadedModel, Placement, load_model
from qe.paths import atomic_directory, check_output, output_lock

REPORTS_DIR = Path("reports")


def default_report_dir(model_name: str, command: str = "") -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name)
    return REPORTS_DIR / (f"{safe}-{command}-{stamp}" if command else f"{safe}-{stamp}")


def analyze(
    model: str | None = None,
    *,
    calib: str | None = None,
    samples: int | None = 32,
    out: str | Path | None = None,
    estimator: str = "act-weight",
    k: int = 32,
    num_experts: int = 8,
    layers: str | None = None,
    plot_blocks: tuple[int, ...] | None = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    progress: bool = True,
    force: bool = False,
    loaded: LoadedModel | None = None,
    trust_remote_code: bool = False,
    placement: Placement | None = None,
    scope: str = "language",
    setting: str = "W4A8",
) -> tuple[Path, dict]:
    """Run ``qe analyze``; return the report directory and the summary. ``scope``: the
    language model's blocks, the vision tower's and the projector (``vision``), or both;
    ``setting``: the quantization whose compensation gains the advice predicts."""
    from qe.analysis.analyze import AnalyzeOptions
    from qe.data.sources import check_source
    from qe.models.stacks import check_scope
    from qe.plugins import default_manager
    from qe.settings import parse_setting

    check_scope(scope)
    manager = default_manager()
    manager.resolve("estimator", estimator)  # fail on a bad name before loading anything
    setting = parse_setting(setting).name  # a bad setting fails before loading anything
    options = AnalyzeOptions(estimator=estimator, k=k, num_experts=num_experts, layers=layers, plot_blocks=plot_blocks,
                             seed=seed, device=device, progress=progress, setting=setting)
    check_source(calib)  # a bad --calib or JSONL record fails before the model loads
    if out:  # checked now, not after the analysis
        check_output(out, kind="dir", force=force)
    with contextlib.ExitStack() as stack:
        if out:
            stack.enter_context(output_lock(out))
        return _analyze(model, loaded, calib, samples, out, estimator, k, num_experts, layers, seed, device, dtype,
                        progress, force, trust_remote_code, options, manager, placement, scope)


def _analyze(model, loaded, calib, samples, out, estimator, k, num_experts, layers, seed, device, dtype, progress,
             force, trust_remote_code, options, manager, placement=None, scope="language") -> tuple[Path, dict]:
    from qe.analysis.analyze import check_widths, run_scoped_analysis, scoped_views, select_layers
    from qe.analysis.report import write_report

    loaded = loaded or load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                  placement=placement)
    num_blocks = 0
    for view in scoped_views(loaded, scope, layers):  # every width checked before the calibration set is built
        selected = select_layers(view, layers)
        check_widths(view, selected, k, num_experts)
        num_blocks += max(selected) + 1
    source, encoded = calibration_set(loaded, calib, samples, progress)
    manager.hook.qe_run_start(command="analyze", info={"model": loaded.name, "samples": len(encoded),
                                                      "blocks": num_blocks, "progress": progress})
    out_dir = Path(out) if out else default_report_dir(loaded.name)
    check_output(out_dir, kind="dir", force=force)
    result = run_scoped_analysis(loaded, encoded, scope, options, manager)
    result.run = {
        "model": loaded.name, "model_path": loaded.path, "adapter": loaded.adapter.name,
        "synthetic_vision_tower": loaded.synthetic_vision, "notes": loaded.notes,
        "estimator": estimator, "k": k, "num_experts": num_experts, "seed": seed, "layers_pattern": layers, "scope": scope,
        "setting": options.setting,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "calibration": {"source": source, "samples": len(encoded), "tokens": token_counts(encoded),
                        "data_hash": data_hash(encoded)},
        "seconds": {"statistics": round(result.statistics_seconds, 2)},
    }
    t0 = time.perf_counter()
    with atomic_directory(out_dir, force=force) as tmp:
        summary = write_report(tmp, result, k)
        summary["run"]["seconds"]["report"] = round(time.perf_counter() - t0, 2)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
    manager.hook.qe_run_end(command="analyze", output=str(out_dir), figures=summary["run"]["seconds"])
    return out_dir, summary
