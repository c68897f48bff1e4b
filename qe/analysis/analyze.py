"""``qe analyze``: which input channels matter, for which tokens and modalities.

One full-precision pass over the calibration set, block by block (:mod:`qe.capture`). Per
linear the statistics are streamed (:mod:`qe.analysis.statistics`): per-token top-k sets and
their counts per modality, maxima and moments, a bounded token sample. Once a block is done,
each of its linears is summarised (:func:`summarize_linear`) — frequencies, the token-
independent set ``C_s`` and token-dependent set ``C_r`` (docs/method.md), per-modality top
sets and their overlap, how far each token's set strays from ``C_s``, outlier figures, NPMI
co-occurrence among ``C_r`` and its spectral clusters, and the advice of
:mod:`qe.analysis.advisor` (which compensator pays, how much rank) — and the block's raw
statistics are dropped. Writing the report is :mod:`qe.analysis.report`'s job.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from qe.analysis import advisor
from qe.analysis import channels as ch
from qe.analysis.statistics import LinearStats, choose_sample_positions
from qe.capture import BlockWalker, StreamContext, attach_stats
from qe.errors import ConfigError
from qe.modality import MODALITIES, Modality
from qe.models.base import EncodedSample
from qe.models.loading import LoadedModel
from qe.models.offload import onloaded
from qe.plugins import QEPluginManager, default_manager
from qe.settings import parse_setting

MODALITY_PAIRS = (("vision", "text"), ("vision", "answer"), ("text", "answer"))


@dataclass
class AnalyzeOptions:
    estimator: str = "act-weight"
    k: int = 32
    num_experts: int = 8
    layers: str | None = None  # regex on full linear names
    plot_blocks: tuple[int, ...] | None = None  # None: first, middle and last block
    max_tokens: int = 16384  # token sample (per-channel medians)
    seed: int = 0
    batch_size: int = 8
    device: str = "cpu"
    progress: bool = True
    cluster_assign: str = "cluster_qr"  # spectral clustering's label assignment (see channels.spectral_clusters)
    setting: str = "W4A8"  # the quantization the advisor predicts compensation gains for


@dataclass
class LayerPlotData:
    """What the per-layer plots need beyond the summary."""

    frequencies: dict[str, torch.Tensor]  # modality -> f per channel (d_in,)
    sample_scores: torch.Tensor | None  # (T0, d_in) scores of the first calibration sample
    sample_modality: torch.Tensor | None  # (T0,)
    npmi: torch.Tensor  # (n, n) among C_r, in C_r order
    labels: torch.Tensor  # (n,) cluster of each C_r channel


@dataclass
class AnalysisResult:
    layers: list[dict[str, Any]] = field(default_factory=list)
    channel_rows: list[dict[str, Any]] = field(default_factory=list)
    plots: dict[str, LayerPlotData] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    statistics_seconds: float = 0.0


def select_layers(loaded: LoadedModel, pattern: str | None) -> dict[int, list[str]]:
    """Linears (by block, relative names) whose full name matches ``pattern``."""
    walker = BlockWalker(loaded)
    out: dict[int, list[str]] = {}
    all_names = []
    try:
        regex = re.compile(pattern) if pattern else None
    except re.error as e:
        raise ConfigError(f"--layers {pattern!r} is not a valid regular expression ({e})") from None
    for block in walker.blocks():
        for name in walker.linears(block):
            full = f"{block.prefix}.{name}"
            all_names.append(full)
            if regex is None or regex.search(full):
                out.setdefault(block.index, []).append(name)
    if not out:
        examples = ", ".join(all_names[:3] + all_names[-1:])
        raise ConfigError(f"--layers {pattern!r} matches no linear; names look like {examples}")
    return out


def check_widths(loaded: LoadedModel, selected: dict[int, list[str]], k: int, num_experts: int) -> None:
    walker = BlockWalker(loaded)
    for i, names in selected.items():
        linears = walker.linears(walker.block(i))
        for n in names:
            d_in = linears[n].in_features
            if k > d_in:
                raise ConfigError(f"--k {k} exceeds the input width {d_in} of {n}: use --k at most {d_in}")
            ch.check_split(d_in, k, num_experts, n)


def default_plot_blocks(num_blocks: int) -> tuple[int, ...]:
    return tuple(sorted({0, num_blocks // 2, num_blocks - 1}))


@torch.no_grad()
def run_analysis(
    loaded: LoadedModel,
    encoded: list[EncodedSample],
    options: AnalyzeOptions | None = None,
    manager: QEPluginManager | None = None,
) -> AnalysisResult:
    opts = options or AnalyzeOptions()
    manager = manager or default_manager()
    estimator = manager.create("estimator", opts.estimator)
    selected = select_layers(loaded, opts.layers)
    check_widths(loaded, selected, opts.k, opts.num_experts)
    adapter = loaded.adapter
    stack = stack_name(adapter)
    walker = BlockWalker(loaded, encoded, device=opts.device, batch_size=opts.batch_size, progress=opts.progress)
    num_blocks = walker.num_blocks
    plot_blocks = set(opts.plot_blocks if opts.plot_blocks is not None else default_plot_blocks(num_blocks))
    bad = [b for b in plot_blocks if not 0 <= b < num_blocks]
    if bad:
        raise ConfigError(f"--plot-layers {bad} outside the model's blocks 0..{num_blocks - 1}")

    result = AnalysisResult()
    t0 = time.perf_counter()
    positions = choose_sample_positions(walker.inputs().total_tokens, opts.max_tokens, opts.seed)
    first_sample = (0, encoded[0].num_tokens)
    context = StreamContext()
    hook = manager.hook
    for step in walker.walk(0, max(selected) + 1, desc="analyze"):
        i, block = step.index, step.block
        names = set(selected.get(i, ()))
        hook.qe_block_start(block_index=i, num_blocks=walker.num_blocks)
        if names:
            with attach_stats(block.module, adapter, prefix=block.prefix, context=context, sample_positions=positions,
                              hessian=False, moments=True, estimator=estimator, k=opts.k, keep_topk=True,
                              linears=names, record_range=first_sample if i in plot_blocks else None) as stats:
                step.next_hidden = step.run(context)
            input_cache: dict[int, tuple] = {}
            with onloaded(block.module):  # the advisor's error model reads the weights
                for name, linear in walker.linears(block).items():
                    if name not in stats:
                        continue
                    summary, rows, plot = summarize_linear(stats[name], i, name, opts, want_plot=i in plot_blocks,
                                                           weight=linear.weight, input_cache=input_cache)
                    summary["stack"] = stack
                    result.layers.append(summary)
                    hook.qe_layer_end(block_index=i, layer_name=summary["name"], figures={
                        "token_dependent_share": summary["token_dependent_share"],
                        "max_abs": summary["outliers"]["max_abs"]})
                    result.channel_rows.extend(rows)
                    if plot is not None:
                        result.plots[summary["name"]] = plot
            del stats
        hook.qe_block_end(block_index=i, num_blocks=walker.num_blocks, figures={})
    result.statistics_seconds = time.perf_counter() - t0
    return result


def _top(counts: torch.Tensor, k: int) -> list[int]:
    return ch.frequency_order(counts)[:k].tolist()


def _overlap(a: list[int], b: list[int]) -> dict[str, float]:
    sa, sb = set(a), set(b)
    union = len(sa | sb)
    return {"shared": len(sa & sb), "jaccard": len(sa & sb) / union if union else float("nan")}


def summarize_linear(st: LinearStats, block_index: int, name: str, opts: AnalyzeOptions, want_plot: bool = False,
                     weight: torch.Tensor | None = None, input_cache: dict[int, tuple] | None = None):
    """The per-layer summary (a JSON-ready dict), its channel rows, and plot data. ``weight``
    (the linear's, ``(d_out, d_in)``) feeds the advisor's error model (without it the advice
    predicts no gain). ``input_cache`` keeps the input's spectrum and :class:`~qe.analysis.advisor.InputModel`
    for linears sharing one input (q/k/v)."""
    imp, inp = st.importance, st.input
    k, n_r = opts.k, opts.num_experts
    d_in = inp.d_in
    counts = imp.counts  # (M, d_in) per modality
    total = counts.sum(0)
    n_mod = {m: int(inp.n_by_modality[int(Modality[m.upper()])]) for m in MODALITIES}
    present = [m for m in MODALITIES if n_mod[m] > 0]
    missing = [m for m in MODALITIES if n_mod[m] == 0]

    f_all = ch.channel_frequencies(total, k)
    freqs = {"all": f_all}
    for m in present:
        freqs[m] = counts[int(Modality[m.upper()])].double() / n_mod[m]
    C_s, C_r = ch.split_channels(total, k, n_r, st.name)
    top = {"all": _top(total, k)}
    for m in present:
        top[m] = _top(counts[int(Modality[m.upper()])], k)
    overlap = {}
    for a, b in MODALITY_PAIRS:
        key = f"{a}_{b}"
        overlap[key] = _overlap(top[a], top[b]) if a in top and b in top else None

    share_dependent = float(1 - total[C_s].sum() / total.sum().clamp_min(1))

    # How far each token's top-k set strays from C_s: the fraction of its k channels outside C_s.
    topk, topk_mod = imp.topk, imp.topk_modality
    in_cs = ch.membership(topk, C_s, d_in).sum(1)  # (T,)
    stray = 1 - in_cs / k
    stray_by = {m: float(stray[topk_mod == int(Modality[m.upper()])].mean()) for m in present}
    hist = torch.bincount((k - in_cs).long(), minlength=k + 1)[: k + 1]

    # Outliers: max |x| over median |x| per channel (median over the token sample), kurtosis.
    absmax = inp.absmax
    median = inp.median_abs()
    ratio = absmax / median.clamp_min(1e-12)
    kurt = inp.kurtosis()
    top_ratio = torch.argsort(ratio, descending=True)[:8]

    # Co-occurrence of C_r channels, NPMI, spectral clusters (docs/method.md, routed experts).
    p_i, p_ij = ch.cooccurrence(topk, C_r, d_in)
    S = ch.npmi(p_i, p_ij)
    labels = ch.spectral_clusters(S, n_r, seed=opts.seed, assign_labels=opts.cluster_assign) if n_r > 0 else torch.zeros(0, dtype=torch.long)
    sizes, within = ch.cluster_summary(S, labels) if n_r > 0 else ([], [])
    n = S.shape[0]
    off = S[~torch.eye(n, dtype=torch.bool)] if n > 1 else torch.zeros(0)

    mean_score = (imp.score_sum / max(imp.n_tokens, 1)).float()
    summary: dict[str, Any] = {
        "name": st.name,
        "block": block_index,
        "linear": name,
        "d_in": d_in,
        "tokens": n_mod,
        "missing_modalities": missing,
        "token_independent": C_s.tolist(),
        "token_dependent": C_r.tolist(),
        "top_channels": top,
        "overlap": overlap,
        "token_dependent_share": share_dependent,
        "stray": {"mean": float(stray.mean()), "by_modality": stray_by, "histogram": hist.tolist()},
        "outliers": {
            "max_abs": float(absmax.max()),
            "top_max_over_median": [[int(c), float(ratio[c])] for c in top_ratio],
            "kurtosis_max": float(kurt.max()),
            "kurtosis_median": float(kurt.median()),
            "top_kurtosis_channels": torch.argsort(kurt, descending=True)[:8].tolist(),
        },
        "clusters": {
            "labels": labels.tolist(),
            "sizes": sizes,
            "mean_within_npmi": within,
            "mean_npmi": float(off.mean()) if off.numel() else float("nan"),
        },
    }
    summary["finding"] = finding(summary, k)
    cached = input_cache.get(id(inp)) if input_cache is not None else None
    if cached is None:
        cached = advisor.energy_shares(inp.sample), advisor.input_model(inp.sample)
        if input_cache is not None:
            input_cache[id(inp)] = cached
    energy, inputs = cached
    errors = advisor.error_model(weight, inputs, parse_setting(opts.setting), seed=opts.seed, exempt=C_s.tolist()) \
        if weight is not None else None
    summary["advice"] = advisor.advise(summary, energy, errors)

    role = torch.zeros(d_in, dtype=torch.long) - 1  # -1 none, -2 shared, >= 0 cluster
    role[C_s] = -2
    if n_r > 0:
        role[C_r] = labels
    # Plain Python lists first: indexing tensors element by element costs microseconds each.
    cols = {"f_all": f_all.tolist(), "max_abs": absmax.tolist(), "median_abs": median.tolist(),
            "kurtosis": kurt.tolist(), "mean_score": mean_score.tolist()}
    mod_cols = {m: (freqs[m].tolist() if m in freqs else None) for m in MODALITIES}
    roles = role.tolist()
    rows = []
    for c in range(d_in):
        r = roles[c]
        rows.append({
            "layer": st.name, "channel": c, "f_all": cols["f_all"][c],
            **{f"f_{m}": (mod_cols[m][c] if mod_cols[m] is not None else None) for m in MODALITIES},
            "max_abs": cols["max_abs"][c], "median_abs": cols["median_abs"][c], "kurtosis": cols["kurtosis"][c],
            "mean_score": cols["mean_score"][c],
            "set": "token_independent" if r == -2 else (f"token_dependent:{r}" if r >= 0 else ""),
        })
    plot = None
    if want_plot:
        rec = imp.recorded_scores
        plot = LayerPlotData(
            frequencies={m: v.float() for m, v in freqs.items()},
            sample_scores=rec,
            sample_modality=topk_mod[: rec.shape[0]] if rec is not None else None,
            npmi=S, labels=labels,
        )
    return summary, rows, plot


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def finding(s: dict, k: int) -> str:
    """One sentence generated from a layer's numbers."""
    parts = []
    ov = s["overlap"].get("vision_text")
    if ov is not None:
        parts.append(f"vision and text share {ov['shared']} of {k} top channels")
    elif s["missing_modalities"]:
        parts.append(f"no {' or '.join(s['missing_modalities'])} tokens in the calibration set")
    parts.append(f"{_pct(s['token_dependent_share'])} of top-{k} memberships fall outside the {k} token-independent channels")
    c, r = s["outliers"]["top_max_over_median"][0]
    parts.append(f"channel {c} peaks at {r:.0f}× its median magnitude")
    within = [w for w in s["clusters"]["mean_within_npmi"] if w == w]
    if within:
        parts.append(f"routed clusters have mean within-cluster NPMI {sum(within) / len(within):.2f}")
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."


def stack_name(adapter) -> str:
    """``language`` for a model adapter, ``vision`` / ``projector`` for a vision stack's."""
    return adapter.stack


def scoped_views(loaded: LoadedModel, scope: str, pattern: str | None) -> list[LoadedModel]:
    """The model as seen by each stack ``scope`` covers (vision tower, projector, language
    model), keeping those with a linear that ``pattern`` matches; one line when none has."""
    from qe.models.stacks import scope_adapters

    views = [loaded if a is loaded.adapter else dataclasses.replace(loaded, adapter=a)
             for a in scope_adapters(loaded.adapter, loaded.model, scope)]
    kept, first_error = [], None
    for view in views:
        try:
            select_layers(view, pattern)
        except ConfigError as e:
            first_error = first_error or e
            continue
        kept.append(view)
    if not kept:
        assert first_error is not None
        raise first_error
    return kept


def run_scoped_analysis(
    loaded: LoadedModel,
    encoded: list[EncodedSample],
    scope: str = "language",
    options: AnalyzeOptions | None = None,
    manager: QEPluginManager | None = None,
) -> AnalysisResult:
    """:func:`run_analysis` over every stack ``scope`` covers, in the model's order; each
    layer summary says its ``stack``. Vision stacks read the image samples only, and plot
    their first, middle and last blocks (``plot_blocks`` names language blocks; empty, no
    stack is plotted)."""
    from qe.models.stacks import vision_samples

    opts = options or AnalyzeOptions()
    merged = AnalysisResult()
    for view in scoped_views(loaded, scope, opts.layers):
        language = view is loaded
        samples = encoded if language else vision_samples(view.adapter, encoded, scope)
        plots = opts.plot_blocks if language or opts.plot_blocks == () else None
        r = run_analysis(view, samples, dataclasses.replace(opts, plot_blocks=plots), manager)
        merged.layers.extend(r.layers)
        merged.channel_rows.extend(r.channel_rows)
        merged.plots.update(r.plots)
        merged.statistics_seconds += r.statistics_seconds
    return merged
