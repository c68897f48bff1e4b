"""``qe info``: a model's decoder structure as qe reads it."""

from __future__ import annotations

import time

from qe.data.images import default_prompt
from qe.data.sources import resolve_source, take_samples
from qe.models.loading import load_model


def model_info(model_name: str | None = None, *, calib: str | None = None, dtype: str = "float32", device: str = "cpu",
               trust_remote_code: bool = False) -> dict:
    from qe.data.sources import check_source

    check_source(calib)  # a bad --calib fails before the model loads
    t0 = time.perf_counter()
    loaded = load_model(model_name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    load_seconds = time.perf_counter() - t0
    adapter, model = loaded.adapter, loaded.model
    blocks = adapter.decoder_blocks(model)
    prefix = adapter.blocks_prefix(model)
    block_rows = []
    for i, block in enumerate(blocks):
        linears = adapter.block_linears(block)
        block_rows.append({
            "index": i,
            "type": type(block).__name__,
            "linears": {n: [m.in_features, m.out_features] for n, m in linears.items()},
            "smoothing_groups": [{"linears": g.linears, "norm": g.norm} for g in adapter.smoothing_groups(block)],
        })
    vision = []
    if adapter.vision_blocks_paths:  # what --scope vision would quantize
        from qe.errors import ConfigError
        from qe.models.stacks import VisionStackAdapter, scope_adapters

        try:
            stacks = [a for a in scope_adapters(adapter, model, "vision") if isinstance(a, VisionStackAdapter)]
        except ConfigError:
            stacks = []
        for a in stacks:
            stack_blocks = a.decoder_blocks(model)
            linears = [m for b in stack_blocks for m in a.block_linears(b).values()]
            vision.append({"stack": a.stack, "path": a.path, "num_blocks": len(stack_blocks), "linears": len(linears),
                           "linear_parameters": sum(m.in_features * m.out_features for m in linears)})
    source = resolve_source(calib)
    sample = take_samples(source.samples(loaded.tokenizer, "calib"), 1, source.describe())[0]
    encoded = adapter.encode(loaded.processor, sample, default_prompt(), model)
    return {
        "device": str(next(model.parameters()).device),
        "model": loaded.name,
        "path": loaded.path,
        "class": type(model).__name__,
        "adapter": adapter.name,
        "blocks_path": prefix,
        "num_blocks": len(blocks),
        "blocks": block_rows,
        "parameters": sum(p.numel() for p in model.parameters()),
        "decoder_linear_parameters": sum(m.in_features * m.out_features for b in blocks for m in adapter.block_linears(b).values()),
        "vision_stacks": vision,
        "calibration_sample": {"source": source.describe(), "origin": sample.origin, "tokens": encoded.num_tokens,
                               "modality_tokens": encoded.modality_counts()},
        "notes": loaded.notes,
        "load_seconds": round(load_seconds, 2),
    }


def _runs(rows: list[dict]) -> list[tuple[int, int, dict]]:
    """Group consecutive blocks with identical structure."""
    runs: list[tuple[int, int, dict]] = []
    for r in rows:
        key = {"type": r["type"], "linears": r["linears"], "smoothing_groups": r["smoothing_groups"]}
        if runs and runs[-1][2] == key:
            runs[-1] = (runs[-1][0], r["index"], key)
        else:
            runs.append((r["index"], r["index"], key))
    return runs


def render_info(info: dict) -> str:
    lines = [
        f"model     {info['model']}  ({info['class']}, {info['parameters'] / 1e6:.1f} M parameters)",
        f"adapter   {info['adapter']}",
        f"blocks    {info['num_blocks']} at {info['blocks_path']}  "
        f"({info['decoder_linear_parameters'] / 1e6:.1f} M parameters in decoder linears)",
    ]
    for v in info.get("vision_stacks", []):
        where = f"{v['num_blocks']} blocks at {v['path']}" if v["stack"] == "vision" else v["path"]
        lines.append(f"{v['stack']:<10}{where}  ({v['linears']} linears, "
                     f"{v['linear_parameters'] / 1e6:.2f} M parameters; quantized with --scope vision or all)")
    for first, last, key in _runs(info["blocks"]):
        span = f"block {first}" if first == last else f"blocks {first}-{last}"
        lines.append(f"\n{span} ({key['type']})")
        width = max(22, *(len(n) + 2 for n in key["linears"]))
        lines.append(f"  {'linear':<{width}}{'d_in':>7}{'d_out':>7}  smoothing group (norm)")
        group_of = {}
        for g in key["smoothing_groups"]:
            for n in g["linears"]:
                group_of[n] = f"{'+'.join(x.split('.')[-1] for x in g['linears'])} ({g['norm'] or 'explicit scale'})"
        for name, (d_in, d_out) in key["linears"].items():
            lines.append(f"  {name:<{width}}{d_in:>7}{d_out:>7}  {group_of.get(name, '-')}")
    cs = info["calibration_sample"]
    counts = ", ".join(f"{k} {v}" for k, v in cs["modality_tokens"].items())
    lines.append(f"\ncalibration sample {cs['origin']} from {cs['source']}: {cs['tokens']} tokens ({counts})")
    for note in info["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)
