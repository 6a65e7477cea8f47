"""The on-disk row engine of one table on one shard: a RocksDB database (via
`rocksdict`), chosen by measurement against LMDB (bench/table_engine.py;
docs/architecture.md, "Embedding tables").

One key space, by prefix:
- `r` + 8-byte big-endian ID -> packed record (last update version, row, optimizer state);
- `l` + 8-byte version + 8-byte ID -> b"" (only with eviction): least recently updated first;
- `m` + name -> the table's scalars (JSON), its version (8 bytes), admission counter chunks;
- `c` + 8-byte version -> the IDs (uint64) a push changed or evicted: the change
  log delta export reads (store/tables/changes.py), trimmed to the last versions.

A push is one WriteBatch: atomic. The write-ahead log is synced with every
push when `sync` is set (`raft.fsync`, on by default, as for the Raft
journal); without it a process crash loses nothing but a power loss may lose
the last pushes. Opening a table reads its meta keys only.

Memory: the process's tables share one budget (`MemoryBudget`, the cap):
part of it is the block cache (also index and filter blocks), the rest the
row caches (store/tables/rowcache.py) in front of each table; memtables are
bounded per table. Reads go through those caches and the kernel's page
cache, never a map of the table, so the process's RSS stays near the cap
whatever the table's size.

The row cache is write-through: `write` applies a batch's record puts and
deletes to it, in batch order, after RocksDB took the batch, under the
store's lock, and bumps the store's generation. Digests, checkpoints,
iteration and snapshots read RocksDB only.

Snapshots: `checkpoint` (a RocksDB checkpoint: hard links to the immutable
table files, plus a flush) pins the table in O(files); `send_dir` streams the
checkpoint's files with sendfile, so no byte of the table passes through
this process's memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np
import rocksdict

from ..errors import CorruptData
from ..hashed_send import Hasher, send_file, send_file_hashed
from .rowcache import RowCache, RowPool

ROW = b"r"
LRU = b"l"
META = b"m"
CHANGE = b"c"
WRITE_BUFFER_BYTES = 16 << 20


# The row caches' share of the cap; the block cache keeps the rest (index and
# filter blocks, the blocks of rows read past the row caches). Measured in
# docs/benchmarks.md ("Embedding tables", the split).
ROW_SHARE = 0.9


class MemoryBudget:
    """The memory all tables of a process share: one block cache and the row caches' pool."""

    def __init__(self, cache_bytes: int, row_share: float = ROW_SHARE) -> None:
        self.cache_bytes = cache_bytes
        self.rows = RowPool(int(cache_bytes * row_share))
        self.block_bytes = cache_bytes - self.rows.capacity
        self.cache = rocksdict.Cache(max(self.block_bytes, 1 << 20))

    def usage(self) -> int:
        """Block cache usage plus the bytes the row caches hold."""
        return int(self.cache.get_usage()) + self.rows.reserved


DEFAULT_BUDGET = MemoryBudget(256 << 20)


def row_keys(keys: np.ndarray) -> list[bytes]:
    raw = np.asarray(keys, dtype=np.uint64).astype(">u8").tobytes()
    return [ROW + raw[i : i + 8] for i in range(0, len(raw), 8)]


def lru_keys(version: int | np.ndarray, keys: np.ndarray) -> list[bytes]:
    pairs = np.empty((len(keys), 2), dtype=">u8")
    pairs[:, 0] = version
    pairs[:, 1] = keys
    raw = pairs.tobytes()
    return [LRU + raw[i : i + 16] for i in range(0, len(raw), 16)]


def _options(budget: MemoryBudget) -> rocksdict.Options:
    opts = rocksdict.Options(raw_mode=True)
    opts.create_if_missing(True)
    table = rocksdict.BlockBasedOptions()
    table.set_block_cache(budget.cache)
    table.set_cache_index_and_filter_blocks(True)
    table.set_pin_l0_filter_and_index_blocks_in_cache(True)
    table.set_bloom_filter(10, False)
    opts.set_block_based_table_factory(table)
    opts.set_compression_type(rocksdict.DBCompressionType.none())  # float rows do not compress
    opts.set_write_buffer_size(WRITE_BUFFER_BYTES)
    opts.set_max_write_buffer_number(2)
    opts.set_max_background_jobs(2)
    opts.set_keep_log_file_num(2)
    opts.set_max_open_files(512)
    # per-table counters, read for the block cache hit rate (RowStore.cache_hits);
    # 4,096-row gets measured 84.1 vs 83.8 ms median with and without (load ~25)
    opts.enable_statistics()
    return opts


def _open(path: Path, options: rocksdict.Options, **kw: Any) -> rocksdict.Rdict:
    # rocksdict opens an existing database's column families with default
    # options unless each is named: without `column_families`, a reopened table
    # (restart, joiner, frozen copy) read past the shared block cache (the cap)
    # through RocksDB's own per-table default cache.
    return rocksdict.Rdict(str(path), options, column_families={"default": options}, **kw)


_CACHE_COUNTERS = re.compile(r"^rocksdb\.block\.cache\.(hit|miss) COUNT : (\d+)$", re.M)


class Batch:
    """Writes of one push, applied atomically by `RowStore.write`."""

    def __init__(self) -> None:
        self.wb = rocksdict.WriteBatch(raw_mode=True)
        # record writes in order, for the row cache: (keys, records) put, or (keys, None) deleted
        self.rows: list[tuple[np.ndarray, np.ndarray | None]] = []

    def put(self, key: bytes, value: bytes) -> None:
        self.wb.put(key, value)

    def delete(self, key: bytes) -> None:
        self.wb.delete(key)


READ_RETRIES = 3  # cache-then-RocksDB reads overtaken by a write before reading under the lock


class RowStore:
    def __init__(self, path: Path, record_size: int, budget: MemoryBudget = DEFAULT_BUDGET, sync: bool = False) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.budget = budget
        self._options = _options(budget)
        self.db = _open(self.path, self._options)
        self.wopt = rocksdict.WriteOptions()
        self.wopt.sync = sync
        self._lock = threading.Lock()  # writes, and every use of the row cache
        self._generation = 0  # writes so far
        self.cache: RowCache | None = None
        self._record_size = 0
        self.record_size = record_size

    @property
    def record_size(self) -> int:
        return self._record_size

    @record_size.setter
    def record_size(self, size: int) -> None:
        """(Re)sizing records empties the row cache."""
        with self._lock:
            if self.cache is not None and size == self._record_size:
                return
            self._record_size = size
            if self.cache is not None:
                self.cache.close()
            self.cache = RowCache(size, self.budget.rows) if size else None

    # ---- reads (any thread) ------------------------------------------------------
    def get_records(
        self, keys: np.ndarray, meta: tuple[bytes, ...] = (), fill: bool = True
    ) -> tuple[np.ndarray, np.ndarray, list[bytes | None]]:
        """(found mask, records as (n, record_size) uint8 with zeros where
        absent, values of the `meta` keys), all as of one write.

        The row cache's hits are copied under the lock with the generation
        (writes so far); the misses and the meta keys are read from RocksDB
        in one multi-get (one RocksDB snapshot) outside it; back under the
        lock, if the generation is unchanged no write happened in between,
        so both halves are of that generation and the misses are cached
        (with `fill`; a push, which writes its rows through the cache
        anyway, reads without). Otherwise the read is redone, and after
        READ_RETRIES it is done under the lock, which writes wait for."""
        keys = np.asarray(keys, np.uint64)
        cache = self.cache
        if cache is None:
            return self._read_db(keys, meta)
        for _ in range(READ_RETRIES):
            out = self._read_through(cache, keys, meta, fill, held=False)
            if out is not None:
                return out
        with self._lock:
            out = self._read_through(cache, keys, meta, fill, held=True)
        assert out is not None
        return out

    def _read_through(
        self, cache: RowCache, keys: np.ndarray, meta: tuple[bytes, ...], fill: bool, held: bool
    ) -> tuple[np.ndarray, np.ndarray, list[bytes | None]] | None:
        """One attempt of `get_records`; None if a write came in between
        (never when the caller `held` the lock throughout)."""
        lock = contextlib.nullcontext() if held else self._lock
        with lock:
            generation = self._generation
            hit, hit_recs = cache.get(keys)
        miss = np.flatnonzero(~hit)
        found, recs, metas = self._read_db(keys[miss], meta)
        with lock:
            if self._generation != generation:
                return None
            if fill:
                cache.put(keys[miss][found], recs[found])
        return _merge(hit, hit_recs, miss, found, recs, metas)

    def _read_db(
        self, keys: np.ndarray, meta: tuple[bytes, ...] = ()
    ) -> tuple[np.ndarray, np.ndarray, list[bytes | None]]:
        """`get_records` from RocksDB alone: one multi-get."""
        if not len(keys) and not meta:
            return np.zeros(0, bool), np.zeros((0, self.record_size), np.uint8), []
        enc = row_keys(keys)
        got = cast(list[bytes | None], self.db.get(cast(Any, [META + m for m in meta] + enc)))
        metas, vals = got[: len(meta)], got[len(meta) :]
        mask = np.fromiter((v is not None for v in vals), dtype=bool, count=len(vals))
        out = np.zeros((len(vals), self.record_size), dtype=np.uint8)
        if mask.any():
            out[mask] = np.frombuffer(b"".join(v for v in vals if v is not None), dtype=np.uint8).reshape(
                -1, self.record_size
            )
        return mask, out, metas

    def meta_get(self, key: bytes) -> bytes | None:
        return self.db.get(META + key)

    def lru_oldest(
        self, limit: int, before_version: int | None = None, skip: set[int] | frozenset[int] = frozenset()
    ) -> tuple[np.ndarray, np.ndarray]:
        """Up to `limit` (versions, keys) of the least recently updated rows,
        oldest first, optionally only those updated before `before_version`,
        leaving out the IDs in `skip` (their entries are being moved)."""
        versions: list[int] = []
        keys: list[int] = []
        it = self.db.iter()
        it.seek(LRU)
        while it.valid() and len(keys) < limit:
            k = it.key()
            if not k.startswith(LRU):
                break
            v, key = (int(x) for x in np.frombuffer(k[1:], dtype=">u8"))
            if before_version is not None and v >= before_version:
                break
            if key not in skip:
                versions.append(v)
                keys.append(key)
            it.next()
        del it
        return np.array(versions, dtype=np.uint64), np.array(keys, dtype=np.uint64)

    def iter_records(self, batch: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All (keys, records) in key order, as they were when the iteration
        began (a RocksDB iterator reads one implicit snapshot)."""
        it = self.db.iter()
        it.seek(ROW)
        keys: list[bytes] = []
        vals: list[bytes] = []
        while it.valid():
            k = it.key()
            if not k.startswith(ROW):
                break
            keys.append(k[1:])
            vals.append(it.value())
            if len(keys) == batch:
                yield self._pack(keys, vals)
                keys, vals = [], []
            it.next()
        if keys:
            yield self._pack(keys, vals)
        del it

    def _pack(self, keys: list[bytes], vals: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        return (
            np.frombuffer(b"".join(keys), dtype=">u8").astype(np.uint64),
            np.frombuffer(b"".join(vals), dtype=np.uint8).reshape(-1, self.record_size),
        )

    def view(self) -> TableView:
        """A point-in-time view (a RocksDB snapshot) for reads by key."""
        return TableView(self)

    # ---- writes (the applier thread only) ---------------------------------------
    def write(self, batch: Batch) -> None:
        """Commit the batch; the row cache follows it (see the module's docstring)."""
        with self._lock:
            try:
                self.db.write(batch.wb, self.wopt)
            except BaseException:
                if self.cache is not None and batch.rows:  # not knowing what RocksDB kept, forget
                    self.cache.clear()
                raise
            finally:
                self._generation += 1
            if self.cache is not None:
                for keys, records in batch.rows:
                    if records is None:
                        self.cache.drop(keys)
                    else:
                        self.cache.put(keys, records)

    def put_records(self, batch: Batch, keys: np.ndarray, records: np.ndarray) -> None:
        """Records must not change until the batch is written."""
        records = np.ascontiguousarray(records, dtype=np.uint8).reshape(len(keys), self.record_size)
        raw = records.tobytes()
        n = self.record_size
        for i, k in enumerate(row_keys(keys)):
            batch.put(k, raw[i * n : (i + 1) * n])
        batch.rows.append((np.asarray(keys, np.uint64), records))

    def delete_records(self, batch: Batch, keys: np.ndarray) -> None:
        for k in row_keys(keys):
            batch.delete(k)
        batch.rows.append((np.asarray(keys, np.uint64), None))

    def lru_move(self, batch: Batch, keys: np.ndarray, old_versions: np.ndarray | None, new_version: int) -> None:
        if old_versions is not None and len(old_versions):
            for k in lru_keys(old_versions, keys):
                batch.delete(k)
        for k in lru_keys(new_version, keys):
            batch.put(k, b"")

    def lru_delete(self, batch: Batch, versions: np.ndarray, keys: np.ndarray) -> None:
        for k in lru_keys(versions, keys):
            batch.delete(k)

    def meta_put(self, batch: Batch, key: bytes, value: bytes) -> None:
        batch.put(META + key, value)

    def change_put(self, batch: Batch, version: int, keys: np.ndarray) -> None:
        batch.put(CHANGE + version.to_bytes(8, "big"), np.ascontiguousarray(keys, dtype="<u8").tobytes())

    def change_delete(self, batch: Batch, version: int) -> None:
        batch.delete(CHANGE + version.to_bytes(8, "big"))

    # ---- snapshots ---------------------------------------------------------------
    def checkpoint(self, dest: Path) -> None:
        """A consistent copy of the table as it is now in `dest` (must not
        exist): hard links to the table files, so O(files), not O(bytes).
        Call it between pushes (the applier thread)."""
        rocksdict.Checkpoint(self.db).create_checkpoint(str(dest))

    # ---- size ----------------------------------------------------------------------
    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    def memory_bytes(self) -> int:
        """The row cache, memtables and table readers (not the shared block cache)."""
        total = self.cache.nbytes if self.cache is not None else 0
        for prop in ("rocksdb.cur-size-all-mem-tables", "rocksdb.estimate-table-readers-mem"):
            total += int(self.db.property_int_value(prop) or 0)
        return total

    def cache_hits(self) -> tuple[int, int]:
        """(hits, misses) of this table's reads in the shared block cache since it was opened."""
        counts = dict(_CACHE_COUNTERS.findall(self._options.get_statistics() or ""))
        return int(counts.get("hit", 0)), int(counts.get("miss", 0))

    def row_cache_hits(self) -> tuple[int, int]:
        """(hits, misses) of record reads in this table's row cache since it was opened."""
        cache = self.cache
        return (cache.hits, cache.misses) if cache is not None else (0, 0)

    def close(self) -> None:
        with self._lock:
            if self.cache is not None:
                self.cache.close()
                self.cache = None
        self.db.close()


def _merge(
    hit: np.ndarray,
    hit_recs: np.ndarray,
    miss: np.ndarray,
    found: np.ndarray,
    recs: np.ndarray,
    metas: list[bytes | None],
) -> tuple[np.ndarray, np.ndarray, list[bytes | None]]:
    """`get_records`' answer from the cache's hits and RocksDB's reads of the misses (positions `miss`)."""
    if not len(miss):
        return hit, hit_recs, metas
    out = np.zeros((len(hit), recs.shape[1]), dtype=np.uint8)
    out[hit] = hit_recs
    out[miss] = recs
    mask = hit.copy()
    mask[miss] = found
    return mask, out, metas


class TableView:
    """A point-in-time view of a table (a RocksDB snapshot) for reads that
    must not see pushes applied meanwhile: meta keys and change-log entries,
    by key. (rocksdict 0.3's `Snapshot.iter` ignores the snapshot: it reads the
    table as of the iterator's creation, so reads of several passes go to a
    `FrozenTable` instead.)"""

    def __init__(self, store: RowStore) -> None:
        self.store = store
        self.snap = store.db.snapshot()

    def _get(self, key: bytes) -> bytes | None:
        try:
            value: bytes = self.snap[key]
        except KeyError:
            return None
        except Exception as e:  # rocksdict raises a bare Exception for a missing key
            if "not found" in str(e):
                return None
            raise
        return value

    def meta_get(self, key: bytes) -> bytes | None:
        return self._get(META + key)

    def changes(self, after: int, upto: int) -> Iterator[tuple[int, np.ndarray]]:
        """(version, IDs) of the change log entries in (after, upto], oldest first."""
        for version in range(after + 1, upto + 1):
            raw = self._get(CHANGE + version.to_bytes(8, "big"))
            if raw is not None:
                yield version, np.frombuffer(raw, dtype="<u8").astype(np.uint64)

    def close(self) -> None:
        del self.snap

    def __enter__(self) -> TableView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FrozenTable:
    """A table as it was at one point, for long reads (full exports,
    checkpoints): a RocksDB checkpoint of it (hard links, O(files)) opened
    read-only, deleted on `close`. Pushes go on meanwhile."""

    def __init__(self, store: RowStore, dest: Path) -> None:
        self.path = Path(dest)
        store.checkpoint(self.path)
        self.reader = RowStore.__new__(RowStore)
        self.reader.path, self.reader.budget = self.path, store.budget
        self.reader._record_size, self.reader.cache = store.record_size, None  # read once: no row cache
        try:
            self.reader.db = _open(self.path, _options(store.budget), access_type=rocksdict.AccessType.read_only())
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    def meta_get(self, key: bytes) -> bytes | None:
        return self.reader.meta_get(key)

    def records(self, batch: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self.reader.iter_records(batch)

    def close(self) -> None:
        if self.path.exists():
            self.reader.db.close()
            shutil.rmtree(self.path, ignore_errors=True)


# ---- moving a checkpoint between replicas ---------------------------------------------
# A stream is: for each file one JSON line {"name": relative path, "size"} then its
# bytes; then {"end": number of files}. Paths have at most one directory level.


def _files(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.is_file())


def send_dir(src: Path, out: BinaryIO | socket.socket, hasher: Hasher | None = None) -> int:
    """Stream every file under `src` to `out` (sendfile: the bytes go from
    the page cache to the socket or file without passing through this process).
    With `hasher`, every byte sent (file heads included) is fed to it on the
    way, hashed from a read-only mapping (store/hashed_send.py), for a signed stream."""
    sent = 0
    files = _files(src)
    for f in files:
        size = f.stat().st_size
        rel = f.relative_to(src).as_posix()
        _send_all(out, (json.dumps({"name": rel, "size": size}) + "\n").encode(), hasher)
        with open(f, "rb") as src_file:
            if os.fstat(src_file.fileno()).st_size < size:
                raise CorruptData(f"{f} shrank while being sent")
            if hasher is not None:
                send_file_hashed(src_file, out, size, hasher)
            else:
                send_file(src_file, out, size)
        sent += size
    _send_all(out, (json.dumps({"end": len(files)}) + "\n").encode(), hasher)
    return sent


def _send_all(out: BinaryIO | socket.socket, data: bytes | memoryview, hasher: Hasher | None = None) -> None:
    if hasher is not None:
        hasher.update(data)
    if isinstance(out, socket.socket):
        out.sendall(data)
    else:
        out.write(data)
        out.flush()


def _safe_relative(name: Any) -> Path:
    parts = name.split("/") if isinstance(name, str) else []
    if not 1 <= len(parts) <= 2 or any(p in ("", ".", "..") or "\\" in p for p in parts):
        raise CorruptData(f"table stream: bad file name {name!r}")
    return Path(*parts)


def receive_dir(src: BinaryIO, dest: Path, chunk: int = 1 << 20, hasher: Hasher | None = None) -> int:
    """Write a `send_dir` stream into `dest` (created; must not exist); with
    `hasher`, every byte read (file heads included) is fed to it."""
    dest = Path(dest)
    dest.mkdir(parents=True)
    received = files = 0
    try:
        while True:
            line = src.readline(4096)
            if hasher is not None:
                hasher.update(line)
            if not line.endswith(b"\n"):
                raise CorruptData("table stream ended early")
            head: dict[str, Any] = json.loads(line)
            if "end" in head:
                if head["end"] != files:
                    raise CorruptData(f"table stream: {files} files, trailer says {head['end']}")
                return received
            rel, size = _safe_relative(head.get("name")), head.get("size")
            if not isinstance(size, int) or size < 0:
                raise CorruptData(f"table stream: bad size in {head!r}")
            target = dest / rel
            target.parent.mkdir(exist_ok=True)
            with open(target, "wb") as f:
                left = size
                while left:
                    data = src.read(min(chunk, left))
                    if not data:
                        raise CorruptData("table stream ended early")
                    if hasher is not None:
                        hasher.update(data)
                    f.write(data)
                    left -= len(data)
            received += size
            files += 1
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
