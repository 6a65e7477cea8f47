"""Sending a file whose bytes a signed reply must digest, without copying
them through Python: each window of the file is mapped read-only, its slices
fed to the hasher from the mapping, and sent with sendfile (the kernel moves
the same page-cache pages to the socket). ~2x less CPU per GB than read +
hash + sendall (bench/hashes.py).

Windows bound what the mapping adds to the process's RSS (mapped file pages
count while mapped): 64 MB, whatever the file's size.

The file must not be written in place while it is sent: Raft snapshots are
renamed over, table checkpoints are hard links to immutable RocksDB files
and copies made for the checkpoint.
"""

from __future__ import annotations

import mmap
import os
import socket
from typing import BinaryIO, Protocol

WINDOW = 64 << 20  # a multiple of mmap.ALLOCATIONGRANULARITY
SLICE = 1 << 20


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...


def send_file_hashed(f: BinaryIO, out: socket.socket | BinaryIO, size: int, hasher: Hasher) -> None:
    """Send bytes [0, size) of `f` to `out` (a socket, or a file), fed to
    `hasher` first. ConnectionError if the file or the peer stops short."""
    window_start = 0
    while window_start < size:
        length = min(WINDOW, size - window_start)
        with mmap.mmap(f.fileno(), length, access=mmap.ACCESS_READ, offset=window_start) as mapped:
            mapped.madvise(mmap.MADV_SEQUENTIAL)
            view = memoryview(mapped)
            try:
                for start in range(0, length, SLICE):
                    end = min(start + SLICE, length)
                    hasher.update(view[start:end])
                    _sendfile(f, out, window_start + start, end - start, size)
            finally:
                view.release()
        window_start += length


def _sendfile(f: BinaryIO, out: socket.socket | BinaryIO, offset: int, count: int, size: int) -> None:
    end = offset + count
    while offset < end:
        if isinstance(out, socket.socket):
            sent = out.sendfile(f, offset, end - offset)
        else:
            out.flush()
            sent = os.sendfile(out.fileno(), f.fileno(), offset, end - offset)
        if sent == 0:
            raise ConnectionError(f"sending stopped at {offset} of {size} bytes")
        offset += sent
