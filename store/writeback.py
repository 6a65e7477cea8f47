"""Start writing dirty file pages to disk now, without waiting for it.

Replicas write large files (payloads, multi-GB snapshots). Left to the
kernel, their dirty pages pile up until writeback throttling stalls *every*
thread that dirties a page — including pysyncobj's tick thread, whose journal
is an mmap — and heartbeats are missed. `sync_file_range(SYNC_FILE_RANGE_WRITE)`
queues the writeback as the data is written and returns; it is Linux-only, so
elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import os

from .libc import LIBC

SYNC_FILE_RANGE_WRITE = 2

_sync_file_range = getattr(LIBC, "sync_file_range", None)  # not Linux: no such call
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def drop_cached(fd: int) -> None:
    """Let the kernel drop the file's clean cached pages now (call it after the
    data was synced: dirty pages would be written first, on this thread). A
    snapshot is read back only at restart or by a joining replica; kept in the
    page cache it pushes out memory the replicas need, and under sustained
    64 MB pushes every thread's allocations then stall in direct reclaim."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def start_writeback(fd: int, offset: int = 0, nbytes: int = 0) -> None:
    """Queue writeback of `nbytes` from `offset` (0 = to the end of the file)."""
    if _sync_file_range is not None and _sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE) != 0:
        err = ctypes.get_errno()
        if err not in (0, 38):  # ENOSYS: the file system cannot: nothing to do
            raise OSError(err, os.strerror(err))
