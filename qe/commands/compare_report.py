"""Tables and plots of a ``qe compare`` grid: results.csv, results.md, PNGs, index.html."""

from __future__ import annotations

import csv
import html
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLUMNS = ["setting", "transform", "quantizer", "compensator", "status", "ppl", "caption_nll", "mean_rel_error_base",
           "mean_rel_error", "router_agreement", "bits_per_weight", "bits_per_weight_with_adapters", "added_params",
           "added_params_ratio", "added_flops_per_token", "quantize_seconds", "fit_seconds", "eval_seconds", "error"]


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _fmt(v, spec: str = ".4g") -> str:
    n = _num(v)
    if n is None:
        return "" if v is None else str(v)
    return format(n, spec)


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})


def markdown_table(rows: list[dict]) -> str:
    # A transform column only where a cell has one: rotate+rtn and rtn rows look alike otherwise.
    transforms = any(r.get("transform") not in (None, "none", "–") for r in rows)
    head = ["setting", "quantizer", "compensator", "ppl", "caption NLL", "rel. error (base → comp.)",
            "bits/weight (+adapters)", "added params", "quantize s", "status"]
    if transforms:
        head.insert(1, "transform")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("status") != "ok":
            cells = [r.get("setting", ""), r.get("quantizer", ""), r.get("compensator", ""), "", "", "", "", "", "",
                     f"error: {r.get('error', '')}"]
        else:
            err = f"{_fmt(r.get('mean_rel_error_base'), '.3g')} → {_fmt(r.get('mean_rel_error'), '.3g')}" \
                if r.get("mean_rel_error") is not None else ""
            bits = f"{_fmt(r.get('bits_per_weight'), '.2f')} ({_fmt(r.get('bits_per_weight_with_adapters'), '.2f')})"
            cells = [r.get("setting", ""), r.get("quantizer", ""), r.get("compensator", ""), _fmt(r.get("ppl"), ".3f"),
                     _fmt(r.get("caption_nll"), ".3f"), err, bits, _fmt(r.get("added_params"), ",.0f"),
                     _fmt(r.get("quantize_seconds"), ".0f"), "ok"]
        if transforms:
            cells.insert(1, r.get("transform") or "none")
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _plot_by_setting(path: Path, rows: list[dict], metric: str, label: str) -> str | None:
    fp = next((r for r in rows if r["label"] == "FP32"), None)
    settings = [s for s in dict.fromkeys(r["setting"] for r in rows if r["label"] != "FP32")]
    ok = [r for r in rows if r.get("status") == "ok" and r["label"] != "FP32" and _num(r.get(metric)) is not None]
    if not ok:
        return None
    fig, axes = plt.subplots(1, len(settings), figsize=(4.5 * len(settings), 3.8), squeeze=False)
    for ax, s in zip(axes[0], settings):
        these = [r for r in ok if r["setting"] == s]
        names = [f"{r['quantizer']}\n+{r['compensator']}" for r in these]
        ax.bar(range(len(these)), [_num(r[metric]) for r in these], color="tab:blue")
        if fp is not None and _num(fp.get(metric)) is not None:
            ax.axhline(_num(fp[metric]), color="k", ls="--", lw=1, label="FP32")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(these)), names, fontsize=6, rotation=60, ha="right")
        ax.set_title(s)
        ax.set_ylabel(label)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def _plot_pareto(path: Path, rows: list[dict], x_key: str, x_label: str) -> str | None:
    ok = [r for r in rows if r.get("status") == "ok" and r["label"] != "FP32" and _num(r.get("ppl")) is not None]
    if not ok:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    settings = list(dict.fromkeys(r["setting"] for r in ok))
    for s in settings:
        pts = sorted((_num(r.get(x_key)) or 0.0, _num(r["ppl"]), r["compensator"]) for r in ok if r["setting"] == s)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=s, s=18)
        for x, y, name in pts:
            ax.annotate(name, (x, y), fontsize=6, alpha=0.7)
        front, best = [], float("inf")
        for x, y, _ in pts:  # lower perplexity for no more cost
            if y < best:
                front.append((x, y))
                best = y
        ax.plot([p[0] for p in front], [p[1] for p in front], lw=0.8)
    fp = next((r for r in rows if r["label"] == "FP32"), None)
    if fp is not None and _num(fp.get("ppl")) is not None:
        ax.axhline(_num(fp["ppl"]), color="k", ls="--", lw=1, label="FP32")
    ax.set_xlabel(x_label)
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("Quality against cost (Pareto front per setting)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def write_compare_report(out: Path, rows: list[dict], facts: dict) -> None:
    """Write the report files into a temporary folder, then move each into place."""
    import os
    import shutil

    final = Path(out)
    out = final / ".report.tmp"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    _write_all(out, rows, facts)
    for f in out.iterdir():
        os.replace(f, final / f.name)
    out.rmdir()


def _write_all(out: Path, rows: list[dict], facts: dict) -> None:
    write_csv(out / "results.csv", rows)
    note = ""
    if facts.get("synthetic_vision_tower"):
        note = "> " + "; ".join(facts.get("notes", [])) + "\n\n"
    opts = facts["options"]
    eval_text = (f"perplexity on the first {opts['eval_tokens']} tokens of the held-out text (whole 512-token windows)"
                 if opts.get("eval_tokens") else "perplexity on the whole held-out text")
    caption = "; caption NLL on the held-out image–caption pairs" if opts.get("caption_nll", True) else ""
    counts = facts.get("calibration_tokens") or {}
    tokens = (" (" + ", ".join(f"{n} {m}" for m, n in counts.items()) + " tokens)") if counts else ""
    md = (f"# qe compare: {facts['model']}\n\n{note}"
          f"Calibration: {opts['samples']} samples of {facts.get('calibration')}{tokens}; propagation {opts['propagation']}; "
          f"{eval_text}{caption}.\n\n{markdown_table(rows)}\n")
    (out / "results.md").write_text(md)
    plots = []
    for metric, label, name in (("ppl", "held-out perplexity", "ppl_by_setting.png"),
                                ("caption_nll", "caption NLL (nats/token)", "caption_nll_by_setting.png")):
        p = _plot_by_setting(out / name, rows, metric, label)
        if p:
            plots.append((label + " by composition", p))
    for key, label, name in (("added_params", "added parameters (adapters)", "pareto_params.png"),
                             ("added_flops_per_token", "added multiply-adds per token", "pareto_flops.png")):
        p = _plot_pareto(out / name, rows, key, label)
        if p:
            plots.append((f"perplexity against {label}", p))
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>qe compare</title><style>"
             "body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px}td,th{border-bottom:1px solid #ddd;padding:3px 6px}"
             ".warn{background:#fff3cd;border:1px solid #e0c060;padding:.6em 1em}img{max-width:100%}</style></head><body>",
             f"<h1>qe compare: {e(str(facts['model']))}</h1>"]
    if facts.get("synthetic_vision_tower"):
        parts.append("<div class='warn'><b>Synthetic vision tower.</b> " + e("; ".join(facts.get("notes", []))) + "</div>")
    parts.append(f"<p>{e(md.split(chr(10) + chr(10))[1 if not note else 2])}</p>")
    parts.append("<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in COLUMNS[:12]) + "</tr>")
    for r in rows:
        parts.append("<tr>" + "".join(f"<td>{e(_fmt(r.get(c)))}</td>" for c in COLUMNS[:12]) + "</tr>")
    parts.append("</table><p><a href='results.csv'>results.csv</a> · <a href='results.md'>results.md</a></p>")
    for title, img in plots:
        parts.append(f"<h2>{e(title)}</h2><img src='{e(img)}'>")
    parts.append("</body></html>")
    (out / "index.html").write_text("\n".join(parts))
