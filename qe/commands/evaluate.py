"""``qe eval``: one metric of one model (or quantized checkpoint), as JSON and a table."""

from __future__ import annotations

import json
from pathlib import Path

from qe.data.calibration import calibration_set, encode_samples
from qe.errors import ConfigError
from qe.models.loading import Placement, load_model
from qe.paths import atomic_write_text


def run_eval(model: str | None, *, metric: str = "ppl", text_file: str | None = None, window: int = 512,
             stride: int = 512, reference: str | None = None, samples: int | None = None, calib: str | None = None,
             eval_tokens: int | None = None, out: str | None = None, device: str = "cpu", progress: bool = True,
             dtype: str = "float32", trust_remote_code: bool = False, placement: Placement | None = None) -> dict:
    from qe.data.sources import check_source
    from qe.models.loading import check_model_name, parse_dtype
    from qe.paths import check_output

    if metric not in ("ppl", "caption-nll", "layer-error"):
        raise ConfigError(f"unknown metric {metric!r}: use ppl, caption-nll or layer-error")
    parse_dtype(dtype)
    if out:  # before the model loads
        check_output(out, kind="file", allow_existing=True)
    if text_file and not Path(text_file).is_file():
        raise ConfigError(f"--text-file {text_file} not found: give an existing UTF-8 text file")
    if calib:
        check_source(calib)
    if reference:
        check_model_name(reference)
    loaded = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code, placement=placement)
    result: dict = {"model": loaded.name, "metric": metric, "notes": loaded.notes}
    if metric == "ppl":
        from qe.evaluation.perplexity import perplexity, perplexity_of_text_file

        if text_file:
            r = perplexity_of_text_file(loaded, text_file, window, stride, progress=progress)
            result.update(source=str(text_file), window=window, stride=stride)
        else:
            r = perplexity(loaded, max_tokens=eval_tokens, progress=progress)
            result.update(source="built-in held-out text (last 40% of the pydoc topics, 512-token windows)"
                          + (f", first {eval_tokens} tokens" if eval_tokens else ""))
        result.update(r.to_dict())
        result["table"] = f"perplexity {r.ppl:.4f} over {r.tokens} tokens in {r.windows} windows ({r.seconds:.1f} s)"
    elif metric == "caption-nll":
        from qe.data.images import builtin_image_captions
        from qe.evaluation.metrics import caption_nll

        if calib:
            _, encoded = calibration_set(loaded, calib, samples, progress)
        else:
            encoded = encode_samples(loaded, builtin_image_captions("eval")[: samples or None])
        r = caption_nll(loaded.model, encoded)
        result.update(r.to_dict())
        result["table"] = f"caption NLL {r.nll:.4f} nats/token over {r.tokens} answer tokens of {r.samples} samples"
    else:
        from qe.checkpoint import verified_reference
        from qe.evaluation.metrics import layer_errors

        if reference is None and loaded.manifest is None:
            raise ConfigError("layer-error needs --reference (the full-precision model) for a model that is not a qe checkpoint")
        # The checkpoint's recorded reference is used only after its files match the recorded hashes.
        ref_name = reference or verified_reference(loaded.manifest, loaded.path)
        ref = load_model(ref_name, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                         placement=placement)
        _, encoded = calibration_set(loaded, calib or "images", samples or 8, progress, split="eval")
        rows = layer_errors(ref, loaded, encoded)
        result["layers"] = rows
        lines = [f"{'layer':<48}{'error':>10}{'text':>10}{'vision':>10}{'answer':>10}"]
        for r in rows:
            f = [r["rel_error"]] + [r.get(f"rel_error_{m}") for m in ("text", "vision", "answer")]
            lines.append(f"{r['layer'][-48:]:<48}" + "".join(f"{v:>10.4f}" if v is not None else f"{'–':>10}" for v in f))
        result["table"] = "\n".join(lines)
    if out:
        atomic_write_text(Path(out), json.dumps({k: v for k, v in result.items() if k != "table"}, indent=1))
    return result
