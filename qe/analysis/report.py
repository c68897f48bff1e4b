"""Writing an analysis report: summary.json, channels.csv, PNG plots, index.html and one page
per plotted block (``block-NNN.html``).

``index.html`` is the overview: the run's facts, the cross-layer plots and one row per layer;
the per-layer plots (frequency, token map, NPMI) of each plotted block are on that block's
page, one collapsible section per linear, every image linked to its file.

Everything goes into a temporary directory that is renamed into place when complete
(:func:`qe.paths.atomic_directory`), so an interrupted run leaves no half-written report.
"""

from __future__ import annotations

import csv
import datetime as _dt
import html
import json
import math
import re
from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from qe.analysis.analyze import AnalysisResult, LayerPlotData  # noqa: E402
from qe.modality import MODALITIES  # noqa: E402

SCHEMA_VERSION = 2  # 2: advice.predicted_gain per base quantizer, advice.weight_fraction, run.setting
BASE_NAMES = {"rtn": "RTN", "gptq": "GPTQ", "qe": "QE's base"}  # the advice's base quantizers, as the report names them
MODALITY_COLORS = {"all": "black", "text": "tab:blue", "vision": "tab:orange", "answer": "tab:green"}


def load_schema() -> dict:
    return json.loads(resources.files("qe.analysis").joinpath("summary.schema.json").read_text())


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/Inf become null, tensors become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _clean(value.tolist())
    return value


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _short(name: str) -> str:
    """``model.language_model.layers.3.self_attn.q_proj`` → ``3.q_proj``."""
    m = re.search(r"(\d+)\.(?:[A-Za-z_]+\.)*([A-Za-z_0-9]+)$", name)
    return f"{m.group(1)}.{m.group(2)}" if m else name


def never_ranked(layers: list[dict], channel_rows: list[dict]) -> dict[str, list[int]]:
    """Per layer, the channels of C_r (token-dependent) that no token ever ranked in its top-k
    (``f_all = 0``). They sit in C_r only to fill its N_r·k places, and their co-occurrence
    with anything is zero, so the clustering places them without evidence."""
    out: dict[str, list[int]] = {s["name"]: [] for s in layers}
    for r in channel_rows:
        if str(r.get("set", "")).startswith("token_dependent") and r.get("f_all") == 0 and r["layer"] in out:
            out[r["layer"]].append(int(r["channel"]))
    order = {s["name"]: {c: i for i, c in enumerate(s["token_dependent"])} for s in layers}
    return {name: sorted(chans, key=lambda c, o=order[name]: o.get(c, c)) for name, chans in out.items()}


def build_summary(result: AnalysisResult) -> dict:
    import transformers

    from qe.version import __version__

    unranked = never_ranked(result.layers, result.channel_rows)
    layers = [{**s, "never_ranked": {"channels": unranked[s["name"]], "count": len(unranked[s["name"]]),
                                     "of": len(s["token_dependent"])}} for s in result.layers]
    return _clean({
        "schema_version": SCHEMA_VERSION,
        "tool": {"qe": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "run": {**result.run, "created": result.run.get("created") or _dt.datetime.now(_dt.timezone.utc).isoformat()},
        "layers": layers,
    })


def write_channels_csv(path: Path, rows: list[dict]) -> None:
    fields = ["layer", "channel", "set", "f_all"] + [f"f_{m}" for m in MODALITIES] + ["max_abs", "median_abs", "kurtosis", "mean_score"]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})


# --------------------------------------------------------------------------- plots


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path.name


def plot_frequencies(path: Path, name: str, summary: dict, data: LayerPlotData, k: int) -> str:
    order = summary["token_independent"] + summary["token_dependent"]
    n_show = min(len(order) + 2 * k, summary["d_in"])
    all_order = torch.argsort(data.frequencies["all"], descending=True, stable=True).tolist()
    shown = order + [c for c in all_order if c not in set(order)][: n_show - len(order)]
    x = np.arange(len(shown))
    fig, ax = plt.subplots(figsize=(10, 3.2))
    for m, f in data.frequencies.items():
        ax.plot(x, f[shown].numpy(), label=m, color=MODALITY_COLORS.get(m), lw=1.2 if m == "all" else 0.9)
    ax.axvspan(-0.5, k - 0.5, color="grey", alpha=0.15, label=f"C_s (k={k})")
    ax.axvline(len(order) - 0.5, color="grey", ls=":", lw=1)
    unranked = (summary.get("never_ranked") or {}).get("count", 0)
    if unranked:  # C_r is in frequency order: its never-ranked channels are its tail
        ax.axvspan(len(order) - unranked - 0.5, len(order) - 0.5, color="tab:red", alpha=0.12,
                   label=f"C_r never in a top-k ({unranked})")
    ax.set_xlabel("input channels, by overall frequency rank (C_s shaded, C_r up to the dotted line)")
    ax.set_ylabel("share of tokens with c in top-k")
    ax.set_title(f"{_short(name)}: channel frequency by modality")
    ax.set_xlim(-0.5, len(shown) - 0.5)
    ax.legend(fontsize=7 if unranked else 8, ncol=6 if unranked else 5, loc="upper right")
    return _save(fig, path)


def plot_token_map(path: Path, name: str, summary: dict, data: LayerPlotData) -> str | None:
    if data.sample_scores is None or data.sample_scores.numel() == 0:
        return None
    scores = data.sample_scores.float()
    order = torch.argsort(data.frequencies["all"], descending=True, stable=True)
    img = torch.log10(scores[:, order].clamp_min(1e-6)).numpy()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    im = ax.imshow(img, aspect="auto", cmap="magma", interpolation="nearest",
                   vmin=np.percentile(img, 5), vmax=img.max())
    mod = data.sample_modality
    ylabel = "tokens of the first calibration sample"
    if mod is not None and mod.numel() == img.shape[0]:
        # Each run of tokens of one modality is labelled on the y axis, at its middle (the
        # labels stay inside the figure whatever the colorbar takes on the right).
        change = [0] + [t for t in range(1, mod.numel()) if mod[t] != mod[t - 1]] + [mod.numel()]
        centers, labels = [], []
        for a, b in zip(change[:-1], change[1:]):
            if a > 0:
                ax.axhline(a - 0.5, color="cyan", lw=0.8)
            centers.append((a + b - 1) / 2)
            labels.append(f"{MODALITIES[int(mod[a])]} ({b - a})")
        gap = 0.05 * mod.numel()  # about one label's height: short runs must not overprint each other
        for j in range(1, len(centers)):
            centers[j] = max(centers[j], centers[j - 1] + gap)
        centers[-1] = min(centers[-1], mod.numel() - 1)
        for j in range(len(centers) - 2, -1, -1):
            centers[j] = min(centers[j], centers[j + 1] - gap)
        ax.set_yticks(centers, labels, fontsize=8)
        for tick, label in zip(ax.get_yticklabels(), labels):
            tick.set_color(MODALITY_COLORS.get(label.split()[0], "k"))
        ylabel += ", by modality (tokens)"
    ax.axvline(len(summary["token_independent"]) - 0.5, color="white", ls="--", lw=0.8)
    ax.set_xlabel("input channels, by overall frequency rank (left of the dashed line: C_s)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{_short(name)}: log10 importance per token and channel")
    fig.colorbar(im, ax=ax, fraction=0.025)
    return _save(fig, path)


def plot_npmi(path: Path, name: str, data: LayerPlotData) -> str | None:
    if data.npmi.numel() == 0:
        return None
    order = torch.argsort(data.labels, stable=True)
    S = data.npmi[order][:, order].numpy()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    im = ax.imshow(S, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    sizes = torch.bincount(data.labels).tolist()
    edge = -0.5
    for s in sizes[:-1]:
        edge += s
        ax.axhline(edge, color="k", lw=0.6)
        ax.axvline(edge, color="k", lw=0.6)
    ax.set_title(f"{_short(name)}: NPMI among C_r, ordered by cluster")
    ax.set_xlabel("C_r channels")
    fig.colorbar(im, ax=ax, fraction=0.04)
    return _save(fig, path)


def _by_linear(layers: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for s in layers:
        out[s["linear"].split(".")[-1]].append(s)
    return out


def plot_depth(path: Path, layers: list[dict], value, ylabel: str, title: str) -> str | None:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    drawn = False
    for lin, items in _by_linear(layers).items():
        xs = [s["block"] for s in items]
        ys = [value(s) for s in items]
        ys = [np.nan if y is None else y for y in ys]
        if all(np.isnan(y) for y in ys):
            continue
        ax.plot(xs, ys, marker="o", ms=3, lw=1, label=lin)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("decoder block")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=4)
    return _save(fig, path)


def plot_stray_depth(path: Path, layers: list[dict]) -> str | None:
    blocks = sorted({s["block"] for s in layers})
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for m in MODALITIES:
        ys = []
        for b in blocks:
            vals = [s["stray"]["by_modality"].get(m) for s in layers if s["block"] == b]
            vals = [v for v in vals if v is not None and v == v]
            ys.append(np.mean(vals) if vals else np.nan)
        if not all(np.isnan(ys)):
            ax.plot(blocks, ys, marker="o", ms=3, label=m, color=MODALITY_COLORS[m])
    ax.set_xlabel("decoder block")
    ax.set_ylabel("mean share of a token's top-k outside C_s")
    ax.set_title("How far tokens stray from the token-independent set")
    ax.legend(fontsize=8)
    return _save(fig, path)


# --------------------------------------------------------------------------- html


def _fmt(x, spec=".2f") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


STYLE = ("<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;font-size:13px}td,th{border-bottom:1px solid #ddd;padding:3px 6px;text-align:left}"
         ".warn{background:#fff3cd;border:1px solid #e0c060;padding:.6em 1em;margin:1em 0}img{max-width:100%}"
         "code{font-size:12px}details{border:1px solid #ddd;border-radius:4px;margin:.6em 0;padding:.3em .8em}"
         "summary{cursor:pointer;font-weight:600}summary span{font-weight:normal;color:#555}"
         "figure{margin:.8em 0}figcaption{font-size:12px}nav{font-size:14px;margin:.5em 0}</style>")

PLOT_TITLES = {"freq": "channel frequency by modality", "tokens": "importance per token and channel",
               "npmi": "NPMI co-occurrence among C_r"}


def block_page(block: int) -> str:
    return f"block-{block:03d}.html"


def _head(title: str) -> list[str]:
    return ["<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>", STYLE,
            "</head><body>"]


def _never_ranked_text(s: dict) -> str | None:
    nr = s.get("never_ranked") or {}
    if not nr.get("count"):
        return None
    chans = ", ".join(str(c) for c in nr["channels"][:24]) + (", …" if nr["count"] > 24 else "")
    return (f"{nr['count']} of the {nr['of']} C_r channels were never in any token's top-k (f_all = 0): they fill "
            f"C_r's N_r·k places by rank alone and co-occur with nothing, so their cluster is arbitrary. "
            f"Channels {chans}.")


def write_index(path: Path, summary: dict, cross_plots: list[tuple[str, str]], layer_plots: dict[str, list[str]]) -> None:
    """The overview page: run facts, cross-layer plots, one row per layer; per-layer plots are
    on one page per block (:func:`write_block_page`), linked from here."""
    run = summary["run"]
    e = html.escape
    calib = run["calibration"]
    tokens = ", ".join(f"{m} {calib['tokens'][m]}" for m in MODALITIES)
    facts = [
        ("model", f"{run['model']} ({run['adapter']} adapter)"),
        ("calibration", f"{calib['samples']} samples from {calib['source']}: {tokens} tokens"),
        ("estimator", f"{run['estimator']}, k = {run['k']}, N_r = {run['num_experts']}"),
        ("statistics time", f"{run['seconds'].get('statistics', float('nan')):.1f} s"),
        ("tools", ", ".join(f"{k} {v}" for k, v in summary["tool"].items())),
    ]
    out = _head(f"qe analyze: {run['model']}") + [f"<h1>Channel importance: {e(run['model'])}</h1>"]
    if run.get("synthetic_vision_tower"):
        out.append("<div class='warn'><b>Synthetic vision tower.</b> " + e("; ".join(run.get("notes", []))) + "</div>")
    out.append("<table>" + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in facts) + "</table>")
    out.append("<p>Importance of input channel c for token t is the estimator's score; each token's top-k channels are "
               "its important set. <i>C_s</i> (token-independent) are the k channels most often in those sets; <i>C_r</i> "
               "(token-dependent) the next N_r·k, clustered by how often they co-occur (NPMI). Machine-readable: "
               "<a href='summary.json'>summary.json</a> (schema in <code>qe/analysis/summary.schema.json</code>), "
               "<a href='channels.csv'>channels.csv</a>.</p>")
    blocks = sorted({s["block"] for s in summary["layers"] if s["name"] in layer_plots})
    if blocks:
        links = ", ".join(f"<a href='{block_page(b)}'>block {b}</a>" for b in blocks)
        out.append(f"<nav><b>Per-layer plots</b> (frequency, token map, NPMI), one page per block: {links}</nav>")
    unranked = [s for s in summary["layers"] if (s.get("never_ranked") or {}).get("count")]
    if unranked:
        total = sum(s["never_ranked"]["count"] for s in unranked)
        of = sum(s["never_ranked"]["of"] for s in unranked)
        worst = max(unranked, key=lambda s: s["never_ranked"]["count"])
        out.append(f"<div class='warn'><b>C_r channels no token ranked.</b> In {len(unranked)} of "
                   f"{len(summary['layers'])} layers, {total} of their {of} token-dependent (C_r) channels were never "
                   f"in any token's top-k (f_all = 0); most in {e(worst['name'])} ({worst['never_ranked']['count']} of "
                   f"{worst['never_ranked']['of']}). They fill C_r's N_r·k places by rank alone, and their clusters "
                   "carry no co-occurrence evidence. The column <i>C_r unranked</i> below counts them per layer; "
                   "<code>never_ranked</code> in summary.json lists them. A smaller N_r (or a larger calibration set) "
                   "leaves fewer of them.</div>")
    out.append("<h2>Across layers</h2>")
    for title, img in cross_plots:
        out.append(f"<figure><a href='{e(img)}'><img src='{e(img)}' alt='{e(title)}'></a>"
                   f"<figcaption>{e(title)}: <a href='{e(img)}'>{e(img)}</a></figcaption></figure>")
    out.append("<h2>Layers</h2><table><tr><th>layer</th><th>d_in</th><th>outside C_s</th><th>vision∩text</th>"
               "<th>max/median</th><th>C_r unranked</th><th>advice</th><th>finding</th></tr>")
    for s in summary["layers"]:
        label = e(s["name"])
        if s["name"] in layer_plots:
            label = f"<a href='{block_page(s['block'])}#{_safe(s['name'])}'>{label}</a>"
        ov = s["overlap"].get("vision_text")
        ov_text = f"{ov['shared']}/{len(s['top_channels']['all'])}" if ov else "–"
        ratio = s["outliers"]["top_max_over_median"][0][1] if s["outliers"]["top_max_over_median"] else None
        nr = s.get("never_ranked") or {}
        nr_text = f"{nr['count']}/{nr['of']}" if nr.get("of") else "–"
        adv = s.get("advice")
        adv_text = (f"{adv['compensator']} rank {adv['rank']} (predicted gain "
                    + ", ".join(f"{_fmt(v, '.0%')} on {BASE_NAMES.get(b, b)}" for b, v in adv["predicted_gain"].items())
                    + ")"
                    if adv else "–")
        out.append(f"<tr><td>{label}</td><td>{s['d_in']}</td><td>{_fmt(s['token_dependent_share'], '.0%')}</td>"
                   f"<td>{ov_text}</td><td>{_fmt(ratio, '.0f')}</td><td>{nr_text}</td><td>{e(adv_text)}</td>"
                   f"<td>{e(s['finding'])}</td></tr>")
    out.append("</table></body></html>")
    path.write_text("\n".join(out))


def write_block_page(path: Path, summary: dict, block: int, layer_plots: dict[str, list[str]]) -> None:
    """One block's per-layer plots: a collapsible section per linear, images linked to their files."""
    e = html.escape
    run = summary["run"]
    layers = [s for s in summary["layers"] if s["block"] == block and s["name"] in layer_plots]
    blocks = sorted({s["block"] for s in summary["layers"] if s["name"] in layer_plots})
    i = blocks.index(block)
    nav = ["<a href='index.html'>overview</a>"]
    if i > 0:
        nav.append(f"<a href='{block_page(blocks[i - 1])}'>← block {blocks[i - 1]}</a>")
    if i + 1 < len(blocks):
        nav.append(f"<a href='{block_page(blocks[i + 1])}'>block {blocks[i + 1]} →</a>")
    out = _head(f"qe analyze: {run['model']}, block {block}") + [
        f"<nav>{' · '.join(nav)}</nav>", f"<h1>Block {block}: per-layer plots</h1>",
        f"<p>{e(run['model'])}; k = {run['k']}, N_r = {run['num_experts']}. Click a layer to open its plots; click a "
        "plot for the full-size file.</p>",
        "<p>" + " · ".join(f"<a href='#{_safe(s['name'])}'>{e(s['linear'])}</a>" for s in layers) + "</p>",
    ]
    for j, s in enumerate(layers):
        out.append(f"<details id='{_safe(s['name'])}'{' open' if j == 0 else ''}><summary>{e(s['linear'])} "
                   f"<span>({e(s['name'])})</span></summary><p>{e(s['finding'])}</p>")
        note = _never_ranked_text(s)
        if note:
            out.append(f"<p class='warn'>{e(note)}</p>")
        for img in layer_plots[s["name"]]:
            kind = img.split("_", 1)[0]
            title = PLOT_TITLES.get(kind, kind)
            out.append(f"<figure><a href='{e(img)}'><img src='{e(img)}' alt='{e(title)}' loading='lazy'></a>"
                       f"<figcaption>{e(title)}: <a href='{e(img)}'>{e(img)}</a></figcaption></figure>")
        out.append("</details>")
    out.append("</body></html>")
    path.write_text("\n".join(out))


def write_report(out_dir: Path, result: AnalysisResult, k: int) -> dict:
    """Write every file of the report into ``out_dir`` (an existing, empty directory)."""
    out_dir = Path(out_dir)
    summary = build_summary(result)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    write_channels_csv(out_dir / "channels.csv", result.channel_rows)
    cross = []
    layers = summary["layers"]
    # Depth plots follow one stack's blocks: the language model's where it was analysed.
    language = [s for s in layers if s.get("stack", "language") == "language"]
    depth_layers = language or layers
    img = plot_depth(out_dir / "overlap_vs_depth.png", depth_layers,
                     lambda s: s["overlap"]["vision_text"]["jaccard"] if s["overlap"].get("vision_text") else None,
                     "Jaccard(vision top-k, text top-k)", "Vision/text overlap of top channels vs depth")
    if img:
        cross.append(("Vision/text overlap of the top-k channel sets", img))
    img = plot_depth(out_dir / "dependent_share_vs_depth.png", depth_layers, lambda s: s["token_dependent_share"],
                     "share of top-k memberships outside C_s", "Token-dependent importance vs depth")
    if img:
        cross.append(("Share of token-dependent importance", img))
    img = plot_stray_depth(out_dir / "stray_vs_depth.png", depth_layers)
    if img:
        cross.append(("How far tokens stray from C_s, by modality", img))
    layer_plots: dict[str, list[str]] = {}
    for name, data in result.plots.items():
        s = next(x for x in layers if x["name"] == name)
        stack = s.get("stack", "language")
        base = _safe(_short(name) if stack == "language" else f"{stack}-{_short(name)}")
        images = [plot_frequencies(out_dir / f"freq_{base}.png", name, s, data, k)]
        tm = plot_token_map(out_dir / f"tokens_{base}.png", name, s, data)
        if tm:
            images.append(tm)
        nm = plot_npmi(out_dir / f"npmi_{base}.png", name, data)
        if nm:
            images.append(nm)
        layer_plots[name] = images
    write_index(out_dir / "index.html", summary, cross, layer_plots)
    for block in sorted({s["block"] for s in layers if s["name"] in layer_plots}):
        write_block_page(out_dir / block_page(block), summary, block, layer_plots)
    return summary
