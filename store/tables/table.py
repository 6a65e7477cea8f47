"""`TableState`: the state machine of one embedding table on one shard.

Deterministic: the same pushes in the same order give the same bytes on every
replica (rows, optimizer state, admission counters, evictions). It knows
nothing of Raft or HTTP; the shard's applier feeds it committed pushes.

Each push carries the `stamp` of its log entry (any number that rises with the
log); the stamp of the last applied push is committed with the rows, so a push
replayed after a restart (stamp <= the table's) changes nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import NotFound, Unprocessable
from . import changes, describe, rowdtype
from .admission import CountMinSketch
from .engine import DEFAULT_BUDGET, Batch, MemoryBudget, RowStore
from .ids import table_keys
from .initial import initial_rows
from .push import PushPath, check_grads, lr_scale
from .records import META_KEY, VERSION_KEY, Meta, PushResult, record_dtype
from .rowopt import coalesce
from .spec import TableSpec
from .upkeep import PersistedSketch


class TableState:
    def __init__(self, store: RowStore, meta: Meta) -> None:
        self.store = store
        self.path = store.path
        self.spec = meta.spec
        self.rec = record_dtype(self.spec)
        store.record_size = self.rec.itemsize
        self._meta = meta
        self._admission = PersistedSketch(store, self.spec.admission) if self.spec.admission else None
        self._push = PushPath(store, self.spec, self.rec, self._admission)
        # readers on other threads (lookups, descriptions) finish before `close` closes the
        # database under them (a table deleted on the applier thread while it is read)
        self._readers = 0
        self._closed = False
        self._cv = threading.Condition()

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._cv:
            if self._closed:
                raise NotFound(f"table {self._meta.name!r} was deleted")
            self._readers += 1
        try:
            yield
        finally:
            with self._cv:
                self._readers -= 1
                self._cv.notify_all()

    @classmethod
    def create(
        cls,
        path: Path,
        name: str,
        spec: TableSpec,
        budget: MemoryBudget = DEFAULT_BUDGET,
        sync: bool = False,
        stamp: int = 0,
    ) -> TableState:
        """A new empty table; `stamp` is the log stamp of its create command
        (pushes replayed from before it change nothing)."""
        if Path(path).exists():
            raise Unprocessable(f"table directory {path} already exists")
        store = RowStore(Path(path), record_dtype(spec).itemsize, budget=budget, sync=sync)
        meta = Meta(name, spec, stamp=stamp, extra={changes.CHANGES_FROM: 0})
        batch = Batch()
        store.meta_put(batch, META_KEY, meta.to_bytes())
        store.meta_put(batch, VERSION_KEY, (0).to_bytes(8, "little"))
        store.write(batch)
        return cls(store, meta)

    @classmethod
    def open(cls, path: Path, budget: MemoryBudget = DEFAULT_BUDGET, sync: bool = False) -> TableState:
        """Reopen a table: reads its meta keys (and admission counters) only."""
        if not (Path(path) / "CURRENT").exists():
            raise Unprocessable(f"{path} holds no table")
        store = RowStore(Path(path), 0, budget=budget, sync=sync)
        raw = store.meta_get(META_KEY)
        if raw is None:
            store.close()
            raise Unprocessable(f"{path} holds no table")
        return cls(store, Meta.from_bytes(raw))

    @property
    def meta(self) -> Meta:
        return self._meta

    @property
    def sketch(self) -> CountMinSketch | None:
        """The admission counters (None: every ID is admitted)."""
        return self._admission.sketch if self._admission is not None else None

    @property
    def name(self) -> str:
        return self._meta.name

    @property
    def version(self) -> int:
        return self._meta.version

    # ---- reads ---------------------------------------------------------------
    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, int]:
        """Rows for `ids` in order, in the storage dtype (bfloat16 as uint16
        bits), and the table version they were read at. IDs without a row get
        their initial value. Never creates rows."""
        keys = table_keys(ids, self.spec.id_dtype)
        ukeys, inverse = np.unique(keys, return_inverse=True)
        with self.reading():
            found, raw, (version_raw,) = self.store.get_records(ukeys, meta=(VERSION_KEY,))
        version = int.from_bytes(version_raw, "little") if version_raw else 0
        recs = raw.view(self.rec).reshape(-1)
        rows = np.array(recs["row"])
        if not found.all():
            missing = ~found
            rows[missing] = rowdtype.encode(
                initial_rows(self.spec.initializer, ukeys[missing], self.spec.dim), self.spec.dtype
            )
        return rows[inverse.reshape(-1)], version

    def lookup_f32(self, ids: np.ndarray) -> np.ndarray:
        return rowdtype.decode(self.lookup(ids)[0], self.spec.dtype)

    def rows_stored(self) -> int:
        return self._meta.rows

    # ---- writes ----------------------------------------------------------------
    def push(
        self, ids: np.ndarray, grads: np.ndarray, stamp: int | None = None, base_version: int | None = None
    ) -> PushResult:
        """Apply one push: duplicates summed, admission, the optimizer on the
        touched rows, eviction. All or nothing."""
        keys = table_keys(ids, self.spec.id_dtype)
        grads = check_grads(self.spec, self.name, grads, len(keys))
        meta = self._meta
        if stamp is not None and stamp <= meta.stamp:
            return PushResult(meta.version, 0, 0, 0, 0, duplicate=True)
        scale = lr_scale(self.spec, self.name, meta.version, base_version)
        ukeys, summed, counts = coalesce(keys, grads)
        batch = Batch()
        try:
            result, meta = self._push.apply(
                batch, meta, ukeys, summed, counts, scale, stamp if stamp is not None else meta.stamp
            )
            self.store.write(batch)
        except BaseException:
            if self._admission is not None:  # counts added for a push that was not written
                self._admission.load()
            raise
        self._meta = meta
        return result

    def load(self, keys: np.ndarray, recs: np.ndarray, stamp: int, version: int = 0, step: int = 0) -> PushResult:
        """Write restored records (a checkpoint) as they are: rows, optimizer
        state, last-update versions. The part's version rises by one (the
        rows appear in the change log under it), to `version` if that is more;
        its step to `step` if more. IDs must be distinct."""
        meta = self._meta
        if stamp <= meta.stamp:
            return PushResult(meta.version, 0, 0, 0, 0, duplicate=True)
        if len(np.unique(keys)) != len(keys):
            raise Unprocessable(f"load into table {self.name!r}: IDs must be distinct")
        if len(recs) and int(recs["v"].max()) > max(meta.version + 1, version):
            raise Unprocessable(f"load into table {self.name!r}: a row's version is newer than the table's")
        if not (np.isfinite(rowdtype.decode(recs["row"], self.spec.dtype)).all() and np.isfinite(recs["state"]).all()):
            raise Unprocessable(f"load into table {self.name!r}: rows or optimizer state are not finite")
        new_version = max(meta.version + 1, version)
        batch = Batch()
        found, raw, _ = self.store.get_records(keys, fill=False)
        if self.spec.eviction is not None:
            self.store.lru_delete(batch, raw.view(self.rec).reshape(-1)["v"][found], keys[found])
            for v in np.unique(recs["v"]):
                at = recs["v"] == v
                self.store.lru_move(batch, keys[at], None, int(v))
        self.store.put_records(batch, keys, recs.view(np.uint8).reshape(len(keys), -1))
        created = int((~found).sum())
        meta = changes.record(self.store, batch, meta, new_version, keys, previous=meta.version)
        meta = replace(meta, version=new_version, step=max(meta.step, step), stamp=stamp, rows=meta.rows + created)
        self.store.meta_put(batch, META_KEY, meta.to_bytes())
        self.store.meta_put(batch, VERSION_KEY, new_version.to_bytes(8, "little"))
        self.store.write(batch)
        self._meta = meta
        return PushResult(new_version, len(keys), created, 0, 0)

    # ---- description -------------------------------------------------------------
    def digest(self) -> str:
        """sha256 over everything replicated: scalars, every record in ID
        order, admission counters. Equal on replicas that applied the same
        pushes (call it between pushes)."""
        with self.reading():
            return describe.digest(self._meta, self.store, self.sketch)

    def info(self) -> dict[str, Any]:
        with self.reading():
            on_disk, in_memory = self.store.disk_bytes(), self.store.memory_bytes()
        sketch_bytes = self.sketch.nbytes if self.sketch else 0
        return describe.info(self._meta, on_disk, in_memory + sketch_bytes, self.rec.itemsize)

    def cache_hits(self) -> tuple[int, int]:
        """(hits, misses) of this part's reads in the shared block cache, since opened here."""
        with self.reading():
            return self.store.cache_hits()

    def row_cache_hits(self) -> tuple[int, int]:
        """(hits, misses) of this part's record reads in its row cache, since opened here."""
        return self.store.row_cache_hits()

    # ---- snapshots -----------------------------------------------------------------
    def checkpoint(self, dest: Path) -> None:
        """A consistent copy of the table as it is now, in `dest` (hard links:
        O(files)). Call it between pushes, i.e. on the applier thread."""
        self.store.checkpoint(Path(dest))

    def close(self) -> None:
        """Close the database once the readers in progress are done (new ones get NotFound)."""
        with self._cv:
            self._closed = True
            self._cv.wait_for(lambda: self._readers == 0, timeout=60)
        self.store.close()
