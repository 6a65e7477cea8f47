"""safetensors files written as a stream: the header first (every tensor's
dtype and shape known up front), then each tensor's bytes chunk by chunk, so
a file larger than memory is never built whole (table dumps, checkpoints)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from paramstore._wire import safetensors_head
from store.buffers import byte_view
from store.errors import CorruptData

PIECE = 1 << 20
ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "U8": 1}


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str  # safetensors code (F32, BF16, I64, ...)
    shape: tuple[int, ...]
    chunks: Callable[[], Iterator[np.ndarray]]  # called once, when the tensor's turn comes

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * ITEMSIZE[self.dtype]


def header(entries: list[Entry], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and the JSON header (padded to 8 bytes) of a file
    holding `entries` in this order."""
    return safetensors_head(((e.name, e.dtype, e.shape, e.nbytes) for e in entries), metadata)


def stream(entries: list[Entry], metadata: dict[str, str]) -> Iterator[bytes | memoryview]:
    """The file, in pieces of at most PIECE bytes, viewing the arrays' own
    buffers (no copies). A tensor whose chunks do not add up to its shape
    raises CorruptData (the stream is cut: a reader sees a short file)."""
    yield header(entries, metadata)
    for e in entries:
        sent = 0
        for chunk in e.chunks():
            data = byte_view(np.ascontiguousarray(chunk).reshape(-1)).cast("B")
            sent += len(data)
            if sent > e.nbytes:
                break
            for i in range(0, len(data), PIECE):
                yield data[i : i + PIECE]
        if sent != e.nbytes:
            raise CorruptData(f"{e.name}: {sent} bytes where its shape {list(e.shape)} needs {e.nbytes}")
