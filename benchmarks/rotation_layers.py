"""Why the rotation can hurt weight-only RTN: each linear's W4 output error in three bases.

For every decoder linear of the embedded default's language model, the relative output error
``‖X (W − RTN(W))ᵀ‖ / ‖X Wᵀ‖`` of RTN (``--setting``, default per-channel symmetric W4, the
weights of the rotation benchmark's W4A6 and W4A4 cells), on the inputs ``X`` the layer
receives from the first calibration windows of the benchmark protocol, in three bases:

* ``plain``: the model as it is;
* ``gain_folded``: for the linears that read the residual stream (q/k/v after the attention
  norm, gate/up after the MLP norm), the norm's gain ``g`` folded into the weight
  (``W diag(g)``, input ``x / g``), which is what the residual rotation must do first;
* ``rotated``: the model after ``rotate[kind=hadamard;seed=0]`` (gain folded, residual stream
  rotated offline, o_proj/down_proj inputs rotated online).

It also prints each norm's smallest gain against its median: a channel whose gain is near zero
carries a large normalized activation that the weight's quantization error then multiplies.

    python benchmarks/rotation_layers.py --windows 2

Writes benchmarks/results/rotation-layers.json and .csv and prints the table (means over blocks).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table

RESULTS = Path(__file__).resolve().parent / "results" / "rotation-layers"


def residual_readers(adapter, block) -> dict[str, str]:
    """``{linear: norm before it}`` for the block's linears that read the residual stream, as
    the model adapter describes them (the groups behind the attention and MLP input norms)."""
    return {linear: group.norm for group in adapter.smoothing_groups(block)
            if group.norm in (adapter.attention_input_norm, adapter.mlp_input_norm) for linear in group.linears}


def layer_inputs(model, names: list[str], encoded, rows: int) -> dict[str, torch.Tensor]:
    """The first ``rows`` input vectors each named linear receives (after any online rotation:
    the hooks are registered after the rotation's own)."""
    seen: dict[str, list[torch.Tensor]] = defaultdict(list)
    handles = []
    for name in names:
        def hook(module, args, name=name):
            seen[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).float())
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    with torch.no_grad():
        for e in encoded:
            model(**e.inputs)
    for h in handles:
        h.remove()
    return {n: torch.cat(v)[:rows] for n, v in seen.items()}


def output_error(x: torch.Tensor, w: torch.Tensor, quantize) -> float:
    return float((x @ (w - quantize(w)).T).norm() / (x @ w.T).norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=2, help="pydoc calibration windows of 512 tokens")
    ap.add_argument("--setting", default="W4A16chsym", help="per-channel symmetric weights, as the W4A6 and W4A4 cells")
    args = ap.parse_args()

    from qe.capture import BlockWalker
    from qe.data.calibration import calibration_set
    from qe.models.loading import load_model
    from qe.plugins import default_manager
    from qe.settings import parse_setting
    from qe.transforms.base import ModelContext
    from qe.transforms.rotation import rotate_model

    setting = parse_setting(args.setting)
    rtn = default_manager().create("quantizer", "rtn")

    def quantize(w):
        return rtn.quantize(w, setting).dequantize()

    loaded = load_model(None)
    _, encoded = calibration_set(loaded, "pydoc", args.windows)
    walker = BlockWalker(loaded)
    linears = {f"{b.prefix}.{n}": lin for b in walker.blocks() for n, lin in walker.linears(b).items()}
    rotated = copy.deepcopy(loaded.model)
    rotated_linears = {name: rotated.get_submodule(name) for name in linears}
    rotate_model(ModelContext(rotated, loaded.adapter, rotated_linears, setting), kind="hadamard", seed=0)
    rows = 512 * args.windows
    x_plain = layer_inputs(loaded.model, list(linears), encoded, rows)
    x_rotated = layer_inputs(rotated, list(linears), encoded, rows)

    per_layer, gains = [], {}
    for b in walker.blocks():
        readers = residual_readers(loaded.adapter, b.module)
        for n, lin in walker.linears(b).items():
            name = f"{b.prefix}.{n}"
            w, x = lin.weight.detach().float(), x_plain[name]
            row = {"layer": name, "kind": n.rsplit(".", 1)[-1], "plain": output_error(x, w, quantize),
                   "rotated": output_error(x_rotated[name], rotated.get_submodule(name).weight.detach().float(),
                                           quantize)}
            if n in readers:
                g = b.module.get_submodule(readers[n]).weight.detach().float()
                row["gain_folded"] = output_error(x / g, w * g, quantize)
                gains[f"{b.prefix}.{readers[n]}"] = {
                    "min_over_median": float(g.abs().min() / g.abs().median()),
                    "share_below_quarter_median": float((g.abs() < g.abs().median() / 4).float().mean())}
            per_layer.append(row)

    table = []
    for kind in dict.fromkeys(r["kind"] for r in per_layer):
        rs = [r for r in per_layer if r["kind"] == kind]
        mean = {c: sum(r[c] for r in rs) / len(rs) for c in ("plain", "gain_folded", "rotated") if c in rs[0]}
        table.append({"linear": kind, "blocks": len(rs), **{c: round(v, 4) for c, v in mean.items()},
                      "rotated_vs_plain": round(mean["rotated"] / mean["plain"], 3)})
    columns = ["linear", "blocks", "plain", "gain_folded", "rotated", "rotated_vs_plain"]
    print_table(table, columns)
    smallest = min(gains.values(), key=lambda v: v["min_over_median"])
    print(f"smallest norm gain over its norm's median: {smallest['min_over_median']:.2g}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {"setting": args.setting, "windows": args.windows, "rows_per_layer": rows, "machine": machine(),
               "table": table, "layers": per_layer, "norm_gains": gains}
    RESULTS.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    with RESULTS.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)


if __name__ == "__main__":
    main()
