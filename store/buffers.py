"""Receive buffers for large bodies and payloads.

A fresh `bytearray` is faulted in 4 KB page by page as it fills (on a VM each
fault is an exit to the hypervisor); numpy asks the kernel for transparent huge
pages on large allocations (madvise), which fault a fraction as often. Tensor
bytes are received once per push on every replica, so this is on the critical
path of large pushes (docs/architecture.md, "Write path", has the measurement).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeAlias

    from typing_extensions import Buffer

LARGE = 1 << 20  # below this a bytearray is as cheap and friendlier to small-body code

# The byte buffers payloads travel in: bodies, receive buffers, stored bytes.
Bytes: TypeAlias = "bytes | bytearray | memoryview | np.ndarray"


def receive_buffer(size: int) -> np.ndarray | bytearray:
    """A writable, contiguous byte buffer of `size` bytes (buffer protocol,
    `len()` = size); its contents are undefined until written."""
    if size >= LARGE:
        return np.empty(size, dtype=np.uint8)
    return bytearray(size)


# `memoryview(data)` for any `Bytes`: the builtin itself under a type that holds on every Python
# version (numpy's stubs make arrays buffers only from 3.12 on), so the hot paths pay no extra call.
byte_view = cast("Callable[[Bytes], memoryview]", memoryview)


def as_buffer(data: Bytes) -> Buffer:
    """`data` for APIs typed to take a buffer: numpy arrays are buffers, but numpy's type stubs
    say so only for Python >= 3.12. Costs nothing at run time."""
    return cast("Buffer", data)
