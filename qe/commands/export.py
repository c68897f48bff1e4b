"""``qe export CKPT --format compressed-tensors|peft-lora --out DIR``: a qe checkpoint for serving stacks."""

from __future__ import annotations

import argparse

from qe.errors import ConfigError


def cmd_export(args) -> int:
    from qe.export.core import DEFAULT_EVAL_TOKENS, export_checkpoint

    if not args.out:
        raise ConfigError("qe export needs --out DIR: the directory to write the exported model to")
    eval_tokens = DEFAULT_EVAL_TOKENS if args.eval_tokens is None else (args.eval_tokens or None)
    out, report = export_checkpoint(args.checkpoint, args.format, args.out, force=args.force,
                                    eval_tokens=eval_tokens, evaluate=not args.no_eval, progress=not args.quiet)
    b = report["bytes"]
    if args.format == "transformers":
        print(f"qe export: {report['layers']} quantized linears, qe's full model for transformers' from_pretrained "
              f"(after `import qe`); {b['base'] / 1e6:.2f} MB; {report['seconds']:.1f} s")
        print(f"qe export: written to {out} (qe_export.json describes it)")
        return 0
    print(f"qe export: {report['layers']} quantized linears as compressed-tensors "
          f"({', '.join(sorted({g['format'] for g in report['quantization_config']['config_groups'].values()}))}); "
          f"base {b['base'] / 1e6:.2f} MB, adapter {b['adapter'] / 1e6:.2f} MB (checkpoint {b['checkpoint'] / 1e6:.2f} MB); "
          f"{report['seconds']:.1f} s")
    for consumer, producer in report["folded"].items():
        print(f"folded: {consumer}'s smoothing scales into {producer}")
    for note in report["notes"]:
        print(f"note: {note}")
    ppl = report.get("perplexity")
    if ppl:
        print(f"perplexity ({ppl['tokens']} held-out tokens): {ppl['with_routed_experts']:.4f} with the routed experts, "
              f"{ppl['without_routed_experts']:.4f} without ({100 * ppl['increase']:+.2f}%)")
    print(f"qe export: written to {out} (qe_export.json describes it)")
    return 0


def export_arguments(p: argparse.ArgumentParser) -> None:
    from qe.export.core import FORMATS

    p.add_argument("checkpoint", help="a checkpoint directory written by `qe quantize`")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="compressed-tensors: the quantized base; peft-lora: the base plus a PEFT LoRA adapter in OUT/lora; "
                        "transformers: qe's whole model, loadable with from_pretrained after `import qe`")
    p.add_argument("--eval-tokens", type=int, default=None,
                   help="held-out tokens for the perplexity without routed experts (default 8192, 0 = all)")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity of the model without routed experts")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
