"""Sending a file whose bytes a signed reply must digest, without copying
them through Python: each window of the file is mapped read-only, its slices
fed to the hasher from the mapping, and sent with sendfile (the kernel moves
the same page-cache pages to the socket). ~2x less CPU per GB than read +
hash + sendall (bench/hashes.py).

Mapped file pages count in the process's RSS while mapped: each slice is
dropped from the mapping (MADV_DONTNEED: the page cache keeps it) once
hashed and sent, so a send adds about one slice to the RSS, whatever the
file's size; 64 MB windows bound the address space.

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
SLICE = 1 << 20  # a multiple of the page size (madvise)


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
                    # out of this process's RSS at once (the page cache keeps the pages)
                    mapped.madvise(mmap.MADV_DONTNEED, start, end - start)
            finally:
                view.release()
        window_start += length


def send_file(f: BinaryIO, out: socket.socket | BinaryIO, size: int) -> None:
    """Send bytes [0, size) of `f` to `out` with sendfile, unhashed."""
    _sendfile(f, out, 0, size, size)


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
