"""The public API behind the CLI: each function is one command, usable from Python."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qe.data.images import default_prompt
from qe.data.samples import Sample
from qe.data.sources import resolve_source, take_samples
from qe.errors import DataError
from qe.models.base import MODALITIES, EncodedSample
from qe.models.loading import LoadedModel, load_model
from qe.paths import atomic_directory

REPORTS_DIR = Path("reports")


def encode_samples(loaded: LoadedModel, samples: list[Sample], progress: bool = False) -> list[EncodedSample]:
    out = []
    for s in tqdm(samples, desc="tokenize", disable=not progress, leave=False):
        out.append(loaded.adapter.encode(loaded.processor, s, default_prompt(), loaded.model))
    if not out or sum(e.num_tokens for e in out) == 0:
        raise DataError("the calibration set gives no tokens: check the data")
    return out


def calibration_set(loaded: LoadedModel, calib: str | None, samples: int | None, progress: bool = False,
                    split: str = "calib") -> tuple[str, list[EncodedSample]]:
    source = resolve_source(calib)
    chosen = take_samples(source.samples(loaded.tokenizer, split), samples, source.describe())
    return source.describe(), encode_samples(loaded, chosen, progress)


def data_hash(encoded: list[EncodedSample]) -> str:
    """A hash of the tokenized calibration data (ids, modality, pixels)."""
    h = hashlib.sha256()
    for e in encoded:
        for key in sorted(e.inputs):
            v = e.inputs[key]
            if isinstance(v, torch.Tensor):
                h.update(key.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
        h.update(e.modality.numpy().tobytes())
    return h.hexdigest()[:16]


def token_counts(encoded: list[EncodedSample]) -> dict[str, int]:
    counts = {m: 0 for m in MODALITIES}
    for e in encoded:
        for m, n in e.modality_counts().items():
            counts[m] += n
    return counts


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
) -> tuple[Path, dict]:
    """Run ``qe analyze``; return the report directory and the summary."""
    from qe.analysis.analyze import AnalyzeOptions, run_analysis
    from qe.analysis.report import write_report
    from qe.plugins import default_manager

    manager = default_manager()
    manager.resolve("estimator", estimator)  # fail on a bad name before loading anything
    options = AnalyzeOptions(estimator=estimator, k=k, num_experts=num_experts, layers=layers, plot_blocks=plot_blocks,
                             seed=seed, device=device, progress=progress)
    loaded = loaded or load_model(model, dtype=dtype, device=device)
    from qe.analysis.analyze import check_widths, select_layers

    check_widths(loaded, select_layers(loaded, layers), k, num_experts)
    source, encoded = calibration_set(loaded, calib, samples, progress)
    manager.hook.qe_run_start(command="analyze", info={"model": loaded.name, "samples": len(encoded)})
    result = run_analysis(loaded, encoded, options, manager)
    out_dir = Path(out) if out else default_report_dir(loaded.name)
    result.run = {
        "model": loaded.name, "model_path": loaded.path, "adapter": loaded.adapter.name,
        "synthetic_vision_tower": loaded.synthetic_vision, "notes": loaded.notes,
        "estimator": estimator, "k": k, "num_experts": num_experts, "seed": seed, "layers_pattern": layers,
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
