"""Packing of b-bit codes (2 ≤ b ≤ 8) into bytes, and back, exactly.

Layout: along the input dimension, every 8 consecutive codes form a little-endian bit
stream of ``b`` bytes (code j occupies bits ``j·b … j·b + b - 1``). For 4 bits this is the
usual nibble packing (low nibble first); for 3 bits, 8 codes fill 3 bytes; for 2 bits, 4
codes per byte; for 8 bits the bytes are the codes. Rows are padded with zero codes to a
multiple of 8 columns. The packed tensor is ``uint8`` of shape ``(rows, ceil(cols / 8) * b)``.
"""

from __future__ import annotations

import torch

PACK_BITS = range(1, 9)


def packed_columns(cols: int, bits: int) -> int:
    return -(-cols // 8) * bits


def _check_bits(bits: int) -> None:
    if bits not in PACK_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes: 1 to 8 bits")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``(rows, cols)`` integer codes in ``[0, 2^bits)`` into ``uint8``."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"pack expects a (rows, cols) matrix of codes, got shape {tuple(codes.shape)}")
    rows, cols = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes outside [0, {1 << bits}) cannot be packed into {bits} bits")
    pad = (-cols) % 8
    if pad:
        c = torch.cat([c, torch.zeros(rows, pad, dtype=torch.int64, device=c.device)], 1)
    if bits == 8:
        return c.to(torch.uint8)
    n8 = c.shape[1] // 8
    c = c.reshape(rows, n8, 8)
    shifts = torch.arange(8, device=c.device) * bits
    word = (c << shifts).sum(-1)  # (rows, n8): 8 codes of ≤ 7 bits fit in 56 bits, no sign bit touched
    byte_shifts = torch.arange(bits, device=c.device) * 8
    out = (word[..., None] >> byte_shifts) & 0xFF  # (rows, n8, bits)
    return out.reshape(rows, n8 * bits).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``(rows, cols)`` codes as ``uint8``."""
    _check_bits(bits)
    rows, width = packed.shape
    if width != packed_columns(cols, bits):
        raise ValueError(f"{width} packed bytes per row do not hold {cols} codes of {bits} bits")
    if bits == 8:
        return packed[:, :cols].to(torch.uint8)
    n8 = width // bits
    p = packed.to(torch.int64).reshape(rows, n8, bits)
    byte_shifts = torch.arange(bits, device=p.device) * 8
    word = (p << byte_shifts).sum(-1)  # (rows, n8)
    shifts = torch.arange(8, device=p.device) * bits
    codes = (word[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(rows, n8 * 8)[:, :cols].to(torch.uint8)
