"""The on-disk row engine of one table on one shard: an LMDB environment
(memory-mapped B+tree, one writer, MVCC readers), chosen by measurement
(bench/table_engine.py; docs/architecture.md "Embedding tables").

Databases in the environment:
- `rows`: 8-byte big-endian ID -> packed record (last update version, row, optimizer state);
- `lru`:  8-byte version + 8-byte ID -> b"" (only with eviction): least recently updated first;
- `meta`: b"state" -> JSON of the table's counters; b"sketch:<i>" -> admission counter chunks.

A write transaction commits atomically, so a process crash leaves the table
as of its last committed push (writes are not fsynced unless asked: like the
Raft journal, a power loss may lose the last pushes). Opening a table reads
only its meta record: nothing is scanned at restart.

The map is read through the kernel's page cache; mapped pages count in the
process's RSS (RssFile) until it unmaps them, and the kernel maps 64 KB around
every fault, so a lookup of n random rows maps ~85 KB x n. A `MapBudget` caps
that for all tables of a process: after each batch it reads RssFile and, once
it passed the baseline by more than the cap, releases every table's mapped
range with madvise(MADV_DONTNEED) (the data stays in the page cache, which the
kernel reclaims as needed). Without MDB_WRITEMAP the map is read-only and
LMDB writes with pwrite, so dropping mapped pages is always safe. Batches are
read in slices of `SLICE` rows so one batch overshoots the cap by ~100 MB at most.
"""
from __future__ import annotations

import ctypes
import os
import socket
import threading
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

import lmdb
import numpy as np

from ..libc import LIBC

MADV_DONTNEED = 4
PAGE = 4096
DEFAULT_MAP_SIZE = 1 << 38  # 256 GB of address space per table (no memory is reserved)

_madvise = getattr(LIBC, "madvise", None)
if _madvise is not None:
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _madvise.restype = ctypes.c_int


SLICE = 1024


def rss_file_bytes() -> int:
    """Resident file-backed mapped bytes of this process."""
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"RssFile:"):
                return int(line.split()[1]) * 1024
    return 0


class MapBudget:
    """A cap on the mapped table pages of one process (all its tables)."""

    def __init__(self, cap_bytes: int) -> None:
        self.cap_bytes = cap_bytes
        self._stores: "weakref.WeakSet[RowStore]" = weakref.WeakSet()
        self._lock = threading.Lock()
        self._baseline: int | None = None
        self.trims = 0

    def register(self, store: "RowStore") -> None:
        with self._lock:
            self._stores.add(store)
            if self._baseline is None:
                self._baseline = rss_file_bytes()

    def check(self) -> None:
        now = rss_file_bytes()
        if self._baseline is not None and now - self._baseline <= self.cap_bytes:
            return
        with self._lock:
            for store in list(self._stores):
                store.release_map()
            # what is left mapped is not ours (libraries, the Raft journal): the new baseline
            self._baseline = rss_file_bytes()
            self.trims += 1


DEFAULT_BUDGET = MapBudget(256 << 20)


def encode_keys(keys: np.ndarray) -> list[bytes]:
    raw = np.asarray(keys, dtype=np.uint64).astype(">u8").tobytes()
    return [raw[i:i + 8] for i in range(0, len(raw), 8)]


def lru_keys(version: int | np.ndarray, keys: np.ndarray) -> list[bytes]:
    pairs = np.empty((len(keys), 2), dtype=">u8")
    pairs[:, 0] = version
    pairs[:, 1] = keys
    raw = pairs.tobytes()
    return [raw[i:i + 16] for i in range(0, len(raw), 16)]


class RowStore:
    def __init__(self, path: Path, record_size: int, budget: MapBudget = DEFAULT_BUDGET,
                 map_size: int = DEFAULT_MAP_SIZE, sync: bool = False) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.record_size = record_size
        self.budget = budget
        self.env = lmdb.open(str(self.path), map_size=map_size, max_dbs=4, sync=sync, metasync=sync,
                             readahead=False, writemap=False, max_readers=256)
        self.rows_db = self.env.open_db(b"rows")
        self.lru_db = self.env.open_db(b"lru")
        self.meta_db = self.env.open_db(b"meta")
        self._region: tuple[int, int] | None = None
        budget.register(self)

    # ---- reads ---------------------------------------------------------------
    def get_records(self, txn: lmdb.Transaction, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, records as (n, record_size) uint8; zeros where absent)."""
        enc = encode_keys(keys)
        cur = txn.cursor(db=self.rows_db)
        found: dict[bytes, bytes] = {}
        for s in range(0, len(enc), SLICE):
            found.update(cur.getmulti(enc[s:s + SLICE]))
            self.budget.check()
        mask = np.fromiter((k in found for k in enc), dtype=bool, count=len(enc))
        out = np.zeros((len(enc), self.record_size), dtype=np.uint8)
        if mask.any():
            out[mask] = np.frombuffer(b"".join(found[k] for k, m in zip(enc, mask) if m),
                                      dtype=np.uint8).reshape(-1, self.record_size)
        return mask, out

    def meta_get(self, txn: lmdb.Transaction, key: bytes) -> bytes | None:
        v = txn.get(key, db=self.meta_db)
        return None if v is None else bytes(v)

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        with self.env.begin(buffers=False) as txn:
            yield txn

    @contextmanager
    def write(self) -> Iterator[lmdb.Transaction]:
        """One atomic write transaction: aborted if the block raises."""
        with self.env.begin(write=True) as txn:
            yield txn

    # ---- writes (inside `write()`) ----------------------------------------------
    def put_records(self, txn: lmdb.Transaction, keys: np.ndarray, records: np.ndarray) -> None:
        raw = np.ascontiguousarray(records, dtype=np.uint8).tobytes()
        n = self.record_size
        enc = encode_keys(keys)
        cur = txn.cursor(db=self.rows_db)
        for s in range(0, len(enc), SLICE):
            cur.putmulti(zip(enc[s:s + SLICE], (raw[i * n:(i + 1) * n] for i in range(s, min(len(enc), s + SLICE)))))
            self.budget.check()

    def delete_records(self, txn: lmdb.Transaction, keys: np.ndarray) -> None:
        for k in encode_keys(keys):
            txn.delete(k, db=self.rows_db)

    def lru_move(self, txn: lmdb.Transaction, keys: np.ndarray, old_versions: np.ndarray | None,
                 new_version: int) -> None:
        if old_versions is not None and len(old_versions):
            for k in lru_keys(old_versions, keys):
                txn.delete(k, db=self.lru_db)
        txn.cursor(db=self.lru_db).putmulti((k, b"") for k in lru_keys(new_version, keys))

    def lru_oldest(self, txn: lmdb.Transaction, limit: int, before_version: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Up to `limit` (versions, keys) of the least recently updated rows,
        oldest first, optionally only those updated before `before_version`."""
        versions, keys = [], []
        cur = txn.cursor(db=self.lru_db)
        if cur.first():
            for k in cur.iternext(keys=True, values=False):
                v, key = np.frombuffer(k, dtype=">u8")
                if len(keys) >= limit or (before_version is not None and int(v) >= before_version):
                    break
                versions.append(int(v))
                keys.append(int(key))
        return np.array(versions, dtype=np.uint64), np.array(keys, dtype=np.uint64)

    def lru_delete(self, txn: lmdb.Transaction, versions: np.ndarray, keys: np.ndarray) -> None:
        for k in lru_keys(versions, keys):
            txn.delete(k, db=self.lru_db)

    def meta_put(self, txn: lmdb.Transaction, key: bytes, value: bytes) -> None:
        txn.put(key, value, db=self.meta_db)

    def iter_records(self, txn: lmdb.Transaction, batch: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All (keys, records) in key order, `batch` rows at a time."""
        cur = txn.cursor(db=self.rows_db)
        keys: list[bytes] = []
        vals: list[bytes] = []
        if cur.first():
            for k, v in cur.iternext():
                keys.append(k)
                vals.append(v)
                if len(keys) == batch:
                    yield self._pack(keys, vals)
                    keys, vals = [], []
        if keys:
            yield self._pack(keys, vals)

    def _pack(self, keys: list[bytes], vals: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        self.budget.check()
        return (np.frombuffer(b"".join(keys), dtype=">u8").astype(np.uint64),
                np.frombuffer(b"".join(vals), dtype=np.uint8).reshape(-1, self.record_size))

    def count(self, txn: lmdb.Transaction) -> int:
        return int(txn.stat(self.rows_db)["entries"])

    # ---- snapshots ---------------------------------------------------------------
    def begin_snapshot(self) -> lmdb.Transaction:
        """A read transaction pinning the table as it is now; writes go on.
        Hand it to `write_snapshot` (any thread), which closes it."""
        return self.env.begin(buffers=False)

    def write_snapshot(self, txn: lmdb.Transaction, out: BinaryIO | socket.socket,
                       release_every: int = 64 << 20) -> int:
        """Stream the pinned state to `out` (a binary file or a socket) as a
        compact LMDB file; returns the bytes sent. LMDB copies from its map in
        C into a pipe on a helper thread; this thread forwards the pipe and
        unmaps the pages the copy touched every `release_every` bytes, so a
        table larger than RAM is never held by this process."""
        rfd, wfd = os.pipe()
        failure: list[BaseException] = []

        def copy() -> None:
            try:
                self.env.copyfd(wfd, compact=True, txn=txn)
            except BaseException as e:  # reported by the caller
                failure.append(e)
            finally:
                os.close(wfd)

        worker = threading.Thread(target=copy, name="table-snapshot-copy", daemon=True)
        worker.start()
        sent = since_release = 0
        send = out.sendall if isinstance(out, socket.socket) else out.write
        try:
            with os.fdopen(rfd, "rb", buffering=0) as pipe:
                while True:
                    chunk = pipe.read(1 << 20)
                    if not chunk:
                        break
                    send(chunk)
                    sent += len(chunk)
                    since_release += len(chunk)
                    if since_release >= release_every:
                        self.release_map()
                        since_release = 0
        finally:
            worker.join()
            txn.abort()
            self.release_map()
        if failure:
            raise failure[0]
        return sent

    # ---- size and memory -----------------------------------------------------
    def disk_bytes(self) -> int:
        try:
            return os.stat(self.path / "data.mdb").st_size
        except FileNotFoundError:
            return 0

    def release_map(self) -> None:
        """Unmap this table's pages from the process (they stay in the page cache)."""
        if _madvise is None:
            return
        if self._region is None:
            self._region = self._mapped_region()
        if self._region is not None:
            start, length = self._region
            _madvise(start, min(length, self.disk_bytes() + PAGE), MADV_DONTNEED)

    def _mapped_region(self) -> tuple[int, int] | None:
        target = str((self.path / "data.mdb").resolve())
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].strip() == target:
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    return lo, hi - lo
        return None

    def close(self) -> None:
        self.env.close()
