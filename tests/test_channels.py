"""Channel split, co-occurrence, NPMI, clustering and token assignment (qe.analysis.channels)."""

import itertools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qe.analysis.channels import (
    CooccurrenceCounter,
    channel_frequencies,
    cluster_summary,
    cooccurrence,
    equal_groups,
    membership,
    npmi,
    random_clusters,
    spectral_clusters,
    split_channels,
    token_expert_assignment,
)
from qe.errors import ConfigError


def random_topk(T, d_in, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(T, d_in, generator=g).topk(k, dim=1).indices.to(torch.int16)


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to relabelling."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# --------------------------------------------------------------------------- frequencies and split


def test_frequencies_are_token_shares():
    counts = torch.tensor([10, 0, 5, 5])  # 10 tokens, k = 2: Σ m = 20
    f = channel_frequencies(counts, 2)
    assert torch.allclose(f, torch.tensor([1.0, 0.0, 0.5, 0.5], dtype=torch.float64))
    assert channel_frequencies(torch.zeros(4, dtype=torch.long), 2).abs().sum() == 0


def test_split_ranks_by_frequency_and_breaks_ties_by_index():
    counts = torch.tensor([3, 9, 3, 9, 1, 3, 0, 2])
    C_s, C_r = split_channels(counts, 2, 2)
    assert C_s.tolist() == [1, 3]
    assert C_r.tolist() == [0, 2, 5, 7]


@given(d_in=st.integers(4, 64), k=st.integers(1, 8), n=st.integers(0, 8), seed=st.integers(0, 999))
def test_split_sizes_or_error_naming_the_maximum(d_in, k, n, seed):
    counts = torch.randint(0, 5, (d_in,), generator=torch.Generator().manual_seed(seed))
    if k * (1 + n) > d_in:
        with pytest.raises(ConfigError, match=f"num_experts ≤ {d_in // k - 1}"):
            split_channels(counts, k, n)
        return
    C_s, C_r = split_channels(counts, k, n)
    assert C_s.numel() == k and C_r.numel() == n * k
    assert len(set(C_s.tolist()) | set(C_r.tolist())) == k * (1 + n)
    # every chosen channel is at least as frequent as every channel left out
    rest = torch.ones(d_in, dtype=torch.bool)
    rest[torch.cat([C_s, C_r])] = False
    if rest.any():
        assert counts[C_s].min() >= counts[rest].max() if n == 0 else counts[C_r].min() >= counts[rest].max()
    if n:
        assert counts[C_s].min() >= counts[C_r].max()


# --------------------------------------------------------------------------- co-occurrence


@given(T=st.integers(1, 60), d_in=st.integers(4, 24), k=st.integers(1, 4), n=st.integers(1, 12), seed=st.integers(0, 999))
def test_cooccurrence_equals_dense_reference(T, d_in, k, n, seed):
    k = min(k, d_in)
    n = min(n, d_in)
    topk = random_topk(T, d_in, k, seed)
    channels = torch.randperm(d_in, generator=torch.Generator().manual_seed(seed + 1))[:n]
    dense = torch.zeros(T, d_in)
    dense[torch.arange(T)[:, None], topk.long()] = 1
    O = dense[:, channels]
    p_i, p_ij = cooccurrence(topk, channels, d_in)
    assert torch.equal(membership(topk, channels, d_in), O)
    assert torch.allclose(p_i, O.double().mean(0))
    assert torch.allclose(p_ij, (O.double().T @ O.double()) / T)


@given(T=st.integers(2, 80), cuts=st.lists(st.integers(1, 79), max_size=4), seed=st.integers(0, 999))
def test_streaming_cooccurrence_equals_batch(T, cuts, seed):
    d_in, k = 20, 4
    topk = random_topk(T, d_in, k, seed)
    channels = torch.arange(3, 15)
    bounds = sorted({0, T, *[c for c in cuts if c < T]})
    counter = CooccurrenceCounter(channels, d_in)
    for lo, hi in itertools.pairwise(bounds):
        counter.update(topk[lo:hi])
    streamed = counter.result()
    batch = cooccurrence(topk, channels, d_in)
    assert counter.n_tokens == T
    assert torch.equal(streamed[0], batch[0]) and torch.equal(streamed[1], batch[1])


# --------------------------------------------------------------------------- NPMI


@given(T=st.integers(1, 50), seed=st.integers(0, 999))
def test_npmi_symmetric_bounded_unit_diagonal(T, seed):
    d_in, k = 12, 3
    topk = random_topk(T, d_in, k, seed)
    channels = torch.arange(d_in)
    p_i, p_ij = cooccurrence(topk, channels, d_in)
    S = npmi(p_i, p_ij)
    assert torch.equal(S, S.T)
    assert S.min() >= -1 and S.max() <= 1
    assert torch.all(S.diagonal()[p_i > 0] == 1)
    assert torch.all(S[p_ij == 0] == -1)


def test_npmi_special_values():
    # channel 0 and 1 always together; 2 never with them; 3 never seen
    p_i = torch.tensor([1.0, 1.0, 0.0, 0.0]).double()
    p_ij = torch.zeros(4, 4).double()
    p_ij[:2, :2] = 1.0
    S = npmi(p_i, p_ij)
    assert S[0, 1] == 1 and S[0, 2] == -1 and S[2, 2] == -1 and S[0, 0] == 1
    # independent channels: NPMI 0
    p_i = torch.tensor([0.5, 0.5]).double()
    p_ij = torch.tensor([[0.5, 0.25], [0.25, 0.5]]).double()
    assert abs(npmi(p_i, p_ij)[0, 1]) < 1e-12


# --------------------------------------------------------------------------- planted structure


def planted_scores(d_in, k, n_groups, T, seed, shared_p=0.8):
    """Scores where C_s (k channels) fills every top-k set of ~80% of tokens, and the other
    tokens take most of their top-k from one planted group of k channels.

    Returns scores (T, d_in), the planted C_s and the groups (n_groups, k)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(d_in, generator=g)
    C_s = perm[:k]
    groups = perm[k : k * (1 + n_groups)].reshape(n_groups, k)
    scores = torch.rand(T, d_in, generator=g)  # background < 1
    shared_token = torch.rand(T, generator=g) < shared_p
    group_of = torch.randint(n_groups, (T,), generator=g)
    scores[:, C_s] += 2 + torch.rand(T, k, generator=g)  # C_s: mid scores for every token
    # routed tokens: a random ~3/4 of their group's channels beat C_s
    active = (torch.rand(T, k, generator=g) < 0.75) & ~shared_token[:, None]
    scores.scatter_add_(1, groups[group_of], 5.0 * active)
    return scores, C_s, groups


@settings(max_examples=10)
@given(k=st.integers(2, 4), n_groups=st.integers(2, 4), extra=st.integers(0, 20), seed=st.integers(0, 10_000))
def test_planted_split_and_clusters_are_recovered(k, n_groups, extra, seed):
    d_in = k * (1 + n_groups) + extra
    scores, C_s, groups = planted_scores(d_in, k, n_groups, 2000, seed)
    topk = scores.topk(k, dim=1).indices.to(torch.int16)
    counts = torch.bincount(topk.long().flatten(), minlength=d_in)
    got_s, got_r = split_channels(counts, k, n_groups)
    assert set(got_s.tolist()) == set(C_s.tolist())
    assert set(got_r.tolist()) == set(groups.flatten().tolist())
    p_i, p_ij = cooccurrence(topk, got_r, d_in)
    labels = spectral_clusters(npmi(p_i, p_ij), n_groups, seed=seed)
    truth = torch.empty(d_in, dtype=torch.long)
    for i, members in enumerate(groups):
        truth[members] = i
    assert same_partition(labels, truth[got_r])
    sizes, means = cluster_summary(npmi(p_i, p_ij), labels)
    assert sizes == [k] * n_groups and min(means) > 0


# --------------------------------------------------------------------------- clustering edge cases


def test_degenerate_affinity_falls_back_to_equal_groups():
    S = -torch.ones(6, 6, dtype=torch.float64)
    S.fill_diagonal_(1)
    with pytest.warns(UserWarning, match="degenerate"):
        labels = spectral_clusters(S, 3)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert spectral_clusters(S, 1).tolist() == [0] * 6
    assert equal_groups(7, 3).tolist() == [0, 0, 0, 1, 1, 2, 2]


def test_too_few_distinct_rows_falls_back():
    S = torch.ones(6, 6, dtype=torch.float64)  # all identical rows
    with pytest.warns(UserWarning, match="distinct"):
        assert spectral_clusters(S, 3).tolist() == [0, 0, 1, 1, 2, 2]


def test_clustering_is_deterministic_and_canonical():
    scores, _, _ = planted_scores(30, 3, 3, 2000, 7)
    topk = scores.topk(3, dim=1).indices
    counts = torch.bincount(topk.flatten(), minlength=30)
    _, C_r = split_channels(counts, 3, 3)
    S = npmi(*cooccurrence(topk, C_r, 30))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = spectral_clusters(S, 3, seed=1)
    b = spectral_clusters(S, 3, seed=1)
    assert torch.equal(a, b)
    assert a[0] == 0  # numbered by first member


def test_cluster_summary_means():
    S = torch.tensor([[1, 0.5, -1], [0.5, 1, -1], [-1, -1, 1]], dtype=torch.float64)
    sizes, means = cluster_summary(S, torch.tensor([0, 0, 1]))
    assert sizes == [2, 1]
    assert means[0] == 0.5 and means[1] != means[1]  # NaN for a singleton


def test_random_clusters_equal_sizes_and_seeded():
    a = random_clusters(24, 4, seed=3)
    assert torch.bincount(a).tolist() == [6] * 4
    assert torch.equal(a, random_clusters(24, 4, seed=3))
    assert not torch.equal(a, random_clusters(24, 4, seed=4))


# --------------------------------------------------------------------------- token assignment


@given(T=st.integers(1, 40), seed=st.integers(0, 999))
def test_token_assignment_matches_reference(T, seed):
    d_in, k, n_groups = 16, 3, 3
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, d_in, generator=g)
    channels = torch.randperm(d_in, generator=g)[:6]
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    got = token_expert_assignment(scores, channels, labels, k, n_groups)
    for t in range(T):
        top = set(scores[t].topk(k).indices.tolist())
        mass = [sum(float(scores[t, c]) for c, l in zip(channels.tolist(), labels.tolist()) if l == i and c in top)
                for i in range(n_groups)]
        if max(mass) == 0:
            mass = [sum(float(scores[t, c]) for c, l in zip(channels.tolist(), labels.tolist()) if l == i)
                    for i in range(n_groups)]
        assert got[t] == max(range(n_groups), key=lambda i: (mass[i], -i))


@given(T=st.integers(1, 40), seed=st.integers(0, 999))
def test_token_assignment_with_stored_topk_equals_recomputed(T, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, 20, generator=g)
    channels = torch.randperm(20, generator=g)[:8]
    labels = torch.arange(8) % 3
    topk = scores.topk(4, dim=1).indices.to(torch.int16)
    assert torch.equal(token_expert_assignment(scores, channels, labels, 4, 3),
                       token_expert_assignment(scores, channels, labels, 4, 3, topk=topk))


def test_token_without_mass_goes_to_largest_total():
    scores = torch.tensor([[10.0, 9.0, 0.1, 0.3, 0.2, 0.0]])  # top-2 = {0, 1}: outside C_r
    channels = torch.tensor([2, 3, 4, 5])
    labels = torch.tensor([0, 0, 1, 1])  # group totals 0.4 and 0.2
    assert token_expert_assignment(scores, channels, labels, 2, 2).tolist() == [0]
    labels = torch.tensor([1, 0, 1, 1])  # group 0: 0.3 (the largest channel); group 1: 0.1 + 0.2 + 0.05
    scores[0, 5] = 0.05
    assert token_expert_assignment(scores, channels, labels, 2, 2).tolist() == [1]
