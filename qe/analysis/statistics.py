"""Streamed per-linear statistics of calibration inputs.

Statistics are accumulated batch by batch as the calibration tokens flow through a block;
no full activation matrix is kept. Linears that read the same input (a smoothing group, e.g.
q/k/v) share one :class:`InputStats` (Hessian, maxima, moments, token sample); each linear
has its own :class:`ImportanceStats`, because importance depends on its weight.

Token positions are global indices into the concatenated calibration stream, so the bounded
token sample (``sample_positions``) picks the same tokens for every linear of every block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from qe.errors import NumericalError
from qe.gram import gram_upper, mirror_upper_in_place
from qe.modality import MODALITIES

NUM_MODALITIES = len(MODALITIES)


def choose_sample_positions(total_tokens: int, max_tokens: int, seed: int = 0) -> torch.Tensor:
    """Sorted global positions of a uniform random token sample of at most ``max_tokens``."""
    if total_tokens <= max_tokens:
        return torch.arange(total_tokens)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(total_tokens, generator=g)[:max_tokens].sort().values


class InputStats:
    """Statistics of one linear input (shared by the linears that read it).

    * ``xtx``: ``Σ_t x_t x_tᵀ`` in float64 (the Hessian of the layer-wise objective, up to 2).
    * ``absmax``: ``max_t |x_tc|``; ``moments``: ``Σ x^p`` for p = 1..4 (mean, variance, kurtosis).
    * ``sample``: the inputs at the sampled global positions, with their modality.
    """

    def __init__(
        self,
        d_in: int,
        sample_positions: torch.Tensor | None = None,
        hessian: bool = True,
        moments: bool = True,
        where: str = "",
    ):
        self.d_in = d_in
        self.where = where
        self.n_tokens = 0
        self.n_by_modality = torch.zeros(NUM_MODALITIES, dtype=torch.long)
        self.absmax = torch.zeros(d_in)
        # Only the upper triangle is accumulated (a symmetric rank-k update does half a GEMM's
        # work); ``xtx`` mirrors it on read, in place: one d × d float64 matrix, not two
        # (0.5 GB each at an MLP width of 8,192).
        self._xtx_upper = torch.zeros(d_in, d_in, dtype=torch.float64) if hessian else None
        self._mirrored = False
        self._xtx_taken = False
        self.moments = torch.zeros(4, d_in, dtype=torch.float64) if moments else None
        self.sample_positions = sample_positions
        self._sample_chunks: list[torch.Tensor] = []
        self._sample_mod_chunks: list[torch.Tensor] = []

    def update(self, x: torch.Tensor, modality: torch.Tensor, offset: int, rows: torch.Tensor | None = None) -> None:
        """Add tokens ``x`` ``(T, d_in)`` whose global positions start at ``offset``; with
        ``rows``, ``x`` holds only those rows of the batch (a routed expert's tokens) and
        ``modality`` is theirs."""
        if self._xtx_taken:
            raise RuntimeError(f"the Hessian of {self.where or 'this input'} was handed over by take_xtx: "
                               "statistics cannot grow after it")
        x = x.detach().reshape(-1, self.d_in).float()
        T = x.shape[0]
        batch_absmax = x.abs().amax(0)
        # NaN and Inf propagate through amax: checking d_in values is as good as T·d_in.
        if not torch.isfinite(batch_absmax).all():
            raise NumericalError(f"NaN or Inf in the calibration inputs of {self.where}: check the model's dtype and the data")
        self.n_tokens += T
        self.n_by_modality += torch.bincount(modality.long(), minlength=NUM_MODALITIES)[:NUM_MODALITIES].cpu()
        self.absmax = torch.maximum(self.absmax, batch_absmax.cpu())
        if self._xtx_upper is not None:
            # fp32 product per batch, fp64 accumulation across batches (add_ promotes without a
            # float64 copy of the product)
            self._xtx_upper.add_(gram_upper(x).cpu())
            self._mirrored = False
        if self.moments is not None:
            x2 = x * x
            self.moments += torch.stack([x.sum(0), x2.sum(0), (x2 * x).sum(0), (x2 * x2).sum(0)]).double().cpu()
        if self.sample_positions is not None and rows is not None:
            keep = torch.isin(rows.cpu() + offset, self.sample_positions)
            if bool(keep.any()):
                self._sample_chunks.append(x[keep.to(x.device)].cpu())
                self._sample_mod_chunks.append(modality[keep.to(modality.device)].cpu())
        elif self.sample_positions is not None:
            pos = self.sample_positions
            lo = torch.searchsorted(pos, offset)
            hi = torch.searchsorted(pos, offset + T)
            if hi > lo:
                idx = (pos[lo:hi] - offset).to(x.device)
                self._sample_chunks.append(x[idx].cpu())
                self._sample_mod_chunks.append(modality[idx.cpu()].cpu())

    @property
    def xtx(self) -> torch.Tensor | None:
        """``Σ_t x_t x_tᵀ`` (float64, symmetric), or None when no Hessian is streamed.

        The accumulator itself, not a copy: read it after the streaming (a later ``update``
        changes it), and do not modify it (:meth:`take_xtx` hands it over to be modified).
        """
        if self._xtx_taken:
            raise RuntimeError(f"the Hessian of {self.where or 'this input'} was handed over by take_xtx and may "
                               "have been modified since: take it once, after every other reader")
        if self._xtx_upper is None:
            return None
        if not self._mirrored:
            mirror_upper_in_place(self._xtx_upper)
            self._mirrored = True
        return self._xtx_upper

    def take_xtx(self) -> torch.Tensor | None:
        """:attr:`xtx`, handed over to a caller that owns these statistics and may overwrite it
        (smoothing it where it lies saves a ``d × d`` copy: 0.5 GB at a width of 8,192); the
        statistics let go of it, and any later read of :attr:`xtx` is refused."""
        xtx = self.xtx
        self._xtx_upper, self._xtx_taken = None, True  # the caller's alone now, freed with it
        return xtx

    @property
    def sample(self) -> torch.Tensor:
        """``(S, d_in)`` sampled input tokens (float32)."""
        if not self._sample_chunks:
            return torch.zeros(0, self.d_in)
        if len(self._sample_chunks) > 1:
            self._sample_chunks = [torch.cat(self._sample_chunks)]
        return self._sample_chunks[0]

    @property
    def sample_modality(self) -> torch.Tensor:
        if not self._sample_mod_chunks:
            return torch.zeros(0, dtype=torch.int8)
        if len(self._sample_mod_chunks) > 1:
            self._sample_mod_chunks = [torch.cat(self._sample_mod_chunks)]
        return self._sample_mod_chunks[0]

    def median_abs(self, max_tokens: int = 2048) -> torch.Tensor:
        """Per-channel median of ``|x|`` over (at most ``max_tokens`` of) the token sample,
        the lower middle value for even counts as ``torch.median``. Cached: linears that share
        this input share it."""
        cached = getattr(self, "_median_abs", None)
        if cached is None:
            s = self.sample[:max_tokens]  # the sample is already a uniform random draw
            if s.shape[0] == 0:
                value = torch.full((self.d_in,), float("nan"))
            else:
                # numpy's introselect on contiguous rows is several times faster than a sort.
                rows = np.ascontiguousarray(s.abs().T.cpu().numpy())
                k = (rows.shape[1] - 1) // 2
                value = torch.from_numpy(np.partition(rows, k, axis=1)[:, k].copy())
            self._median_abs = cached = value
        return cached

    def mean(self) -> torch.Tensor:
        return (self.moments[0] / max(self.n_tokens, 1)).float()

    def kurtosis(self) -> torch.Tensor:
        """Per-channel excess-free (Pearson) kurtosis ``E[(x-μ)^4] / Var^2``."""
        n = max(self.n_tokens, 1)
        m1, m2, m3, m4 = (self.moments[i] / n for i in range(4))
        var = (m2 - m1**2).clamp_min(1e-30)
        c4 = m4 - 4 * m3 * m1 + 6 * m2 * m1**2 - 3 * m1**4
        return (c4 / var**2).float()


class ImportanceStats:
    """Per-token top-k importance of one linear's input channels (docs/method.md, channel importance).

    * ``counts[m, c]``: number of tokens of modality ``m`` whose top-k set holds channel c
      (``m_c`` split by modality).
    * ``score_sum[c]``: sum of scores (mean saliency = score_sum / n_tokens).
    * ``topk``: ``(T, k)`` int16 top-k channel indices of every token, in stream order, and
      ``topk_modality`` ``(T,)``: kept (2 bytes per index) so co-occurrence among ``C_r`` can be
      counted once ``C_r`` is known, without a second forward pass.
    """

    def __init__(self, d_in: int, k: int, channel_factor: torch.Tensor | None, estimator, keep_topk: bool = True, where: str = ""):
        if k > d_in:
            raise ValueError(f"k={k} exceeds the input width {d_in} of {where}")
        self.d_in, self.k = d_in, k
        self.where = where
        self.estimator = estimator
        self.channel_factor = channel_factor
        self.prepared = channel_factor is not None
        self.n_tokens = 0
        self.counts = torch.zeros(NUM_MODALITIES, d_in, dtype=torch.long)
        self.score_sum = torch.zeros(d_in, dtype=torch.float64)
        self.keep_topk = keep_topk
        self._topk_chunks: list[torch.Tensor] = []
        self._mod_chunks: list[torch.Tensor] = []
        self.recorded_scores: torch.Tensor | None = None
        self.record_range: tuple[int, int] | None = None

    def update(self, x: torch.Tensor, modality: torch.Tensor, offset: int) -> None:
        x = x.detach().reshape(-1, self.d_in).float()
        scores = self.estimator.score(x, self.channel_factor)
        T = scores.shape[0]
        idx = scores.topk(self.k, dim=1, sorted=False).indices  # (T, k): a set, order irrelevant
        mod = modality.long().to(idx.device)
        flat = (mod[:, None] * self.d_in + idx).reshape(-1)
        self.counts += torch.bincount(flat, minlength=NUM_MODALITIES * self.d_in).reshape(NUM_MODALITIES, self.d_in).cpu()
        self.score_sum += scores.sum(0, dtype=torch.float64).cpu()  # no T×d_in float64 copy
        self.n_tokens += T
        if self.keep_topk:
            self._topk_chunks.append(idx.to(torch.int16).cpu())
            self._mod_chunks.append(modality.to(torch.int8).cpu())
        if self.record_range is not None:
            lo, hi = max(self.record_range[0], offset), min(self.record_range[1], offset + T)
            if hi > lo:
                part = scores[lo - offset : hi - offset].cpu()
                self.recorded_scores = part if self.recorded_scores is None else torch.cat([self.recorded_scores, part])

    @property
    def topk(self) -> torch.Tensor:
        if len(self._topk_chunks) > 1:
            self._topk_chunks = [torch.cat(self._topk_chunks)]
        return self._topk_chunks[0] if self._topk_chunks else torch.zeros(0, self.k, dtype=torch.int16)

    @property
    def topk_modality(self) -> torch.Tensor:
        if len(self._mod_chunks) > 1:
            self._mod_chunks = [torch.cat(self._mod_chunks)]
        return self._mod_chunks[0] if self._mod_chunks else torch.zeros(0, dtype=torch.int8)

    def total_counts(self) -> torch.Tensor:
        return self.counts.sum(0)


@dataclass
class LinearStats:
    """Everything the pipeline streamed for one linear layer."""

    name: str  # full module name
    input: InputStats
    importance: ImportanceStats | None = None
    extra: dict = field(default_factory=dict)

    @property
    def hessian(self) -> torch.Tensor | None:
        return self.input.xtx
