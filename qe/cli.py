"""The ``qe`` command line (docs/cli.md). Every command shares ``--model --calib --samples --device --dtype --seed --quiet --out``."""

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


SAMPLES_DEFAULTS = {  # what --samples means when it is not given, per command
    "analyze": "32", "quantize": "the recipe's, else 32", "compare": "32",
    "eval": "8 for layer-error, every held-out image-caption pair for caption-nll", "info": "1",
}


def _shared_options(command: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    samples_default = SAMPLES_DEFAULTS.get(command, "per command")
    g = p.add_argument_group("shared options")
    g.add_argument("--model", default=None, help="local path or hub id (default: the embedded default model)")
    g.add_argument("--calib", default=None, help="calibration source name (images, pydoc) or a JSONL file")
    g.add_argument("--samples", type=int, default=None,
                   help=f"number of calibration samples (default: {samples_default}); a number above what the "
                        "source holds uses all of its samples and says how many")
    g.add_argument("--device", default=None, help="torch device (default: cpu, or cuda when available)")
    g.add_argument("--dtype", default="float32", help="model dtype: float32, float16, bfloat16")
    g.add_argument("--seed", type=int, default=None,
                   help="random seed: token sample, clustering, routing ablations (default 0, or the recipe's)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or progress messages")
    g.add_argument("--out", default=None, help="output directory or file (default: per command)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="let a model directory run its own Python code (auto_map); off by default")
    return p


def _placement_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models larger than memory")
    g.add_argument("--offload-folder", default=None,
                   help="offload what does not fit in --max-memory to this folder (accelerate disk offload); "
                        "decoder blocks are then onloaded one at a time")
    g.add_argument("--max-memory", default=None,
                   help="memory per device for the model, e.g. cpu=4GiB or 0=20GiB,cpu=60GiB; the rest is "
                        "offloaded (to --offload-folder, or a temporary folder)")
    g.add_argument("--max-activation-memory", default=None,
                   help="keep captured calibration activations in memory up to this size, e.g. 4GiB, and in "
                        "memory-mapped files past it (in --offload-folder, or a temporary folder)")


def _placement(args):
    from qe.models.loading import Placement, parse_activation_memory, parse_max_memory

    return Placement(offload_folder=args.offload_folder, max_memory=parse_max_memory(args.max_memory),
                     max_activation_memory=parse_activation_memory(args.max_activation_memory))


def _seed(args) -> int:
    return 0 if args.seed is None else args.seed


def _device(args) -> str:
    """The device to run on, checked before any work (one line if this machine lacks it)."""
    from qe.models.loading import check_device

    if args.device:
        return check_device(args.device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(args) -> str:
    from qe.models.loading import parse_dtype

    parse_dtype(args.dtype)  # an unknown dtype fails before any work
    return args.dtype


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
    print("event hooks (implement with @qe.hookimpl to watch the pipeline):")
    for name, summary, implementers in manager.event_hooks():
        print(f"  {name:<18} {summary}")
        if implementers:
            print(f"  {'':<18} implemented by: {', '.join(implementers)}")
    return 0


def cmd_info(args) -> int:
    from qe.commands.info import model_info, render_info
    from qe.paths import check_output

    device, dtype = _device(args), _dtype(args)
    if args.out:
        check_output(args.out, kind="file", allow_existing=True)
    t0 = time.perf_counter()
    info = model_info(args.model, calib=args.calib, dtype=dtype, device=device,
                      trust_remote_code=args.trust_remote_code)
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
    from qe.commands.analyze import analyze

    out, summary = analyze(
        args.model, calib=args.calib, samples=args.samples or 32, out=args.out, estimator=args.estimator, k=args.k,
        num_experts=args.num_experts, layers=args.layers, plot_blocks=_plot_blocks(args.plot_layers), seed=_seed(args),
        device=_device(args), dtype=_dtype(args), progress=not args.quiet, force=args.force,
        trust_remote_code=args.trust_remote_code, placement=_placement(args), scope=args.scope, setting=args.setting,
    )
    run = summary["run"]
    layers = summary["layers"]
    print(f"qe analyze: {len(layers)} layers of {run['model']}, {run['calibration']['samples']} samples "
          f"({run['seconds']['statistics']:.1f} s statistics, {run['seconds']['report']:.1f} s report)")
    print(f"qe analyze: calibration: {run['calibration']['source']}")
    for note in run.get("notes", []):
        print(f"note: {note}")
    unranked = [s["never_ranked"] for s in layers if s.get("never_ranked", {}).get("count")]
    if unranked:
        print(f"note: in {len(unranked)} of {len(layers)} layers, {sum(u['count'] for u in unranked)} of "
              f"{sum(u['of'] for u in unranked)} token-dependent (C_r) channels were never in any token's top-k "
              "(f_all = 0); the report lists them (never_ranked in summary.json)")
    print(f"qe analyze: report written to {out}/index.html (overview; per-block plot pages, summary.json, "
          "channels.csv)")
    return 0


def _analyze_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", default=None, help="regular expression on full linear names (default: all decoder linears)")
    p.add_argument("--estimator", default="act-weight", help="importance estimator plugin (qe plugins lists them)")
    p.add_argument("--k", type=int, default=32, help="top-k channels per token (default 32)")
    p.add_argument("--num-experts", type=int, default=8, help="N_r: token-dependent channels are the next N_r·k (default 8)")
    p.add_argument("--plot-layers", default=None, help="blocks with per-layer plots, e.g. 0,15,29 (default: first, middle, last)")
    p.add_argument("--scope", choices=["language", "vision", "all"], default="language",
                   help="which blocks to report: language (default: the language model's decoder blocks), vision "
                        "(the vision tower's blocks and the projector), all (both)")
    p.add_argument("--setting", default="W4A8",
                   help="the quantization the advice predicts compensation gains for (default W4A8)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


def recipe_from_args(args):
    """The recipe file (if any) with the command-line flags applied over it."""
    from qe.recipe import Recipe, load_recipe
    from qe.settings import parse_setting

    recipe = load_recipe(args.recipe) if args.recipe else Recipe()
    setting = args.setting or recipe.setting
    if args.w_bits is not None or args.a_bits is not None or args.group_size is not None:
        setting = parse_setting(setting).with_overrides(args.w_bits, args.a_bits, args.group_size).name
    return recipe.replace(
        transform=args.transform, quantizer=args.quantizer, compensator=args.compensator, estimator=args.estimator,
        setting=setting, calib=args.calib, samples=args.samples, propagation=args.propagation, seed=args.seed,
        max_tokens=args.max_tokens, scope=args.scope,
    )


def cmd_quantize(args) -> int:
    from qe.commands.quantize import run_quantize

    recipe = recipe_from_args(args)
    composition = recipe.validate()
    out = args.out or f"quantized/{_safe_name(args.model or 'embedded-default')}-{_safe_name(composition.label)}"
    args._out_resolved = out
    path, manifest = run_quantize(recipe, args.model, out=out, resume=args.resume, force=args.force,
                                  progress=not args.quiet, device=_device(args), dtype=_dtype(args),
                                  trust_remote_code=args.trust_remote_code, adapter_dtype=args.adapter_dtype,
                                  check_heldout=not args.no_eval, placement=_placement(args), budget=args.budget)
    table = render_layer_table(manifest)
    if table and not args.quiet:
        print(table)
        print(f"(every layer's figures: {path / 'qe_manifest.json'}, under \"layers\")")
    for w in manifest["warnings"]:
        print(f"warning: {w}")
    s, bits = manifest["summary"], manifest["effective_bits"]
    errors = (f"mean relative output error {s['mean_rel_error_base']:.4g} before compensation, "
              f"{s['mean_rel_error']:.4g} after" if _is_number(s.get("mean_rel_error")) else
              "no calibration figures (the composition reads no calibration data)")
    print(f"qe quantize: {composition.label}: {s['layers']} layers, {errors}; "
          f"{bits['bits_per_weight']:.2f} bits/weight ({bits['bits_per_weight_with_adapters']:.2f} with adapters); "
          f"{s['seconds']:.1f} s")
    if manifest.get("budget"):
        b = manifest["budget"]
        options = sorted({a["option"] for a in b["allocation"].values()})
        print(f"qe quantize: budget {b['bits_per_weight_target']} bits/weight: {b['bits_per_weight']:.4f} used "
              f"({b['bits']} bits for {b['weights']} weights); {len(options)} distinct options over "
              f"{len(b['allocation'])} layers (the allocation: the manifest's \"budget\")")
    print(f"qe quantize: calibration: {manifest['calibration']['source']}")
    if manifest.get("heldout_check"):
        from qe.evaluation.before_after import describe

        print(f"qe quantize: {describe(manifest['heldout_check'])}")
    for note in manifest["model"]["notes"]:
        print(f"note: {note}")
    with_adapters = bits.get("bits_per_weight_with_adapters")
    if (manifest.get("adapter_dtype") == "float32" and _is_number(with_adapters) and _is_number(bits["bits_per_weight"])
            and with_adapters > 1.5 * bits["bits_per_weight"]):
        print("note: the adapters are stored in float32, the model's dtype; --adapter-dtype float16 (or bfloat16) "
              "stores them in half the space")
    size = manifest.get("size") or {}
    where = f"qe quantize: checkpoint written to {path}"
    if size.get("checkpoint_bytes") and size.get("model_bytes"):
        where += (f" ({_megabytes(size['checkpoint_bytes'])}; the {size['model_dtype']} model is "
                  f"{_megabytes(size['model_bytes'])})")
    print(where)
    return 0


def _safe_name(text: str) -> str:
    """A file-name-safe form of a model name or composition label."""
    import re

    return re.sub(r"[^A-Za-z0-9_.@+-]+", "_", text).strip("_")


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def _is_number(value) -> bool:
    import math

    return isinstance(value, (int, float)) and math.isfinite(value)


TABLE_COLUMNS = (  # (figure key, header, width, format)
    ("rel_error_base", "err base", 10, ".4f"), ("rel_error", "err", 10, ".4f"), ("rel_error_text", "text", 9, ".4f"),
    ("rel_error_vision", "vision", 9, ".4f"), ("rel_error_answer", "answer", 9, ".4f"),
    ("router_agreement", "router", 8, ".2f"), ("fit_seconds", "fit s", 7, ".2f"),
)


def render_layer_table(manifest: dict) -> str:
    """The per-layer figures as a text table: only the columns that hold a figure for some
    layer, and an empty string when none does (a data-free composition such as RTN alone)."""
    layers = manifest["layers"]
    columns = [c for c in TABLE_COLUMNS if any(_is_number(r["figures"].get(c[0])) for r in layers)]
    if not columns:
        return ""
    names = [r["name"] for r in layers]
    cut = len(os.path.commonprefix(names).rpartition(".")[0]) + 1 if len(names) > 1 else 0
    lines = [f"{'layer':<44}" + "".join(f"{header:>{width}}" for _, header, width, _ in columns)]
    for r in layers:
        f = r["figures"]
        cells = "".join(f"{format(f[key], spec) if _is_number(f.get(key)) else '–':>{width}}"
                        for key, _, width, spec in columns)
        lines.append(f"{r['name'][cut:][-44:]:<44}{cells}")
    return "\n".join(lines)


PROPAGATION_HELP = ("quantized (default): each block is calibrated on the outputs of the already-quantized blocks "
                    "before it, as deployed; fp-inputs: every block gets its full-precision inputs")


def _quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None,
                   help="TOML recipe file with the same choices as these flags, plus per-layer overrides and skip "
                        "patterns; flags given here override it (format and example: docs/recipes.md)")
    p.add_argument("--transform", default=None,
                   help="transform plugin applied before quantizing: none (default), 'smoothquant[alpha=0.5]', awq, "
                        "rotate, 'rotate[smooth=awq]'")
    p.add_argument("--quantizer", default=None, help="quantizer plugin: rtn (default), gptq, 'gptq[damp=0.01]'")
    p.add_argument("--compensator", default=None, help="compensator plugin, e.g. none, 'lowrank[rank=64]', qe")
    p.add_argument("--estimator", default=None, help="importance estimator plugin (default act-weight)")
    p.add_argument("--setting", default=None, help="W<bits>A<bits>[KV<bits>][g<group>|ch][sym|asym] (default W4A8)")
    p.add_argument("--w-bits", type=int, default=None, help="weight bits; replaces the W<bits> of --setting")
    p.add_argument("--a-bits", type=int, default=None,
                   help="activation bits; replaces the A<bits> of --setting (16 = weights only)")
    p.add_argument("--group-size", type=int, default=None,
                   help="weight quantization group size along the input; 0 = one scale per output channel")
    p.add_argument("--propagation", choices=["quantized", "fp-inputs"], default=None, help=PROPAGATION_HELP)
    p.add_argument("--no-eval", action="store_true",
                   help="skip the before/after check (held-out perplexity of the full-precision and quantized "
                        "model on 1,024 tokens of built-in text, and calibration vs held-out error)")
    p.add_argument("--adapter-dtype", choices=["model", "float32", "float16", "bfloat16"], default="model",
                   help="dtype in which compensator tensors are stored in the checkpoint "
                        "(default: model, the dtype the model was loaded in, see --dtype)")
    p.add_argument("--max-tokens", type=int, default=None, help="token sample per linear for fitting (default 16384)")
    p.add_argument("--budget", type=float, default=None, metavar="BITS",
                   help="bits per weight for everything stored (codes, scales, zero points, adapters, routers): "
                        "fit the compensator's options (ranks, experts) at every layer and allocate them within "
                        "the budget by calibration error (a planning pass first; qe or lowrank compensators)")
    p.add_argument("--scope", choices=["language", "vision", "all"], default=None,
                   help="which linears to quantize: language (default: the language model's decoder blocks), "
                        "vision (the vision tower's blocks and the projector), all (both)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished block")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


def cmd_compare(args) -> int:
    from qe.commands.compare import CompareOptions, run_compare
    from qe.errors import ConfigError

    if args.executor != "ray" and (args.cell_cpus is not None or args.cell_gpus is not None):
        raise ConfigError("--cell-cpus and --cell-gpus reserve resources for Ray tasks: add --executor ray")
    options = CompareOptions(
        propagation=args.propagation or "quantized",
        eval_tokens=None if args.eval_tokens == 0 else args.eval_tokens, caption_nll=not args.no_caption_nll,
        calib=args.calib, samples=args.samples or 32, estimator=args.estimator or "act-weight", seed=_seed(args),
        device=_device(args), dtype=_dtype(args), progress=not args.quiet, trust_remote_code=args.trust_remote_code,
        placement=_placement(args),
        executor=args.executor, cell_cpus=1.0 if args.cell_cpus is None else args.cell_cpus,
        cell_gpus=0.0 if args.cell_gpus is None else args.cell_gpus,
    )
    out = args.out or f"reports/compare-{(args.model or 'embedded-default').replace('/', '_')}"
    path, rows = run_compare(args.model, args.quantizers, args.compensators, args.settings, out=out,
                             options=options, force=args.force, transforms=args.transforms)
    from qe.commands.compare_report import markdown_table

    print(markdown_table(rows))
    failed = [r for r in rows if r.get("status") != "ok"]
    grid = json.loads((path / "grid.json").read_text())
    print(f"qe compare: calibration: {grid.get('calibration')}")
    print(f"qe compare: {len(rows) - 1} cells ({len(failed)} failed); report written to {path}/index.html "
          "(results.csv, results.md, plots)")
    return 0


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transforms", default="none", help="comma list of transform plugins, e.g. 'none,smoothquant,awq,rotate'")
    p.add_argument("--quantizers", default="rtn,gptq", help="comma list of quantizer plugins")
    p.add_argument("--compensators", default="none,lowrank,qe", help="comma list of compensator plugins")
    p.add_argument("--settings", default="W4A8,W4A6,W3A16", help="comma list of settings")
    p.add_argument("--estimator", default=None, help="importance estimator plugin (default act-weight)")
    p.add_argument("--eval-tokens", type=int, default=8192,
                   help="score this prefix of the held-out text (whole 512-token windows; 0 = all of it)")
    p.add_argument("--no-caption-nll", action="store_true", help="skip the caption NLL metric")
    p.add_argument("--propagation", choices=["quantized", "fp-inputs"], default=None, help=PROPAGATION_HELP)
    p.add_argument("--force", action="store_true", help="reuse an output directory that holds a different grid")
    p.add_argument("--executor", choices=["serial", "ray"], default="serial",
                   help="serial (default): the cells one after another in this process; ray: each cell as a Ray "
                        "task on the cluster at RAY_ADDRESS (else on this machine), written into the same "
                        "grid directory under the same keys (needs pip install 'qe-quant[ray]')")
    p.add_argument("--cell-cpus", type=float, default=None,
                   help="with --executor ray: CPUs each cell's task reserves, and its torch threads (default 1)")
    p.add_argument("--cell-gpus", type=float, default=None,
                   help="with --executor ray: GPUs each cell's task reserves (default 0); above 0 the cell computes "
                        "on its GPU, else on the CPU (--device is then the driver's: the full-precision reference)")


def cmd_eval(args) -> int:
    from qe.commands.evaluate import run_eval

    results = run_eval(args.model, metric=args.metric, text_file=args.text_file, window=args.window,
                       stride=args.stride, reference=args.reference, samples=args.samples, calib=args.calib,
                       eval_tokens=args.eval_tokens or None, out=args.out, device=_device(args), dtype=_dtype(args),
                       progress=not args.quiet, trust_remote_code=args.trust_remote_code, placement=_placement(args))
    print(results["table"])
    for note in results.get("notes", []):
        print(f"note: {note}")
    if args.out:
        print(f"qe eval: results written to {args.out}")
    return 0


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metric", choices=["ppl", "caption-nll", "layer-error"], default="ppl",
                   help="ppl (default): perplexity of held-out text; caption-nll: negative log-likelihood of the "
                        "answer tokens of held-out image-caption pairs; layer-error: each linear's relative output "
                        "error against the full-precision model (see --reference)")
    p.add_argument("--text-file", default=None, help="UTF-8 text to score (default: the built-in held-out text)")
    p.add_argument("--window", type=int, default=512, help="tokens per window for --text-file (default 512)")
    p.add_argument("--stride", type=int, default=512, help="tokens between window starts for --text-file (default 512)")
    p.add_argument("--eval-tokens", type=int, default=0, help="score only this prefix of the built-in held-out text")
    p.add_argument("--reference", default=None,
                   help="full-precision model for layer-error (default: the one a quantized checkpoint was made from)")


COMMANDS = {
    "analyze": (cmd_analyze, "per-token and per-modality channel-importance report"),
    "quantize": (cmd_quantize, "quantize a model with one composition and write a checkpoint"),
    "compare": (cmd_compare, "run a grid of compositions and compare them side by side"),
    "eval": (cmd_eval, "perplexity, caption NLL or per-layer error of a model or quantized checkpoint"),
    "info": (cmd_info, "show a model's decoder structure, adapter and calibration token counts"),
    "plugins": (cmd_plugins, "list every plugin by kind with its origin and parameters"),
}


def build_parser() -> argparse.ArgumentParser:
    from qe.version import __version__

    parser = argparse.ArgumentParser(
        prog="qe", description="Analysis-first post-training quantization of vision-language models (Quant Experts)."
    )
    parser.add_argument("--version", action="version", version=f"qe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, parents=[_shared_options(name)], help=help_text, description=help_text)
        sp.set_defaults(func=func)
        extra = EXTRA_ARGUMENTS.get(name)
        if extra:
            extra(sp)
        if name in PLACED_COMMANDS:
            _placement_options(sp)
    return parser


PLACED_COMMANDS = ("analyze", "quantize", "compare", "eval")  # the commands that run a model larger than memory


EXTRA_ARGUMENTS: dict = {"analyze": _analyze_arguments, "quantize": _quantize_arguments,
                         "compare": _compare_arguments, "eval": _eval_arguments}


def cmd_export(args) -> int:
    from qe.commands.export import cmd_export as run

    return run(args)


def _export_arguments(p: argparse.ArgumentParser) -> None:
    from qe.commands.export import export_arguments

    export_arguments(p)


COMMANDS["export"] = (cmd_export, "export a checkpoint: compressed-tensors base, PEFT LoRA adapter, or transformers from_pretrained")
EXTRA_ARGUMENTS["export"] = _export_arguments


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
        print(f"qe {args.command}: interrupted{_resume_hint(args, argv)}", file=sys.stderr)
        return 130
    except OSError as e:  # the environment (disk full, permissions): one line, as for QEError
        where = f": {e.filename}" if e.filename else ""
        print(f"qe {args.command}: error: {e.strerror or e}{where}: free space or fix the permissions, then rerun",
              file=sys.stderr)
        return 2


def _resume_hint(args, argv: list[str] | None) -> str:
    """How to continue an interrupted run: the exact command, with ``--resume`` where needed."""
    import shlex

    words = list(sys.argv[1:] if argv is None else argv)
    if args.command == "quantize":
        from qe.commands.quantize import has_partial_run

        out = getattr(args, "_out_resolved", None)
        if out is None or not has_partial_run(Path(out)):
            return " before any block was saved; rerun the same command to start again"
        if "--resume" not in words:
            words.append("--resume")
        if args.out is None:
            words += ["--out", str(out)]
        return f"; the finished blocks are saved: resume with: qe {shlex.join(words)}"
    if args.command == "compare":
        return f"; finished cells are kept: continue with: qe {shlex.join(words)}"
    return ""


if __name__ == "__main__":
    sys.exit(main())
