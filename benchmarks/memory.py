"""Quantizing models larger than memory: peak RSS and wall time, in memory and with disk offload.

Models: the SmolLM2 family's real configurations (135M, 360M, 1.7B) with **random weights**
(seeded; no real weights of the larger sizes can be installed offline), the embedded default's
tokenizer, written once under ``$QE_CACHE_DIR/bench-smollm2-<size>-random``. Each run is a fresh
process (so its peak RSS is its own) that quantizes with GPTQ + QE at W4A8 from a few pydoc
calibration windows, without the before/after check:

* ``memory``: the model loaded in memory, as by default;
* ``offload``: ``--max-memory cpu=<limit> --offload-folder <dir>``: accelerate places what does
  not fit on disk and qe onloads one decoder block at a time, writing each as it finishes.

Peak memory is given twice. ``peak_rss_GB`` is the kernel's peak resident set size, which
counts the pages of memory-mapped files the process read (the model's safetensors while it
loads, offloaded weights): the kernel drops those under memory pressure, so they do not
decide whether a model fits. ``peak_anon_GB`` is the peak of the anonymous memory alone (the
process's own allocations), sampled every 50 ms from ``/proc/self/status``: what must fit.
``peak_anon_where`` says where it is reached: in one linear's quantization and fit (named by
its module path within the block, e.g. ``mlp.down_proj``), in loading and capture, in a
block's statistics (its full-precision forward), between a block's linears, between blocks
(the quantized forward, the write) or at the end; ``anon_GB_by_window`` in the JSON gives
every window's peak. A window's peak is the memory held at its highest moment, including
what earlier windows left allocated.

Wall time depends on whatever else the machine runs; the process's CPU time (user + system)
is recorded beside it, and the offload/in-memory ratio is given for both. Both modes of one
size must give the same checkpoint tensors (``qe.checkpoint.tensors_digest``: a SHA-256 over
every tensor by key, whatever the shards).
Resumable: rows already in the JSON are kept; ``--sizes``/``--modes`` run subsets.

``--blocks N`` measures a part of a run too long for the machine at hand: loading, capture and
the first ``N`` decoder blocks, then the process stops (no checkpoint is written, so there is
no tensor digest). Its row says how many blocks it covers; ``*_per_block`` is the run's time
divided by its blocks, loading and capture included (so a partial row's overstates a block);
its peak RSS covers that part only (what follows repeats the same per-block work, and
the offloaded checkpoint is written one shard at a time). A full run replaces a partial row.

    python benchmarks/memory.py --sizes 135M,360M
    python benchmarks/memory.py --sizes 1.7B --modes offload
    python benchmarks/memory.py --sizes 1.7B --modes offload --blocks 2

Writes benchmarks/results/memory.json and .csv and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, peak_rss_gb, print_table

# The published SmolLM2 configurations (hidden size, MLP width, blocks, heads, KV heads).
SIZES = {
    "135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, rope_theta=100000.0),
    "360M": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5, rope_theta=100000.0),
    "1.7B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32, rope_theta=130000.0),
}
MODES = ("memory", "offload")
COMPENSATOR = "qe[k=16;num_experts=4;shared_rank=16;expert_rank=8]"
OFFLOAD_MAX_MEMORY = "cpu=64MB"  # below one decoder block of every size: everything goes to disk
RESULTS = Path(__file__).resolve().parent / "results" / "memory"


def model_dir(size: str) -> Path:
    """Write (once) a random-weight SmolLM2-``size`` checkpoint with the default model's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qe.models import default_model
    from qe.paths import cache_dir

    out = cache_dir() / f"bench-smollm2-{size}-random"
    if (out / "config.json").is_file():
        return out
    default = default_model.ensure_default_model()
    config = LlamaConfig(vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, **SIZES[size])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp / name).write_bytes((Path(default) / name).read_bytes())
    (tmp / "qe_model_card.json").write_text(json.dumps(
        {"note": f"SmolLM2-{size} configuration with RANDOM weights (benchmarks/memory.py): figures mean nothing"}))
    tmp.rename(out)
    return out


class AnonymousPeak:
    """The peak of ``RssAnon`` in ``/proc/self/status``, sampled by a daemon thread."""

    def __init__(self, every: float = 0.05):
        import threading

        self.peak_kib = 0
        self.window_kib = 0  # the peak since the last ``window()``
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("RssAnon:"):
                        now = int(line.split()[1])
                        self.peak_kib = max(self.peak_kib, now)
                        self.window_kib = max(self.window_kib, now)
                        break
            self._stop.wait(every)

    def window(self) -> float:
        """The peak since the previous call, in GB; starts the next window."""
        peak, self.window_kib = self.window_kib, 0
        return peak / 2**20

    def stop(self) -> float:
        """The peak so far, in GB (2^30 bytes, like ``peak_rss_gb``)."""
        self._stop.set()
        self._thread.join()
        return self.peak_kib / 2**20


class _EnoughBlocks(Exception):
    """Raised after the blocks a partial run (``--blocks``) measures."""


def run_one(size: str, mode: str, samples: int, out_json: Path, blocks: int | None = None) -> None:
    """One quantization in this process; writes its row (peak RSS is this process's own)."""
    import qe
    from qe.checkpoint import tensors_digest
    from qe.commands.quantize import run_quantize
    from qe.models.loading import Placement, parse_max_memory
    from qe.plugins import QEPluginManager
    from qe.recipe import Recipe

    anon = AnonymousPeak()
    # Where the peak is reached, window by window: loading and capture; each block's statistics
    # (its full-precision forward, after the previous block's write); each linear's quantization
    # and fit; what runs between a block's linears; the end (the last write).
    windows: dict[str, float] = {}
    first_of_block: set[int] = set()

    def close_window(name: str) -> None:
        windows[name] = max(windows.get(name, 0.0), anon.window())

    class Profile:
        @qe.hookimpl
        def qe_block_start(self, block_index, num_blocks):
            close_window("loading and capture" if block_index == 0 else "between blocks")

        @qe.hookimpl
        def qe_layer_start(self, block_index, layer_name):
            if block_index in first_of_block:
                close_window("between linears")
            else:
                first_of_block.add(block_index)
                close_window("block statistics")

        @qe.hookimpl
        def qe_layer_end(self, block_index, layer_name, figures):
            close_window(layer_name.rsplit(".", 2)[-2] + "." + layer_name.rsplit(".", 1)[-1])

        @qe.hookimpl
        def qe_block_end(self, block_index, num_blocks, figures):
            if blocks is not None and block_index + 1 >= blocks:
                raise _EnoughBlocks

    path = model_dir(size)
    total = SIZES[size]["num_hidden_layers"]
    with tempfile.TemporaryDirectory() as tmp:
        placement = Placement(offload_folder=str(Path(tmp) / "offload"),
                              max_memory=parse_max_memory(OFFLOAD_MAX_MEMORY)) if mode == "offload" else None
        recipe = Recipe(quantizer="gptq", compensator=COMPENSATOR, setting="W4A8", calib="pydoc", samples=samples)
        t0 = time.perf_counter()
        manifest = ckpt = None
        try:
            ckpt, manifest = run_quantize(recipe, str(path), out=Path(tmp) / "ckpt", progress=False,
                                          check_heldout=False, placement=placement,
                                          manager=QEPluginManager(extra_plugins=[Profile()]))
        except _EnoughBlocks:
            pass
        wall = time.perf_counter() - t0
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = usage.ru_utime + usage.ru_stime
        peak = peak_rss_gb()
        close_window("end")
        peak_anon = anon.stop()
        digest = tensors_digest(ckpt)[:16] if ckpt is not None else None  # after the measurement
        done = total if manifest is not None else blocks
        model_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        row = {"size": size, "mode": mode, "samples": samples, "blocks": f"{done} of {total}",
               "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "minor_faults": usage.ru_minflt,
               "wall_s_per_block": round(wall / done, 1), "cpu_s_per_block": round(cpu / done, 1),
               "peak_rss_GB": round(peak, 3), "peak_anon_GB": round(peak_anon, 3),
               "model_GB": round(model_bytes / 1e9, 3),
               "checkpoint_GB": round(manifest["size"]["checkpoint_bytes"] / 1e9, 3) if manifest else None,
               "tensors_sha256": digest, "load_avg": round(os.getloadavg()[0], 2),
               "peak_anon_where": max(windows, key=windows.__getitem__),
               "anon_GB_by_window": {k: round(v, 3) for k, v in sorted(windows.items(), key=lambda kv: -kv[1])}}
    out_json.write_text(json.dumps(row))


def _complete(row: dict) -> bool:
    blocks = row.get("blocks")
    return blocks is None or blocks.split(" of ")[0] == blocks.split(" of ")[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="135M,360M,1.7B")
    ap.add_argument("--modes", default="memory,offload")
    ap.add_argument("--samples", type=int, default=2, help="pydoc calibration windows of 512 tokens")
    ap.add_argument("--redo", action="store_true", help="rerun cells already in the results")
    ap.add_argument("--blocks", type=int, default=None,
                    help="measure loading, capture and the first N blocks only (a partial row)")
    ap.add_argument("--one", nargs=2, metavar=("SIZE", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--row", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        run_one(*args.one, args.samples, Path(args.row), args.blocks)
        return
    for size in args.sizes.split(","):
        total = SIZES.get(size, {}).get("num_hidden_layers")
        if args.blocks is not None and total is not None and not 1 <= args.blocks < total:
            sys.exit(f"--blocks {args.blocks}: a partial run of {size} covers 1 to {total - 1} of its {total} blocks; "
                     "leave --blocks out for the whole run")
    results = RESULTS.with_suffix(".json")
    rows = _read(results)
    for size in args.sizes.split(","):
        for mode in args.modes.split(","):
            if size not in SIZES or mode not in MODES:
                sys.exit(f"unknown size {size!r} or mode {mode!r}: sizes {', '.join(SIZES)}; modes {', '.join(MODES)}")
            have = rows.get((size, mode))
            if have is not None and not args.redo and (_complete(have) or args.blocks is not None):
                continue
            model_dir(size)  # written outside the measured process
            with tempfile.NamedTemporaryFile(suffix=".json") as row_file:
                partial = ["--blocks", str(args.blocks)] if args.blocks is not None else []
                subprocess.run([sys.executable, __file__, "--one", size, mode, "--samples", str(args.samples),
                                "--row", row_file.name, *partial], check=True)
                row = json.loads(Path(row_file.name).read_text())
            print(f"{size} {mode}: {row}", file=sys.stderr)
            rows = _read(results)  # rows another run of this script wrote meanwhile are kept
            rows[(size, mode)] = row
            _write(results, rows)
    _write(results, _read(results))


def _read(results: Path) -> dict:
    data = json.loads(results.read_text()) if results.is_file() else {"rows": []}
    return {(r["size"], r["mode"]): r for r in data["rows"]}


def _write(results: Path, rows: dict) -> None:
    ordered = [rows[k] for k in sorted(rows, key=lambda k: (list(SIZES).index(k[0]), MODES.index(k[1])))]
    for r in ordered:  # the ratios the issue asks for, measured between rows of this file
        mem = rows.get((r["size"], "memory"))
        mem = mem if mem and _complete(mem) and _complete(r) else None  # ratios between whole runs only
        r["offload_vs_memory_wall"] = round(r["wall_s"] / mem["wall_s"], 3) if mem and r["mode"] == "offload" else None
        r["offload_vs_memory_cpu"] = round(r["cpu_s"] / mem["cpu_s"], 3) if mem and r["mode"] == "offload" else None
        both = mem and r["mode"] == "offload" and r.get("tensors_sha256") and mem.get("tensors_sha256")
        r["same_tensors_as_memory"] = (r["tensors_sha256"] == mem["tensors_sha256"]) if both else None
        first = rows.get(("135M", r["mode"]))
        r["rss_vs_135M"] = round(r["peak_rss_GB"] / first["peak_rss_GB"], 3) if first else None
        have_anon = first and first.get("peak_anon_GB") and r.get("peak_anon_GB")
        r["anon_vs_135M"] = round(r["peak_anon_GB"] / first["peak_anon_GB"], 3) if have_anon else None
    columns = ["size", "mode", "samples", "blocks", "wall_s", "cpu_s", "wall_s_per_block", "cpu_s_per_block",
               "peak_rss_GB", "peak_anon_GB", "peak_anon_where", "model_GB", "checkpoint_GB", "rss_vs_135M", "anon_vs_135M",
               "offload_vs_memory_wall", "offload_vs_memory_cpu", "same_tensors_as_memory", "load_avg"]
    print_table(ordered, columns)
    results.parent.mkdir(parents=True, exist_ok=True)
    pending = results.with_suffix(".json.tmp")  # renamed into place: another run never reads half a file
    pending.write_text(json.dumps({"compensator": COMPENSATOR, "offload_max_memory": OFFLOAD_MAX_MEMORY,
                                   "machine": machine(), "rows": ordered}, indent=1))
    os.replace(pending, results)
    with results.with_suffix(".csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns + ["tensors_sha256"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(ordered)


if __name__ == "__main__":
    main()
