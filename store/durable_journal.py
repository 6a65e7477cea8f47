"""A shard's Raft journal written with pwrite and made durable with fdatasync.

pysyncobj 0.3.17's FileJournal writes through an mmap it never syncs and
grows it by writing into pages past the end of a full disk (SIGBUS).
`DurableJournal` keeps its file format (store/journal.py describes it) and
its interface (pysyncobj calls `add`, `clear`, `deleteEntriesFrom`, ...), but:

- appends are `pwrite`s into space reserved with `posix_fallocate`, so a full
  disk is an `OSError(ENOSPC)` before anything is written, not a signal, and
  `has_room` lets the replica refuse writes before it gets there;
- nothing is synced per entry, and not on the Raft tick thread: with fsync
  on, `request_sync()` hands the entries appended so far to the journal's
  sync thread, which writes the header (end offset and durable mark) and
  fdatasyncs once for everything requested meanwhile (group commit), then
  raises `durable_index` and calls `on_durable`. The tick thread keeps
  sending heartbeats and votes during the fdatasync (etcd's WAL does the
  same; Raft thesis 10.2.1). store/pysyncobj_adapter.py acknowledges an
  append and counts the leader's own log towards a commit only up to
  `durable_index`. `sync()` is the blocking form (shutdown, tests);
- term and vote are written to `.meta` with fsync, rename and a directory
  fsync before `setCurrentTerm` returns, i.e. before pysyncobj grants a vote
  or answers an append of a new term;
- log compaction rewrites the file beside it and renames it (pysyncobj
  rewrites it in place, which a power cut can leave half done).

The durable mark: the header's 24-byte name field is "PYSYNCOBJ" padded to
16 bytes, then the end offset of the last *synced* batch (uint64; 0 in files
pysyncobj wrote, which FileJournal never reads). Everything before the mark
was fdatasynced before the header that names it was written, so a damaged
record at or past the mark is the torn tail of an unsynced batch (truncated
at start by `check_journal`), and one before it is corruption. The mark on
disk trails the end by the last batch until the sync thread settles it, once
a second between two batches (or at close): damage to that batch is cut as
a torn tail too, and the entries come back from the peers. That once-a-second
chore (a header sync and the meta file's sync, rename and directory sync)
also runs under continuous load; a batch that arrives meanwhile waits for it
(~1 ms on an SSD, measured in docs/benchmarks.md's small-write notes).

With `fsync=False` the same writes happen without fdatasync: a process
crash loses nothing, a power cut can lose what the page cache held.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

NAME = b"PYSYNCOBJ"
NAME_PAD = 16
HEADER = struct.Struct("<16sQ8sII")  # name, durable mark, version, format, end offset
FIRST_RECORD = HEADER.size
VERSION = b"0.3.17"
FORMAT = 1
RECORD_HEAD = struct.Struct("<IQQ")  # size, index, term
SIZE = struct.Struct("<I")
GROW_MIN = 1 << 20  # reserve at least this much at a time: one fallocate per MB of log
ROOM_RETRY = 0.5  # seconds between fallocate attempts while the disk is full
RESERVE = 4 << 20  # kept reserved ahead of the end: a replica takes writes only while it can

Entry = tuple[bytes, int, int]


def fsync_dir(path: Path) -> None:
    """Make a directory entry created or renamed inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def header_bytes(end: int, mark: int) -> bytes:
    return HEADER.pack(NAME.ljust(NAME_PAD, b"\0"), mark, VERSION.ljust(8, b"\0"), FORMAT, end)


def record_bytes(command: bytes, index: int, term: int) -> bytes:
    size = RECORD_HEAD.size - SIZE.size + len(command)
    return RECORD_HEAD.pack(size, index, term) + command + SIZE.pack(size)


def write_meta(path: Path, meta: dict[str, Any], durable: bool) -> None:
    """Replace `path` with `meta` (plain data, protocol 2 as pysyncobj writes
    it), atomically; with `durable`, on stable storage when this returns."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(pickle.dumps(meta, protocol=2))
        f.flush()
        if durable:
            os.fdatasync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


class DurableJournal:
    """pysyncobj's Journal interface (camelCase names are pysyncobj's)."""

    def __init__(self, path: str | Path, fsync: bool) -> None:
        from .journal import plain_loads  # journal.py imports this module's layout

        self.path = Path(path)
        self.fsync = fsync
        self._meta_path = Path(str(self.path) + ".meta")
        try:
            meta = plain_loads(self._meta_path.read_bytes()) if self._meta_path.exists() else {}
        except Exception:  # check_journal refused a damaged one already; a race with start is not worth dying for
            meta = {}
        self._meta: dict[str, Any] = meta if isinstance(meta, dict) else {}
        self._meta_saved = True
        created = not self.path.exists() or self.path.stat().st_size < HEADER.size
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if created:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, header_bytes(FIRST_RECORD, FIRST_RECORD), 0)
            self._datasync()
            if fsync:
                fsync_dir(self.path.parent)
        else:
            self._datasync()  # what a crashed process left in the page cache is below the mark from now on
        self._entries: list[Entry] = []
        self._end = self._load()
        self._mark = self._end  # check_journal cut any torn tail: what is there is on disk
        self._disk_mark = HEADER.unpack(os.pread(self._fd, HEADER.size, 0))[1]
        self._allocated = os.fstat(self._fd).st_size
        self._dirty = False  # entries added since the last sync request
        self._full_until = 0.0  # monotonic time before which has_room does not try again
        # The sync thread: the tick thread appends and asks; the sync thread
        # writes the header and fdatasyncs. `_io` is held by whoever writes the
        # header, syncs or replaces the file; `_gen` counts truncations and
        # compactions, so a request made before one is dropped (the
        # truncation synced what survived it).
        self._io = threading.Lock()
        self._cv = threading.Condition()
        self._gen = 0
        self._request: tuple[int, int, int] | None = None  # (gen, end offset, last index)
        self._durable_index = self._last_index()
        self._error: OSError | None = None
        self._closing = False
        self._chores = False  # settle the mark, save the commit index: the sync thread's, between batches
        self._meta_lock = threading.Lock()  # the tick thread (term, vote) and the sync thread write .meta
        self.on_durable: Callable[[], None] | None = None  # called on the sync thread after a sync
        self._thread: threading.Thread | None = None
        if fsync:
            self._thread = threading.Thread(target=self._sync_loop, name=f"fsync {self.path.name}", daemon=True)
            self._thread.start()

    # ---- reading ---------------------------------------------------------------
    def _load(self) -> int:
        head = os.pread(self._fd, HEADER.size, 0)
        end = HEADER.unpack(head)[4]
        data = os.pread(self._fd, end - FIRST_RECORD, FIRST_RECORD)
        off = 0
        while off < len(data):
            size, index, term = RECORD_HEAD.unpack_from(data, off)
            start = off + RECORD_HEAD.size
            self._entries.append((bytes(data[start : off + SIZE.size + size]), index, term))
            off += size + 2 * SIZE.size
        return FIRST_RECORD + off

    def __getitem__(self, item: Any) -> Any:
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    def _last_index(self) -> int:
        return self._entries[-1][1] if self._entries else 0

    @property
    def durable_index(self) -> int:
        """The last log index on stable storage (with fsync off: handed to the
        OS). Raises what the sync thread failed with: nothing past it can be
        acknowledged, as when the tick thread synced itself."""
        if self._error is not None:
            raise self._error
        return self._durable_index

    # ---- writing ---------------------------------------------------------------
    def add(self, command: bytes, idx: int, term: int) -> None:
        record = record_bytes(bytes(command), idx, term)
        self._reserve(self._end + len(record))
        os.pwrite(self._fd, record, self._end)  # into reserved space: no ENOSPC past this point
        self._entries.append((bytes(command), idx, term))
        self._end += len(record)
        self._dirty = True

    def has_room(self, headroom: int) -> bool:
        """Space is reserved for `headroom` more bytes of entries (reserving it
        now if need be); False on a full disk. Retried at most every
        ROOM_RETRY seconds while the disk stays full."""
        if self._end + headroom <= self._allocated:
            return True
        now = time.monotonic()
        if now < self._full_until:
            return False
        try:
            self._reserve(self._end + headroom)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            if self._full_until == 0.0:
                log.warning("Raft journal %s: disk full, refusing new writes until space is freed", self.path)
            self._full_until = now + ROOM_RETRY
            return False
        if self._full_until:
            log.warning("Raft journal %s: space available again, writes resume", self.path)
        self._full_until = 0.0
        return True

    def _reserve(self, upto: int) -> None:
        if upto <= self._allocated:
            return
        size = max(upto, self._allocated + max(GROW_MIN, self._allocated // 8))
        try:
            os.posix_fallocate(self._fd, 0, size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(self._fd, size)  # a file system without fallocate (FUSE, tmpfs of old)
        self._allocated = size

    def request_sync(self) -> None:
        """Tick thread: make every entry added so far durable, without waiting
        (with fsync off: at once, no fdatasync). Requests made while a sync
        runs are covered together by the next one."""
        if not self._dirty:
            return
        if self._thread is None:
            self.sync()
            return
        self._dirty = False
        with self._cv:
            self._request = (self._gen, self._end, self._last_index())
            self._cv.notify()

    def sync(self) -> None:
        """Write the header and, with fsync on, fdatasync: every entry added
        so far is on stable storage when this returns (blocking)."""
        self._dirty = False
        with self._io:
            self._drop_request()  # covered by this one
            self._sync_header(self._end, self._last_index())

    def _drop_request(self) -> None:
        with self._cv:
            self._request = None

    def _sync_header(self, end: int, last: int) -> None:
        """With `_io` held."""
        os.pwrite(self._fd, header_bytes(end, self._mark), 0)
        self._datasync()
        # on disk the mark lags one batch (it was written with this batch's records)
        self._disk_mark, self._mark = self._mark, end
        if last > self._durable_index:
            self._durable_index = last

    def _sync_loop(self) -> None:
        """Syncs requested batches first; when none waits, settles the mark
        and saves the commit index (also fdatasyncs, kept off the tick)."""
        while True:
            with self._cv:
                while self._request is None and not self._chores and not self._closing:
                    self._cv.wait()
                request, self._request = self._request, None
                chores = self._chores if request is None else False
                self._chores = self._chores and not chores
            if request is None and not chores:
                return
            try:
                if request is not None:
                    gen, end, last = request
                    with self._io:
                        if gen != self._gen:
                            continue
                        self._sync_header(end, last)
                else:
                    self._settle_mark()
                    self._save_meta()
            except OSError as e:  # EIO and the like: no later sync can vouch for these pages
                log.critical("Raft journal %s: fdatasync failed (%s); acknowledging nothing more", self.path, e)
                self._error = e
                return
            callback = self.on_durable
            if request is not None and callback is not None:
                callback()

    def _datasync(self) -> None:
        if self.fsync:
            os.fdatasync(self._fd)

    def _shrink(self, end: int) -> None:
        """Entries after `end` are gone. Durable at once: records written
        later over their place must not look like corruption of synced ones."""
        with self._io:
            self._drop_request()
            self._gen += 1
            self._end = end
            self._disk_mark = min(self._mark, end)
            os.pwrite(self._fd, header_bytes(self._end, self._disk_mark), 0)
            self._datasync()
            self._mark = end  # what survived was synced just now
            self._durable_index = self._last_index()
        self._dirty = False

    def clear(self) -> None:
        self._entries = []
        self._shrink(FIRST_RECORD)

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        removed = self._entries[entryFrom:]
        del self._entries[entryFrom:]
        end = self._end - sum(RECORD_HEAD.size + len(c) + SIZE.size for c, _, _ in removed)
        self._shrink(end)

    def deleteEntriesTo(self, entryTo: int) -> None:
        """Compaction: the kept entries go to a new file that replaces this one."""
        kept = self._entries[entryTo:]
        body = b"".join(record_bytes(c, i, t) for c, i, t in kept)
        end = FIRST_RECORD + len(body)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with self._io:  # the sync thread must not sync (or reuse) the fd closed here
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.pwrite(fd, header_bytes(end, end) + body, 0)
                if self.fsync:
                    os.fdatasync(fd)
            except BaseException:
                os.close(fd)
                tmp.unlink(missing_ok=True)
                raise
            os.replace(tmp, self.path)
            if self.fsync:
                fsync_dir(self.path.parent)
            os.close(self._fd)
            self._drop_request()
            self._gen += 1
            self._fd = fd
            self._entries = kept
            self._end = self._mark = self._disk_mark = end
            self._allocated = end
            self._durable_index = self._last_index()
        self._dirty = False

    # ---- term, vote, commit index ----------------------------------------------
    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        self._meta["raftCommitIndex"] = raftCommitIndex
        self._meta_saved = False

    def getRaftCommitIndex(self) -> int:
        return int(self._meta.get("raftCommitIndex", 1))

    def setCurrentTerm(self, term: int, votedForNodeId: str | None) -> None:
        """Durable before pysyncobj sends the vote or append answer that reflects it."""
        self._meta["currentTerm"] = term
        self._meta["votedForNodeId"] = votedForNodeId
        self._store_meta()

    def getCurrentTerm(self) -> int:
        return int(self._meta.get("currentTerm", 0))

    def getVotedForNodeId(self) -> str | None:
        vote: str | None = self._meta.get("votedForNodeId")
        return vote

    def onOneSecondTimer(self) -> None:
        if self._thread is None:
            self._save_meta()
            self._settle_mark()
        elif not self._meta_saved or self._disk_mark < self._mark:
            with self._cv:
                self._chores = True
                self._cv.notify()
        self.has_room(RESERVE)  # followers too: space for the leader's entries is taken before the disk fills

    def _settle_mark(self) -> None:
        """Move the mark on disk up to the end of the last sync, so that
        damage to the last synced batch is refused as corruption, not cut as
        a torn tail. The header names no later entries: they are not synced."""
        with self._io:
            if self._disk_mark < self._mark:
                self._disk_mark = self._mark
                os.pwrite(self._fd, header_bytes(self._mark, self._mark), 0)
                self._datasync()

    def _save_meta(self) -> None:
        if not self._meta_saved:
            self._store_meta()

    def _store_meta(self) -> None:
        with self._meta_lock:
            self._meta_saved = True  # before the copy: a change made meanwhile is saved next time
            meta = dict(self._meta)
            if "raftCommitIndex" in meta:  # a stored commit index never points past the durable log
                meta["raftCommitIndex"] = min(meta["raftCommitIndex"], max(self._durable_index, 1))
            write_meta(self._meta_path, meta, self.fsync)

    # ---- lifecycle ---------------------------------------------------------------
    def flush(self) -> None:
        self.sync()

    def _destroy(self) -> None:
        if self._fd < 0:
            return
        thread = self._thread
        if thread is not None:
            with self._cv:
                self._closing = True
                self._cv.notify()
            thread.join()
            self._thread = None
        try:
            self.sync()
            self._settle_mark()
            self._save_meta()
        finally:
            os.close(self._fd)
            self._fd = -1
