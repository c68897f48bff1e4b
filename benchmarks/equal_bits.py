"""Equal bits: the best use of one extra bit per weight (docs/results.md, equal bits).

At a budget of B bits per weight, everything stored counted (codes, scales, zero points, bias,
smoothing scales, exemption masks, adapters, routers; ``qe.checkpoint.layer_storage_bits``),
on W4A8 and W4A6 per-channel bases of the embedded default's language model, text protocol
(docs/protocol.md; pydoc calibration windows, held-out perplexity), quantized propagation:

* ``gptq-g{G}``: GPTQ W4 with the smallest group size G in (32, 64, 128, 256) that fits B;
* ``w5``: GPTQ W5 per channel (reported with its own bits, "over" when above B);
* ``lowrank-r{R}``: GPTQ + whitened low-rank, int8 factors, the largest uniform rank R that fits;
* ``qe-r{R}``: GPTQ + QE (N_r = 8, r_s = r_r = R), int8 factors and router, the largest
  uniform R that fits;
* ``qe-budget``: GPTQ + QE[adapter_bits=8] with ``--budget B`` (per-layer allocation);
* and, beside the table, ``qe-fp32`` / ``qe-int8``: GPTQ + QE at its default ranks with float32
  and int8 factors (what int8 costs at the same ranks), and ``rtn-lowrank32``: RTN + a float
  rank-32 term; their per-layer error reductions check ``qe analyze``'s advice (``--advisor
  CELL``: Spearman correlation of the advisor's predicted gain with the measured relative error
  reduction per layer).

Each cell prints perplexity, bits per weight all-in, and the compensators' multiply-adds per
token. Resumable: finished cells are kept in ``<out>/results.json``; ``--cells`` picks cells by
substring, ``--list`` shows which are done. A reduced protocol (``--samples``, ``--eval-tokens``)
goes into the output directory's name.

    nice -n 10 python benchmarks/equal_bits.py --cells "W4A8/5.0/qe-int8,W4A8/5.0/qe-fp32" --samples 16
    python benchmarks/equal_bits.py --advisor W4A8/5.0/qe-fp32 --samples 16
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ResultStore, machine, print_table

BUDGETS = (5.0, 4.5)
SETTINGS = ("W4A8", "W4A6")
KINDS = ("gptq-g", "w5", "lowrank", "qe-uniform", "qe-budget", "qe-fp32", "qe-int8", "rtn-lowrank32")
BESIDE = ("qe-fp32", "qe-int8", "rtn-lowrank32")  # once per setting, beside the table
GROUPS = (32, 64, 128, 256)
COLUMNS = ["cell", "setting", "budget", "composition", "ppl", "bits_per_weight", "fits", "madds_per_token",
           "mean_rel_error", "seconds", "status"]


def cell_labels() -> list[str]:
    return [f"{s}/{b}/{k}" for s in SETTINGS for b in BUDGETS for k in KINDS
            if not (k in BESIDE and b != BUDGETS[0])]


def linears(loaded) -> list[tuple[str, int, int, bool, bool]]:
    """(name, d_in, d_out, has bias, smoothing folds into a norm) of every quantized linear."""
    from qe.capture import BlockWalker

    walker = BlockWalker(loaded, progress=False)
    out = []
    for block in walker.blocks():
        lin = walker.linears(block)
        folds = {n for g in loaded.adapter.smoothing_groups(block.module) if g.norm is not None for n in g.linears}
        for name, m in lin.items():
            out.append((f"{block.prefix}.{name}", m.in_features, m.out_features, m.bias is not None, name in folds))
    return out


def base_bits(d_in: int, d_out: int, w_bits: int, group: int, bias: bool, qe_base: bool, folds: bool) -> int:
    """Stored bits of a QuantLinear: packed codes, float32 scale and zero per group, bias; on
    QE's base the exemption mask (1 byte per channel) and, where smoothing cannot fold, an
    explicit float32 input scale (counted whether or not the α search picks one)."""
    n_groups = 1 if group == 0 else -(-d_in // group)
    bits = 8 * d_out * (-(-d_in // 8) * w_bits) + 64 * d_out * n_groups + (32 * d_out if bias else 0)
    if qe_base:
        bits += 8 * d_in + (0 if folds else 32 * d_in)
    return bits


def pair_bits(rank: int, d_in: int, d_out: int) -> int:
    """An int8 rank-r pair: codes padded to 8 per packed row, one float32 step per component and factor."""
    return rank * 8 * (-(-d_in // 8) * 8 + -(-d_out // 8) * 8) + 64 * rank if rank else 0


def largest_fitting(layers, budget: float, cost) -> int:
    weights = sum(d_in * d_out for _, d_in, d_out, _, _ in layers)
    best = 0
    for r in range(1, 1025):
        if sum(cost(r, lay) for lay in layers) > budget * weights:
            break
        best = r
    return best


def composition_of(kind: str, setting: str, budget: float, layers) -> tuple[str, str, float | None, str]:
    """(quantizer, compensator, budget to allocate or None, setting) of one cell."""
    w4 = setting  # per channel
    if kind == "gptq-g":
        weights = sum(d_in * d_out for _, d_in, d_out, _, _ in layers)
        for g in GROUPS:
            if sum(base_bits(d_in, d_out, 4, g, b, False, f) for _, d_in, d_out, b, f in layers) <= budget * weights:
                return "gptq", "none", None, f"{setting}g{g}"
        return "gptq", "none", None, f"{setting}g{GROUPS[-1]}"
    if kind == "w5":
        return "gptq", "none", None, setting.replace("W4", "W5")
    if kind == "lowrank":
        r = largest_fitting(layers, budget, lambda r, lay: base_bits(lay[1], lay[2], 4, 0, lay[3], False, lay[4])
                            + pair_bits(min(r, lay[1], lay[2]), lay[1], lay[2]))
        return "gptq", f"lowrank[rank={r};adapter_bits=8]", None, w4
    if kind == "qe-uniform":
        def qe_cost(r, lay):
            _, d_in, d_out, b, f = lay
            rr = min(r, d_in, d_out)
            return base_bits(d_in, d_out, 4, 0, b, True, f) + 9 * pair_bits(rr, d_in, d_out) + 8 * 8 * d_in + 32 * 8
        r = largest_fitting(layers, budget, qe_cost)
        return "gptq", f"qe[shared_rank={r};expert_rank={max(r, 1)};adapter_bits=8]", None, w4
    if kind == "qe-budget":
        return "gptq", "qe[adapter_bits=8]", budget, w4
    if kind == "qe-fp32":
        return "gptq", "qe", None, w4
    if kind == "rtn-lowrank32":  # the base the advisor's energy figure describes: round to nearest
        return "rtn", "lowrank[rank=32]", None, w4
    return "gptq", "qe[adapter_bits=8]", None, w4


def madds(model) -> int:
    """Multiply-adds per token the compensators add (shared term, one routed expert, the router)."""
    from qe.checkpoint import quantized_layers
    from qe.compensators.modules import LowRankAdapter, QuantExpertsAdapter

    total = 0
    for q in quantized_layers(model).values():
        c = q.compensator
        if isinstance(c, LowRankAdapter):
            total += c.rank * (c.d_in + c.d_out)
        elif isinstance(c, QuantExpertsAdapter):
            total += (c.shared_rank + (c.expert_rank if c.num_experts else 0)) * (c.d_in + c.d_out) + c.num_experts * c.d_in
    return total


def run_cell(label: str, loaded, encoded, evaluator, args) -> dict:
    from qe.budget import plan_budget
    from qe.checkpoint import effective_bits
    from qe.composition import resolve_composition
    from qe.pipeline import PipelineOptions, QuantizationPipeline

    setting, budget, kind = label.split("/")
    layers = linears(loaded)
    quantizer, compensator, alloc_budget, set_str = composition_of(kind, setting, float(budget), layers)
    composition = resolve_composition(quantizer, compensator, set_str)
    work = loaded.copy()
    options = PipelineOptions(progress=not args.quiet)
    t0 = time.perf_counter()
    record = None
    if alloc_budget is not None:
        plan = plan_budget(work, composition, encoded, alloc_budget, options)
        options = PipelineOptions(progress=not args.quiet, overrides=plan.overrides)
        record = plan.record()
    result = QuantizationPipeline(work, composition, options).run(encoded)
    seconds = time.perf_counter() - t0
    bits = effective_bits(work.model)  # float32 for float factors (the model's dtype), int8 as stored
    figs = [r.figures for r in result.layers]
    return {
        "cell": label, "setting": set_str, "budget": float(budget), "composition": composition.label,
        "ppl": evaluator(work.model)["ppl"], "bits_per_weight": bits["bits_per_weight_with_adapters"],
        "fits": bits["bits_per_weight_with_adapters"] <= float(budget) or kind in BESIDE,
        "madds_per_token": madds(work.model),
        "mean_rel_error": sum(f.get("rel_error", 0.0) for f in figs) / max(len(figs), 1),
        "seconds": seconds, "status": "ok",
        "layers": {r.name: {"rel_error_base": r.figures.get("rel_error_base"), "rel_error": r.figures.get("rel_error")}
                   for r in result.layers},
        "allocation": record["allocation"] if record else None,
    }


def advisor_check(store: ResultStore, cell: str, loaded, encoded, out: Path) -> dict | None:
    """Spearman correlation between the advisor's predicted gain (for the cell's setting and base:
    its quantizer's, or QE's base for QE's cells) and the measured per-layer relative error
    reduction ``1 − rel_error / rel_error_base`` of a finished cell. The advice (one ``qe analyze`` pass per setting) is kept
    in ``<out>/advice-<setting>.json``; None while the cell is not done."""
    import json

    from qe.analysis.advisor import spearman
    from qe.analysis.analyze import AnalyzeOptions, run_analysis

    label_setting, budget, kind = cell.split("/")
    quantizer, compensator, _, setting = composition_of(kind, label_setting, float(budget), linears(loaded))
    base = "qe" if compensator.startswith("qe") else quantizer  # QE's cells measure from QE's base
    cache = out / f"advice-{setting}.json"
    if cache.is_file():
        advice = json.loads(cache.read_text())
    else:
        analysis = run_analysis(loaded, encoded, AnalyzeOptions(progress=False, plot_blocks=(), setting=setting))
        advice = {s["name"]: s["advice"] for s in analysis.layers}
        out.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(advice, indent=1))
    if not store.has(cell):
        return None
    layers = store.rows[cell]["layers"]
    predicted, measured, names = [], [], []
    for name, a in advice.items():
        m = layers.get(name)
        if m and m["rel_error_base"]:
            predicted.append(a["predicted_gain"][base])
            measured.append(1 - m["rel_error"] / m["rel_error_base"])
            names.append(name)
    by_base = {b: spearman([advice[n]["predicted_gain"][b] for n in names], measured)
               for b in advice[names[0]]["predicted_gain"]} if names else {}
    energy32 = [advice[n]["energy"]["32"] for n in names]
    return {"cell": cell, "base": base, "layers": len(names), "spearman_predicted_gain": spearman(predicted, measured),
            "spearman_by_base_model": by_base, "spearman_energy32": spearman(energy32, measured),
            "per_layer": [{"name": n, "predicted": p, "measured": m} for n, p, m in zip(names, predicted, measured)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default=None, help="comma list of substrings of cell labels (SETTING/BUDGET/KIND)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--samples", type=int, default=64, help="calibration windows (protocol: 64)")
    ap.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens (protocol: all)")
    ap.add_argument("--advisor", default=None, metavar="CELL", help="check qe analyze's advice against CELL's layers")
    ap.add_argument("--out", default=None)
    ap.add_argument("--model", default=None, help="a dry run on another model (default: the embedded default)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    reduced = "" if args.samples == 64 and args.eval_tokens is None else f"-{args.samples}win-{args.eval_tokens or 'all'}tok"
    out = Path(args.out or f"benchmarks/results/equal-bits{reduced}")
    store = ResultStore(out / "results.json")
    labels = cell_labels()
    if args.list:
        for label in labels:
            print(f"{'ok' if store.has(label) else 'todo':5} {label}")
        return

    from qe.commands.compare import CompareOptions, Evaluator
    from qe.data.calibration import calibration_set
    from qe.models.loading import load_model

    loaded = load_model(args.model)
    _, encoded = calibration_set(loaded, "pydoc", args.samples)
    if args.advisor:
        report = advisor_check(store, args.advisor, loaded, encoded, out)
        if report is None:
            print(f"advice written to {out}; {args.advisor} is not done yet: rerun when it is")
            return
        report["machine"] = machine()
        import json

        path = out / f"advisor-{args.advisor.replace('/', '_')}.json"
        path.write_text(json.dumps(report, indent=1))
        print(f"{report['layers']} layers of {args.advisor}: Spearman(predicted gain on {report['base']}, measured "
              f"reduction) = {report['spearman_predicted_gain']:.3f}; by base model "
              + ", ".join(f"{b} {v:.3f}" for b, v in report["spearman_by_base_model"].items())
              + f"; Spearman(energy share at rank 32, measured) = {report['spearman_energy32']:.3f}  (wrote {path})")
        return
    evaluator = Evaluator(loaded, CompareOptions(eval_tokens=args.eval_tokens, caption_nll=False))
    wanted = [c for c in labels if not args.cells or any(s.strip() in c for s in args.cells.split(","))]
    for label in wanted:
        if store.has(label):
            continue
        print(f"== {label} (load average {machine()['load_avg']:.2f})", flush=True)
        try:
            row = run_cell(label, loaded, encoded, evaluator, args)
        except Exception as e:  # a failing cell is recorded; the others go on
            row = {"cell": label, "status": f"failed: {e}"}
        row["load_avg_end"] = machine()["load_avg"]
        store.put(label, row)
    rows = [dict(store.rows.get(c, {"cell": c, "status": "todo"})) for c in labels]
    for r in rows:
        r["status"] = str(r.get("status"))[:60]
    for r in rows:
        if isinstance(r.get("bits_per_weight"), float) and not math.isnan(r["bits_per_weight"]):
            r["bits_per_weight"] = round(r["bits_per_weight"], 4)
    store.write_csv(out / "results.csv", COLUMNS)
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
