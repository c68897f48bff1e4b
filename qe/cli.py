"""The ``qe`` command line. Every command shares the options of DESIGN.md's conventions."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from qe.errors import QEError

log = logging.getLogger("qe")


def _shared_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("shared options")
    g.add_argument("--model", default=None, help="local path or hub id (default: the embedded default model)")
    g.add_argument("--calib", default=None, help="calibration source name (images, pydoc) or a JSONL file")
    g.add_argument("--samples", type=int, default=None, help="number of calibration samples (default: per command)")
    g.add_argument("--device", default=None, help="torch device (default: cpu, or cuda when available)")
    g.add_argument("--dtype", default="float32", help="model dtype: float32, float16, bfloat16")
    g.add_argument("--seed", type=int, default=0, help="random seed (token sample, clustering, routing ablations)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or progress messages")
    g.add_argument("--out", default=None, help="output directory or file (default: per command)")
    return p


def _device(args) -> str:
    if args.device:
        return args.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- commands


def cmd_plugins(args) -> int:
    from qe.plugins import KINDS, default_manager

    manager = default_manager()
    for kind in KINDS:
        entries = manager.entries(kind)
        print(f"{kind.replace('_', ' ')}s:")
        for e in entries.values():
            params = e.parameters
            print(f"  {e.name:<18} [{e.origin}] {e.summary}")
            if params:
                print(f"  {'':<18} parameters: {params}")
    return 0


def cmd_info(args) -> int:
    from qe.info import model_info, render_info

    t0 = time.perf_counter()
    info = model_info(args.model, calib=args.calib, dtype=args.dtype, device=_device(args))
    print(render_info(info))
    print(f"(took {time.perf_counter() - t0:.1f} s)")
    if args.out:
        from qe.paths import atomic_write_text

        atomic_write_text(Path(args.out), json.dumps(info, indent=2))
        print(f"qe info: wrote {args.out}")
    return 0


def _plot_blocks(text: str | None):
    if text is None:
        return None
    from qe.errors import ConfigError

    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ConfigError(f"--plot-layers {text!r}: give block indices separated by commas, e.g. 0,15,29") from None


def cmd_analyze(args) -> int:
    from qe.api import analyze

    out, summary = analyze(
        args.model, calib=args.calib, samples=args.samples or 32, out=args.out, estimator=args.estimator, k=args.k,
        num_experts=args.num_experts, layers=args.layers, plot_blocks=_plot_blocks(args.plot_layers), seed=args.seed,
        device=_device(args), dtype=args.dtype, progress=not args.quiet, force=args.force,
    )
    run = summary["run"]
    layers = summary["layers"]
    print(f"qe analyze: {len(layers)} layers of {run['model']}, {run['calibration']['samples']} samples "
          f"({run['seconds']['statistics']:.1f} s statistics, {run['seconds']['report']:.1f} s report)")
    for note in run.get("notes", []):
        print(f"note: {note}")
    print(f"qe analyze: report written to {out}/index.html (summary.json, channels.csv, plots)")
    return 0


def _analyze_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", default=None, help="regular expression on full linear names (default: all decoder linears)")
    p.add_argument("--estimator", default="act-weight", help="importance estimator plugin (qe plugins lists them)")
    p.add_argument("--k", type=int, default=32, help="top-k channels per token (default 32)")
    p.add_argument("--num-experts", type=int, default=8, help="N_r: token-dependent channels are the next N_r·k (default 8)")
    p.add_argument("--plot-layers", default=None, help="blocks with per-layer plots, e.g. 0,15,29 (default: first, middle, last)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


COMMANDS = {
    "analyze": (cmd_analyze, "per-token and per-modality channel-importance report"),
    "info": (cmd_info, "show a model's decoder structure, adapter and calibration token counts"),
    "plugins": (cmd_plugins, "list every plugin by kind with its origin and parameters"),
}


def build_parser() -> argparse.ArgumentParser:
    from qe import __version__

    shared = _shared_options()
    parser = argparse.ArgumentParser(
        prog="qe", description="Analysis-first post-training quantization of vision-language models (Quant Experts)."
    )
    parser.add_argument("--version", action="version", version=f"qe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, parents=[shared], help=help_text, description=help_text)
        sp.set_defaults(func=func)
        extra = EXTRA_ARGUMENTS.get(name)
        if extra:
            extra(sp)
    return parser


EXTRA_ARGUMENTS: dict = {"analyze": _analyze_arguments}


def _quiet_libraries(quiet: bool) -> None:
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if quiet:
            hf_logging.disable_progress_bar()
    except ImportError:
        pass
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING, format="%(message)s")
    _quiet_libraries(args.quiet)
    try:
        return int(args.func(args) or 0)
    except QEError as e:
        print(f"qe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
