"""Channel split, co-occurrence, NPMI and spectral clustering (docs/method.md).

Pure tensor functions shared by ``qe analyze`` and the Quant Experts compensator. Every
function is deterministic (ties are broken by channel index, clustering is seeded) and none
builds a dense ``T × d_in`` matrix: co-occurrence works on the per-token top-k indices and
touches only the ``n = N_r·k`` token-dependent channels (a ``T × n`` indicator, chunked).

Notation (docs/method.md): ``m_c`` is the number of tokens whose top-k set ``C_t`` holds
channel c; ``f_c = k·m_c / Σ_j m_j``; ``C_s`` are the first k channels by ``f_c`` (token
independent), ``C_r`` the next ``N_r·k`` (token dependent); ``O[t, i] = 1(c_i ∈ C_t)`` for
``c_i ∈ C_r``; ``p_i = mean_t O[t,i]``, ``p_ij = mean_t O[t,i]·O[t,j]``.
"""

from __future__ import annotations

import warnings

import torch

from qe.errors import ConfigError

# Tokens per chunk when building indicator matrices: bounds memory at CHUNK × n floats.
CHUNK_TOKENS = 8192


# --------------------------------------------------------------------------- frequencies and split


def channel_frequencies(counts_total: torch.Tensor, k: int) -> torch.Tensor:
    """``f_c = k · m_c / Σ_j m_j`` (float64, ``(d_in,)``); all zeros when no token was counted.

    With every token contributing exactly k channels, ``Σ_j m_j = k·T`` and ``f_c`` is the
    fraction of tokens whose top-k set holds c.
    """
    m = counts_total.to(torch.float64)
    total = m.sum()
    return m * 0 if total <= 0 else k * m / total


def max_num_experts(d_in: int, k: int) -> int:
    """Largest N_r with ``k·(1 + N_r) ≤ d_in``."""
    return d_in // k - 1


def check_split(d_in: int, k: int, num_experts: int, where: str = "") -> None:
    """Raise :class:`ConfigError` unless ``k·(1 + N_r) ≤ d_in``, naming the maxima."""
    if k < 1:
        raise ConfigError(f"k={k} must be at least 1")
    if num_experts < 0:
        raise ConfigError(f"num_experts={num_experts} must be 0 or more")
    if k * (1 + num_experts) > d_in:
        at = f" of {where}" if where else ""
        raise ConfigError(
            f"k·(1+num_experts) = {k}·{1 + num_experts} = {k * (1 + num_experts)} exceeds the input width "
            f"{d_in}{at}: with k={k} use num_experts ≤ {max_num_experts(d_in, k)}, "
            f"or with num_experts={num_experts} use k ≤ {d_in // (1 + num_experts)}"
        )


def frequency_order(counts_total: torch.Tensor) -> torch.Tensor:
    """Channels by decreasing count; equal counts keep increasing channel index."""
    counts = counts_total.to(torch.int64)
    # A stable sort of the negated counts keeps the index order among ties.
    return torch.sort(-counts, stable=True).indices


def split_channels(counts_total: torch.Tensor, k: int, num_experts: int, where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """``(C_s (k,), C_r (num_experts·k,))`` by rank of ``f_c`` (ties by channel index).

    ``C_r`` stays in frequency order, so position i of ``C_r`` is the (k+i)-th most frequent
    channel: the order that :func:`cooccurrence` and the clustering report use.
    """
    d_in = counts_total.numel()
    check_split(d_in, k, num_experts, where)
    order = frequency_order(counts_total)
    return order[:k].clone(), order[k : k * (1 + num_experts)].clone()


# --------------------------------------------------------------------------- co-occurrence


def _position_lookup(channels: torch.Tensor, d_in: int) -> torch.Tensor:
    """``(d_in,)`` position of each channel in ``channels``, -1 for channels outside it."""
    lookup = torch.full((d_in,), -1, dtype=torch.long, device=channels.device)
    lookup[channels.long()] = torch.arange(channels.numel(), device=channels.device)
    return lookup


def membership(topk: torch.Tensor, channels: torch.Tensor, d_in: int | None = None) -> torch.Tensor:
    """``O`` ``(T, n)`` float32: ``O[t, i] = 1`` when ``channels[i]`` is in token t's top-k set.

    ``topk`` ``(T, k)`` holds channel indices (any integer dtype, int16 as stored).
    """
    topk = topk.long()
    channels = channels.long().to(topk.device)
    T = topk.shape[0]
    n = channels.numel()
    if d_in is None:
        d_in = int(max(topk.max().item() if topk.numel() else -1, channels.max().item() if n else -1)) + 1
    lookup = _position_lookup(channels, max(d_in, 1))
    pos = lookup[topk]  # (T, k): position in C_r or -1
    O = torch.zeros(T, n + 1, device=topk.device)  # column n collects the channels outside C_r, then is dropped
    O.scatter_(1, torch.where(pos >= 0, pos, n), 1.0)
    return O[:, :n]


class CooccurrenceCounter:
    """Streaming co-occurrence of ``channels`` over chunks of per-token top-k indices.

    ``update`` adds integer counts (``Σ_t O[t,i]`` and ``Σ_t O[t,i] O[t,j]``), so the result
    after any chunking equals the batch result exactly.
    """

    def __init__(self, channels: torch.Tensor, d_in: int | None = None):
        self.channels = channels.long().clone()
        self.d_in = d_in
        n = self.channels.numel()
        self.n_tokens = 0
        self.single = torch.zeros(n, dtype=torch.int64)
        self.pair = torch.zeros(n, n, dtype=torch.int64)

    def update(self, topk_chunk: torch.Tensor) -> None:
        for start in range(0, topk_chunk.shape[0], CHUNK_TOKENS):
            part = topk_chunk[start : start + CHUNK_TOKENS]
            O = membership(part, self.channels, self.d_in)
            self.n_tokens += part.shape[0]
            self.single += O.sum(0).round().long().cpu()
            # Integer-valued float32 products are exact below 2^24 per chunk (CHUNK_TOKENS ≪ 2^24).
            self.pair += (O.T @ O).round().long().cpu()

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(p_i (n,), p_ij (n, n))`` float64."""
        T = max(self.n_tokens, 1)
        return self.single.double() / T, self.pair.double() / T


def cooccurrence(topk: torch.Tensor, channels: torch.Tensor, d_in: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p_i, p_ij)`` of ``channels`` over all tokens of ``topk`` ``(T, k)``."""
    counter = CooccurrenceCounter(channels, d_in)
    counter.update(topk)
    return counter.result()


def npmi(p_i: torch.Tensor, p_ij: torch.Tensor) -> torch.Tensor:
    """Normalized PMI ``S_ij = log(p_ij / (p_i p_j)) / (−log p_ij)`` (float64, ``(n, n)``).

    ``S_ij = −1`` where ``p_ij = 0`` (never together), ``1`` where ``p_ij = 1`` (always
    together); the diagonal is 1 wherever ``p_i > 0``. Symmetric, within [−1, 1].
    """
    p_i = p_i.double()
    p_ij = p_ij.double()
    p_ij = (p_ij + p_ij.T) / 2  # exact symmetry whatever rounding the caller's counts had
    outer = p_i[:, None] * p_i[None, :]
    inside = (p_ij > 0) & (p_ij < 1)
    safe_pij = torch.where(inside, p_ij, torch.full_like(p_ij, 0.5))
    safe_outer = torch.where(inside, outer, torch.full_like(outer, 0.25))
    S = torch.log(safe_pij / safe_outer) / (-torch.log(safe_pij))
    S = torch.where(inside, S, torch.where(p_ij >= 1, 1.0, -1.0))
    S = S.clamp(-1.0, 1.0)
    diag = torch.where(p_i > 0, 1.0, -1.0).to(S.dtype)
    S.diagonal().copy_(diag)
    return S


# --------------------------------------------------------------------------- clustering


def affinity_from_npmi(S: torch.Tensor) -> torch.Tensor:
    """``max(S, 0)`` with unit diagonal: spectral clustering needs a non-negative affinity."""
    A = S.double().clamp_min(0).clone()
    A.fill_diagonal_(1.0)
    return A


def equal_groups(n: int, num_clusters: int) -> torch.Tensor:
    """Labels of ``n`` items (in their given order) cut into ``num_clusters`` near-equal runs."""
    return torch.arange(n) * num_clusters // max(n, 1)


def canonical_labels(labels: torch.Tensor) -> torch.Tensor:
    """Relabel clusters in order of their first member, so equal partitions get equal labels."""
    labels = labels.long()
    mapping: dict[int, int] = {}
    for value in labels.tolist():
        if value not in mapping:
            mapping[value] = len(mapping)
    return torch.tensor([mapping[v] for v in labels.tolist()], dtype=torch.long)


def spectral_clusters(S: torch.Tensor, num_clusters: int, seed: int = 0, assign_labels: str = "kmeans") -> torch.Tensor:
    """Labels ``(n,)`` in ``[0, num_clusters)`` from spectral clustering of NPMI ``S``.

    Affinity ``max(S, 0)`` with unit diagonal, scikit-learn ``SpectralClustering`` (normalized
    Laplacian embedding, then ``assign_labels``: ``"kmeans"`` as in the paper or the
    deterministic ``"cluster_qr"``), seeded. Labels are canonical (numbered by first member).

    Degenerate inputs fall back, with a warning, to equal-size groups in the given channel
    order (frequency order for ``C_r``): an affinity with no positive off-diagonal entry,
    fewer distinct affinity rows than clusters, or a clustering that leaves a cluster empty.
    """
    n = S.shape[0]
    if num_clusters < 1:
        raise ConfigError(f"num_clusters={num_clusters} must be at least 1")
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    if num_clusters == 1:
        return torch.zeros(n, dtype=torch.long)
    if num_clusters >= n:
        return torch.arange(n) if num_clusters == n else _fallback(n, num_clusters, f"{n} channels for {num_clusters} clusters")
    A = affinity_from_npmi(S)
    off_diagonal = A - torch.eye(n, dtype=A.dtype)
    if not bool((off_diagonal > 0).any()):
        return _fallback(n, num_clusters, "no two channels co-occur more often than chance")
    distinct_rows = torch.unique(A, dim=0).shape[0]
    if distinct_rows < num_clusters:
        return _fallback(n, num_clusters, f"only {distinct_rows} distinct affinity rows")

    from sklearn.cluster import SpectralClustering
    from threadpoolctl import threadpool_limits

    model = SpectralClustering(
        n_clusters=num_clusters, affinity="precomputed", assign_labels=assign_labels, random_state=seed
    )
    # One thread: the problem is tiny (n ≤ a few hundred), and scikit-learn's OpenMP k-means
    # spends 5-7× longer in thread start-up than in work on a busy 2-core machine (measured).
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        # A disconnected co-occurrence graph is expected (groups that never meet); the
        # embedding still separates its components, so sklearn's warning is noise here.
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        warnings.filterwarnings("ignore", message="Array is not symmetric")
        labels = torch.as_tensor(model.fit_predict(A.numpy()), dtype=torch.long)
    if torch.unique(labels).numel() < num_clusters:
        return _fallback(n, num_clusters, "spectral clustering left a cluster empty")
    return canonical_labels(labels)


def _fallback(n: int, num_clusters: int, why: str) -> torch.Tensor:
    warnings.warn(
        f"spectral clustering of {n} channels into {num_clusters} groups is degenerate ({why}): "
        "using equal-size groups in frequency order",
        stacklevel=3,
    )
    return equal_groups(n, num_clusters)


def random_clusters(n: int, num_clusters: int, seed: int = 0) -> torch.Tensor:
    """Ablation "random clustering": a seeded random partition into near-equal groups."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.empty(n, dtype=torch.long)
    labels[torch.randperm(n, generator=g)] = equal_groups(n, num_clusters)
    return labels


def cluster_summary(S: torch.Tensor, labels: torch.Tensor) -> tuple[list[int], list[float]]:
    """Per cluster: its size and the mean NPMI over its distinct member pairs.

    A singleton cluster has no pair: its mean is reported as NaN (JSON writers turn it to null).
    """
    S = S.double()
    labels = labels.long()
    num = int(labels.max().item()) + 1 if labels.numel() else 0
    sizes, means = [], []
    for c in range(num):
        members = (labels == c).nonzero().flatten()
        sizes.append(int(members.numel()))
        if members.numel() < 2:
            means.append(float("nan"))
            continue
        block = S[members][:, members]
        off = block.sum() - block.diagonal().sum()
        means.append(float(off / (members.numel() * (members.numel() - 1))))
    return sizes, means


# --------------------------------------------------------------------------- token assignment


def token_expert_assignment(
    scores: torch.Tensor,
    channels: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    num_experts: int | None = None,
    topk: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expert of each token for fitting (docs/method.md, routed experts), ``(T,)`` long.

    ``scores`` ``(T, d_in)`` are the tokens' channel scores ``s_{t,c}``; ``channels`` is
    ``C_r`` and ``labels`` its groups ``G_i``. Token t goes to
    ``argmax_i Σ_{c ∈ C_t ∩ G_i} s_{t,c}`` with ``C_t`` = the token's top-k channels: the
    given ``topk`` ``(T, k)`` indices (as the statistics stored them), else computed from
    ``scores`` (a channel tying the k-th largest score counts as a member).

    A token whose top-k set holds no channel of ``C_r`` (zero mass in every group) goes to the
    group with the largest *total* score for that token: ``argmax_i Σ_{c ∈ G_i} s_{t,c}``,
    summing over all of the group's channels whether or not they are in its top-k set. Ties
    go to the lowest expert index.
    """
    num_experts = int(labels.max().item()) + 1 if num_experts is None else num_experts
    T, d_in = scores.shape
    device = scores.device
    channels = channels.long().to(device)
    labels = labels.long().to(device)
    group_onehot = torch.nn.functional.one_hot(labels, num_experts).float()  # (n, N)
    # group of every channel; channels outside C_r go to a dummy column N, dropped below
    group_of = torch.full((d_in,), num_experts, dtype=torch.long, device=device)
    group_of[channels] = labels
    out = torch.empty(T, dtype=torch.long, device=device)
    for start in range(0, T, CHUNK_TOKENS):
        s = scores[start : start + CHUNK_TOKENS].float()
        s_r = s[:, channels]  # (t, n)
        if topk is None:
            kth = s.topk(k, dim=1).values[:, -1:]  # (t, 1): the k-th largest score of each token
            mass = (s_r * (s_r >= kth)) @ group_onehot  # (t, N)
        else:
            idx = topk[start : start + CHUNK_TOKENS].long().to(device)
            mass = torch.zeros(s.shape[0], num_experts + 1, device=device)
            mass.scatter_add_(1, group_of[idx], s.gather(1, idx))
            mass = mass[:, :num_experts]
        total = s_r @ group_onehot  # (t, N)
        no_mass = mass.amax(dim=1) <= 0
        chosen = torch.where(no_mass[:, None], total, mass)
        out[start : start + CHUNK_TOKENS] = chosen.argmax(dim=1)
    return out
