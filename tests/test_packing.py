"""Packing of b-bit codes into bytes: exact round trips and the documented bit layout."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qe.packing import pack, packed_columns, unpack


def reference_pack(codes: list[list[int]], bits: int) -> list[list[int]]:
    """The layout written plainly: each row a little-endian bit stream, code j at bits j·b …,
    padded with zero codes to a multiple of 8 codes."""
    out = []
    for row in codes:
        row = row + [0] * ((-len(row)) % 8)
        stream = 0
        for j, c in enumerate(row):
            stream |= c << (j * bits)
        n_bytes = len(row) * bits // 8
        out.append([(stream >> (8 * k)) & 0xFF for k in range(n_bytes)])
    return out


@st.composite
def code_matrices(draw):
    bits = draw(st.integers(2, 8))
    rows, cols = draw(st.integers(0, 5)), draw(st.integers(1, 41))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.uint8)
    if draw(st.booleans()):
        codes[:, ::3] = 2**bits - 1  # every bit set in places
    return codes, bits


@given(code_matrices())
def test_pack_unpack_round_trip_is_exact(problem):
    codes, bits = problem
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (codes.shape[0], packed_columns(codes.shape[1], bits))
    out = unpack(packed, bits, codes.shape[1])
    assert out.dtype == torch.uint8 and torch.equal(out, codes)


@given(code_matrices())
def test_packed_bytes_follow_the_documented_bit_stream(problem):
    codes, bits = problem
    assert pack(codes, bits).tolist() == reference_pack(codes.tolist(), bits)


def test_four_bits_are_nibbles_low_first_and_three_bits_fill_three_bytes():
    assert pack(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), 4).tolist() == [[0x21, 0x43, 0x65, 0x87]]
    assert pack(torch.tensor([[7, 0, 0, 0, 0, 0, 0, 0]]), 3).tolist() == [[7, 0, 0]]
    assert pack(torch.tensor([[0, 0, 0, 0, 0, 0, 0, 7]]), 3).tolist() == [[0, 0, 0xE0]]
    assert pack(torch.tensor([[3, 0, 1, 2]]), 2).tolist() == [[0b10010011, 0]]
    assert pack(torch.tensor([[255, 0, 128]]), 8).tolist() == [[255, 0, 128, 0, 0, 0, 0, 0]]


def test_codes_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="codes outside"):
        pack(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="1 to 8 bits"):
        pack(torch.tensor([[1]]), 9)
    with pytest.raises(ValueError, match="do not hold"):
        unpack(torch.zeros(2, 3, dtype=torch.uint8), 4, 16)
