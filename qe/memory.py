"""Handing freed heap memory back to the operating system between steps of a long job.

glibc's allocator keeps what a process frees in its heap for reuse, and tensors between its
mmap threshold (which rises to 32 MB as large blocks are freed) and a few hundred bytes are
carved from that heap. A block-by-block job frees a block's worth of activations, weights and
calibration matrices of such sizes at every step and allocates slightly different ones at
the next, so the retained heap creeps up with the depth of the model while live tensors
stay small (measured in docs/results.md, models larger than memory). ``malloc_trim`` returns
the free pages, so what a step holds no longer depends on the steps before it.
"""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl, Windows)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):
        return None


def release_freed_memory() -> bool:
    """Return the heap's free pages to the operating system; whether anything could be done
    (False where the C library offers no way)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
