"""Receive buffers for large bodies and payloads.

A fresh 64 MB `bytearray` costs ~70 ms of page faults as it fills on this kind
of VM (4 KB pages, each fault a VM exit); numpy asks the kernel for
transparent huge pages on large allocations (madvise), and the same 64 MB
fills after ~11 ms of faults. Tensor bytes are received once per push on every
replica, so this is on the critical path of large pushes.
"""
from __future__ import annotations

import numpy as np

LARGE = 1 << 20  # below this a bytearray is as cheap and friendlier to small-body code


def receive_buffer(size: int) -> np.ndarray | bytearray:
    """A writable, contiguous byte buffer of `size` bytes (buffer protocol,
    `len()` = size); its contents are undefined until written."""
    if size >= LARGE:
        return np.empty(size, dtype=np.uint8)
    return bytearray(size)
