"""Hadamard matrices of any order qe meets, and seeded random orthogonal matrices.

An order ``n = 2^k · m`` is served by ``H_n = H_{2^k} ⊗ H_m``: ``H_{2^k}`` is Sylvester's
(a fast Walsh–Hadamard transform applies it in ``n log n``) and ``H_m`` a small matrix from a
Paley construction over a prime ``q``: type I (``q ≡ 3 mod 4``) gives order ``q + 1`` (12 from
q = 11), type II (``q ≡ 1 mod 4``) gives ``2(q + 1)`` (36 from q = 17). The widths of the
embedded default model are covered this way: 576 = 16 · 36, 1536 = 128 · 12. Every small
matrix is checked (``H Hᵀ = m I``) when it is built.

All matrices here are integer ±1 matrices in float64; :func:`hadamard_matrix` returns the
orthogonal ``H_n / √n``.
"""

from __future__ import annotations

from functools import cache, lru_cache

import torch

from qe.errors import ConfigError

_MAX_PRIME = 257  # small factors up to order 2·(257+1); larger ones are never needed in practice


def _primes(limit: int) -> list[int]:
    sieve = [True] * (limit + 1)
    sieve[0:2] = [False, False]
    for i in range(2, int(limit ** 0.5) + 1):
        if sieve[i]:
            sieve[i * i:: i] = [False] * len(sieve[i * i:: i])
    return [i for i, p in enumerate(sieve) if p]


def _legendre(a: int, q: int) -> int:
    a %= q
    if a == 0:
        return 0
    return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = χ(j − i)`` over GF(q) (q prime)."""
    chi = torch.tensor([_legendre(a, q) for a in range(q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def paley_i(q: int) -> torch.Tensor:
    """Order ``q + 1`` for a prime ``q ≡ 3 (mod 4)``: ``H = I + S``, ``S = [[0, 1ᵀ], [−1, Q]]``."""
    if q % 4 != 3:
        raise ConfigError(f"Paley construction I needs a prime q ≡ 3 (mod 4), got {q}")
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + s


def paley_ii(q: int) -> torch.Tensor:
    """Order ``2(q + 1)`` for a prime ``q ≡ 1 (mod 4)`` from the symmetric conference matrix
    ``C = [[0, 1ᵀ], [1, Q]]``: ``H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]]``."""
    if q % 4 != 1:
        raise ConfigError(f"Paley construction II needs a prime q ≡ 1 (mod 4), got {q}")
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    c[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def sylvester(p: int) -> torch.Tensor:
    """Sylvester's ``H_p`` (p a power of two), the matrix the fast Walsh–Hadamard transform applies."""
    if p < 1 or p & (p - 1):
        raise ConfigError(f"Sylvester's construction needs a power of two, got {p}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@cache
def _small_orders() -> dict[int, tuple[str, int]]:
    """Orders of the Paley matrices available, each with its construction (type I where both
    give an order: 12 from q = 11 rather than from q = 5)."""
    out: dict[int, tuple[str, int]] = {}
    primes = _primes(_MAX_PRIME)
    for q in primes:
        if q % 4 == 3:
            out[q + 1] = ("paley-i", q)
    for q in primes:
        if q % 4 == 1:
            out.setdefault(2 * (q + 1), ("paley-ii", q))
    return out


def factor_order(n: int) -> tuple[int, int] | None:
    """``(p, m)`` with ``n = p · m``, ``p`` a power of two and ``m`` the smallest order of a
    known non-Sylvester Hadamard matrix (``m = 1`` when ``n`` is a power of two); None when
    qe knows no Hadamard matrix of order ``n``."""
    if n < 1:
        return None
    if n & (n - 1) == 0:
        return n, 1
    small = _small_orders()
    candidates = []
    m = n
    while True:  # m = n / 2^j, so that n / m is a power of two
        if m in small:
            candidates.append(m)
        if m % 2:
            break
        m //= 2
    if not candidates:
        return None
    m = min(candidates)
    return n // m, m


def has_hadamard(n: int) -> bool:
    return factor_order(n) is not None


@lru_cache(maxsize=64)
def small_hadamard(m: int) -> torch.Tensor:
    """The ±1 matrix of order ``m`` (1, 2, a power of two, or a Paley order), checked."""
    if m & (m - 1) == 0:
        return sylvester(m)
    kind_q = _small_orders().get(m)
    if kind_q is None:
        raise ConfigError(f"no small Hadamard matrix of order {m} is known to qe")
    kind, q = kind_q
    h = paley_i(q) if kind == "paley-i" else paley_ii(q)
    if not torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64)):  # pragma: no cover - construction bug
        raise ConfigError(f"the Paley matrix of order {m} is not Hadamard")
    return h


def hadamard_matrix(n: int) -> torch.Tensor:
    """The orthogonal ``(H_p ⊗ H_m) / √n`` of order ``n`` (float64); a one-line error naming
    the way out when qe knows no Hadamard matrix of that order."""
    f = factor_order(n)
    if f is None:
        raise ConfigError(f"no Hadamard matrix of order {n} is known to qe (n = 2^k · m with m a Paley order, e.g. "
                          "12, 20, 28, 36): use rotate[kind=random] for the residual rotation, or online=false")
    p, m = f
    return torch.kron(sylvester(p), small_hadamard(m)) / n ** 0.5


def random_signs(n: int, seed: int) -> torch.Tensor:
    """``(n,)`` float32 ±1, seeded."""
    g = torch.Generator().manual_seed(int(seed))
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).float()


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A seeded Haar-random orthogonal ``(n, n)`` float64 matrix (QR of a Gaussian, signs fixed)."""
    g = torch.Generator().manual_seed(int(seed))
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))[None, :]


def hadamard_rows(x: torch.Tensor, signs: torch.Tensor | None = None) -> torch.Tensor:
    """``(x ⊙ signs) H_n`` (``H_n`` orthogonal, :func:`hadamard_matrix`) for every row of ``x``
    ``(r, n)``, in float64 by butterflies: ``n log n`` per row instead of a dense ``n × n``
    product, for folding rotations into weights."""
    r, n = x.shape
    f = factor_order(n)
    if f is None:
        hadamard_matrix(n)  # raises the one-line error
    p, m = f  # type: ignore[misc]
    y = x.double()
    if signs is not None:
        y = y * signs.double().to(y.device)
    y = y.reshape(r, p, m)
    if m > 1:
        y = y @ small_hadamard(m).to(y.device)
    return sylvester_butterflies(y).reshape(r, n) / n ** 0.5


def sylvester_butterflies(y: torch.Tensor) -> torch.Tensor:
    """``y`` ``(t, p, m)`` multiplied along its middle axis by Sylvester's ``H_p`` (unnormalised,
    ``p`` a power of two): ``log2 p`` butterfly stages, in ``y``'s dtype."""
    t, p, m = y.shape
    h = 1
    while h < p:
        y = y.reshape(t, p // (2 * h), 2, h, m)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(t, p, m)
