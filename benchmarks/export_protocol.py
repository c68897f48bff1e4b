"""Exported models score what qe's models score, on the full text protocol (issue #19's table).

On the embedded default (real SmolLM2-135M LM), calibrated on the protocol's 64 pydoc windows
of 512 tokens, scored on the whole held-out text (88 windows, 44,968 predicted tokens):

* ``gptq@W4A16g64`` exported as compressed-tensors, loaded by transformers (decompressed on
  CPU) against ``qe.load_quantized`` of the same checkpoint;
* ``gptq+lowrank-64@W4A16g64`` exported as base + PEFT LoRA, loaded with ``peft``, against qe's
  lowrank model;
* ``gptq+qe@W4A16g64`` (no smoothing: grouped-query attention keeps o_proj's scales from
  folding) exported as base + PEFT LoRA (the shared expert plus the exempt columns' exact
  correction), against qe's model with its routed experts dropped (what the adapter keeps),
  with qe's full model's perplexity beside it.

Each cell is one row of the JSON, kept across runs (``--cells`` runs a subset; ``--redo``).

    python benchmarks/export_protocol.py
    python benchmarks/export_protocol.py --cells gptq@W4A16g64

Writes benchmarks/results/export-protocol.json and .csv and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table

# g64, not g128: compressed-tensors needs the group size to divide every input width, and
# SmolLM2's 576-wide inputs hold 4.5 groups of 128 (qe export refuses such a checkpoint).
CELLS = {  # label: (compensator, export format)
    "gptq@W4A16g64": ("none", "compressed-tensors"),
    "gptq+lowrank-64@W4A16g64": ("lowrank[rank=64]", "peft-lora"),
    "gptq+qe@W4A16g64": ("qe[k=32;num_experts=8;alphas=none]", "peft-lora"),
}
SETTING = "W4A16g64"
RESULTS = Path(__file__).resolve().parent / "results" / "export-protocol"


def _exported_model(directory: Path, fmt: str):
    """The export as a serving stack loads it: transformers (+ peft for the adapter)."""
    from transformers import AutoModelForImageTextToText, CompressedTensorsConfig

    base = AutoModelForImageTextToText.from_pretrained(
        directory, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    if fmt != "peft-lora":
        return base
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(directory / "lora")).eval()


def run_cell(label: str, samples: int, progress: bool) -> dict:
    from qe.checkpoint import quantized_layers
    from qe.commands.quantize import run_quantize
    from qe.evaluation.perplexity import heldout_windows, perplexity
    from qe.export.core import export_checkpoint, keep_only_lowrank_terms
    from qe.export.plan import lowrank_term
    from qe.models.loading import load_quantized
    from qe.recipe import Recipe

    compensator, fmt = CELLS[label]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ckpt, _ = run_quantize(Recipe(quantizer="gptq", compensator=compensator, setting=SETTING, calib="pydoc",
                                      samples=samples), out=Path(tmp) / "ckpt", progress=progress,
                               check_heldout=False)
        quantize_s = time.perf_counter() - t0
        loaded = load_quantized(ckpt)
        windows = heldout_windows(loaded.tokenizer)
        row: dict = {"cell": label, "format": fmt, "samples": samples, "quantize_s": round(quantize_s, 1)}
        qe_ppl = perplexity(loaded.model, windows, progress=progress)
        row["qe_ppl"] = qe_ppl.ppl
        row["tokens"] = qe_ppl.tokens
        terms = {name: lowrank_term(name, ql, loaded.manifest) for name, ql in quantized_layers(loaded.model).items()}
        if any(t is not None and t.dropped.get("num_experts") for t in terms.values()):
            # What the adapter keeps: each layer's exported low-rank term, routing dropped.
            row["qe_ppl_with_routed_experts"] = row["qe_ppl"]
            keep_only_lowrank_terms(loaded.model, terms)
            row["qe_ppl"] = perplexity(loaded.model, windows, progress=progress).ppl
        t0 = time.perf_counter()
        out, _ = export_checkpoint(ckpt, fmt, Path(tmp) / "export", evaluate=False)
        row["export_s"] = round(time.perf_counter() - t0, 1)
        exported = _exported_model(out, fmt)
        row["exported_ppl"] = perplexity(exported, windows, progress=progress).ppl
    row["equal_to_printed_digits"] = f"{row['qe_ppl']:.3f}" == f"{row['exported_ppl']:.3f}"
    row["relative_difference"] = abs(row["exported_ppl"] / row["qe_ppl"] - 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default=",".join(CELLS))
    ap.add_argument("--samples", type=int, default=64, help="pydoc calibration windows (protocol: 64)")
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    results = RESULTS.with_suffix(".json")
    data = json.loads(results.read_text()) if results.is_file() else {"rows": []}
    rows = {r["cell"]: r for r in data["rows"]}
    _write(results, rows)  # the table's todo rows exist before the first (long) cell ends
    for label in args.cells.split(","):
        if label not in CELLS:
            sys.exit(f"unknown cell {label!r}: choose from {', '.join(CELLS)}")
        if label in rows and not args.redo:
            continue
        rows[label] = {**run_cell(label, args.samples, not args.quiet), "machine": machine()}
        _write(results, rows)
    _write(results, rows)


def _write(results: Path, rows: dict) -> None:
    ordered = [rows[c] for c in CELLS if c in rows]
    columns = ["cell", "format", "samples", "quantize_s", "export_s", "qe_ppl", "exported_ppl",
               "equal_to_printed_digits", "relative_difference", "qe_ppl_with_routed_experts", "tokens"]
    print_table(ordered + [{"cell": c, "format": "todo"} for c in CELLS if c not in rows], columns)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"setting": SETTING, "rows": ordered}, indent=1))
    with results.with_suffix(".csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(ordered)


if __name__ == "__main__":
    main()
