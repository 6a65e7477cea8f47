"""`TableState`: the state machine of one embedding table on one shard.

Deterministic: the same pushes in the same order give the same bytes on every
replica (rows, optimizer state, admission counters, evictions). It knows
nothing of Raft or HTTP; the shard's applier feeds it committed pushes.

Each push carries the `stamp` of its log entry (any number that rises with the
log); the stamp of the last applied push is committed with the rows, so a push
replayed after a restart (stamp <= the table's) changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import Conflict, NotFound, Unprocessable
from . import eviction, rowdtype
from .admission import CountMinSketch
from .engine import DEFAULT_BUDGET, Batch, MemoryBudget, RowStore
from .ids import table_keys
from .initial import initial_rows
from .rowopt import apply_rows, coalesce, initial_state, state_width
from .spec import TableSpec, parse_spec

META_KEY = b"state"
VERSION_KEY = b"version"  # also in META_KEY; alone so a lookup reads 8 bytes, not JSON
SKETCH_PREFIX = b"sketch:"


@dataclass(frozen=True)
class Meta:
    """The replicated scalars of a table, committed with its rows."""

    name: str
    spec: TableSpec
    version: int = 0  # pushes applied
    step: int = 0  # optimizer step count (torch: one per parameter tensor)
    stamp: int = 0  # log stamp of the last applied push
    rows: int = 0  # rows stored
    admitted: int = 0  # rows created
    refused: int = 0  # gradient rows dropped by admission
    evicted: int = 0  # rows evicted
    extra: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "name": self.name,
                "spec": self.spec.to_json(),
                "version": self.version,
                "step": self.step,
                "stamp": self.stamp,
                "rows": self.rows,
                "admitted": self.admitted,
                "refused": self.refused,
                "evicted": self.evicted,
                "extra": self.extra,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Meta:
        d = json.loads(raw)
        return cls(
            d["name"],
            parse_spec(d["spec"]),
            d["version"],
            d["step"],
            d["stamp"],
            d["rows"],
            d["admitted"],
            d["refused"],
            d["evicted"],
            d.get("extra", {}),
        )


@dataclass(frozen=True)
class PushResult:
    version: int
    rows: int  # distinct IDs updated
    created: int  # rows admitted by this push
    refused: int  # distinct IDs whose gradient admission dropped
    evicted: int
    duplicate: bool = False  # stamp already applied: nothing changed

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "rows": self.rows,
            "created": self.created,
            "refused": self.refused,
            "evicted": self.evicted,
            "duplicate": self.duplicate,
        }


def record_dtype(spec: TableSpec) -> np.dtype:
    """Packed record: last update version, the row (storage dtype), float32 optimizer state."""
    return np.dtype(
        [
            ("v", "<u8"),
            ("row", rowdtype.STORAGE[spec.dtype], (spec.dim,)),
            ("state", "<f4", (state_width(spec.optimizer, spec.dim),)),
        ]
    )


MAX_TTL_EVICTIONS = 65536  # per push; older expired rows go with the next pushes


class TableState:
    def __init__(self, store: RowStore, meta: Meta) -> None:
        self.store = store
        self.path = store.path
        self.spec = meta.spec
        self.rec = record_dtype(self.spec)
        store.record_size = self.rec.itemsize
        self._meta = meta
        self.sketch = CountMinSketch(self.spec.admission) if self.spec.admission else None
        self._load_sketch()
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
        meta = Meta(name, spec, stamp=stamp)
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
        grads = self._check_grads(grads, len(keys))
        meta = self._meta
        if stamp is not None and stamp <= meta.stamp:
            return PushResult(meta.version, 0, 0, 0, 0, duplicate=True)
        lr_scale = self._lr_scale(base_version)
        ukeys, summed, counts = coalesce(keys, grads)
        batch = Batch()
        try:
            result, meta = self._apply(
                batch, meta, ukeys, summed, counts, lr_scale, stamp if stamp is not None else meta.stamp
            )
            self.store.write(batch)
        except BaseException:
            if self.sketch is not None:  # counts added for a push that was not written
                self._load_sketch()
            raise
        self._meta = meta
        return result

    def _apply(
        self,
        batch: Batch,
        meta: Meta,
        ukeys: np.ndarray,
        summed: np.ndarray,
        counts: np.ndarray,
        lr_scale: float,
        stamp: int,
    ) -> tuple[PushResult, Meta]:
        spec = self.spec
        version, step = meta.version + 1, meta.step + 1
        found, raw, _ = self.store.get_records(ukeys)
        recs = raw.view(self.rec).reshape(-1)
        touch = found.copy()
        new = ~found
        created = refused = 0
        if new.any():
            admit = np.ones(int(new.sum()), dtype=bool)
            if self.sketch is not None and spec.admission is not None:
                estimates, chunks = self.sketch.add(ukeys[new], counts[new])
                admit = estimates >= spec.admission.min_count
                for i in chunks.tolist():
                    self.store.meta_put(batch, SKETCH_PREFIX + str(i).encode(), self.sketch.chunk(i))
            new_idx = np.flatnonzero(new)[admit]
            touch[new_idx] = True
            created, refused = len(new_idx), int((~admit).sum())
            start = rowdtype.encode(initial_rows(spec.initializer, ukeys[new_idx], spec.dim), spec.dtype)
            recs["row"][new_idx] = start
            recs["state"][new_idx] = initial_state(spec.optimizer, len(new_idx), spec.dim)
        idx = np.flatnonzero(touch)
        old_versions = recs["v"][found].copy()
        if len(idx):
            rows32 = rowdtype.decode(recs["row"][idx], spec.dtype)
            new_rows, new_state = apply_rows(
                spec.optimizer, rows32, np.asarray(recs["state"][idx]), summed[idx], step, lr_scale
            )
            if not np.isfinite(new_rows).all() or not np.isfinite(new_state).all():
                raise Unprocessable(
                    f"table {meta.name!r}: this push would make rows non-finite (overflow); nothing was changed"
                )
            stored = rowdtype.encode(new_rows, spec.dtype)
            if spec.dtype == "float16" and not np.isfinite(stored).all():
                raise Unprocessable(f"table {meta.name!r}: this push overflows float16 rows; nothing was changed")
            out = np.empty(len(idx), dtype=self.rec)
            out["v"] = version
            out["row"] = stored
            out["state"] = new_state
            self.store.put_records(batch, ukeys[idx], out.view(np.uint8).reshape(len(idx), -1))
            if spec.eviction is not None:
                self.store.lru_move(batch, ukeys[found], old_versions, version)
                self.store.lru_move(batch, ukeys[new & touch], None, version)
        rows = meta.rows + created
        evicted = self._evict(batch, version, ukeys[idx], rows) if spec.eviction is not None else 0
        meta = replace(
            meta,
            version=version,
            step=step,
            stamp=stamp,
            rows=rows - evicted,
            admitted=meta.admitted + created,
            refused=meta.refused + refused,
            evicted=meta.evicted + evicted,
        )
        self.store.meta_put(batch, META_KEY, meta.to_bytes())
        self.store.meta_put(batch, VERSION_KEY, version.to_bytes(8, "little"))
        return PushResult(version, len(idx), created, refused, evicted), meta

    def _evict(self, batch: Batch, version: int, touched: np.ndarray, rows: int) -> int:
        """Drop expired rows, then the least recently updated beyond max_rows.
        The batch is not written yet, so the index still lists the rows this
        push touched under their old versions: those entries are skipped."""
        spec = self.spec.eviction
        skip = set(touched.tolist())
        cutoff = eviction.ttl_cutoff(spec, version)
        vs, ks = (
            self.store.lru_oldest(MAX_TTL_EVICTIONS, before_version=cutoff, skip=skip)
            if cutoff is not None
            else (np.zeros(0, np.uint64), np.zeros(0, np.uint64))
        )
        excess = eviction.excess_rows(spec, rows - len(ks))
        if excess:
            more_v, more_k = self.store.lru_oldest(len(ks) + excess, skip=skip)
            more_v, more_k = more_v[len(ks) :], more_k[len(ks) :]
            vs, ks = np.concatenate([vs, more_v]), np.concatenate([ks, more_k])
            short = excess - len(more_k)
            if short > 0:  # this push created more rows than max_rows: its lowest IDs go
                victims = np.sort(touched)[:short]
                vs = np.concatenate([vs, np.full(short, version, dtype=np.uint64)])
                ks = np.concatenate([ks, victims])
        if len(ks):
            self.store.lru_delete(batch, vs, ks)
            self.store.delete_records(batch, ks)
        return len(ks)

    def _check_grads(self, grads: np.ndarray, n: int) -> np.ndarray:
        grads = np.asarray(grads)
        if n == 0:
            raise Unprocessable("empty push: give at least one ID")
        if grads.dtype.kind != "f":
            raise Unprocessable(f"grads: expected floats, got {grads.dtype}")
        if grads.ndim != 2 or grads.shape[0] != n:
            raise Unprocessable(
                f"grads: expected shape [{n}, {self.spec.dim}] (one row per ID), got {list(grads.shape)}"
            )
        if grads.shape[1] != self.spec.dim:
            raise Unprocessable(
                f"grads: rows have {grads.shape[1]} values but table {self.name!r} has dim {self.spec.dim}"
            )
        grads = grads.astype(np.float32, copy=False)
        if not np.isfinite(grads).all():
            raise Unprocessable("grads contain NaN or Inf")
        return grads

    def _lr_scale(self, base: int | None) -> float:
        """Bounded staleness, as for tensors: reject, or scale lr by 1/(1+staleness)."""
        if base is None:
            return 1.0
        current = self._meta.version
        if base > current:
            raise Conflict(
                f"base_version {base} is newer than table {self.name!r} (version {current})", current_version=current
            )
        staleness = current - base
        if self.spec.staleness_policy == "scale":
            return 1.0 / (1 + staleness)
        if self.spec.max_staleness is not None and staleness > self.spec.max_staleness:
            raise Conflict(
                f"push to table {self.name!r} was computed on version {base}, {staleness} "
                f"versions behind {current} (max_staleness {self.spec.max_staleness})",
                current_version=current,
            )
        return 1.0

    def _load_sketch(self) -> None:
        if self.sketch is None:
            return
        self.sketch.counters[:] = 0
        for i in range(self.sketch.chunks):
            raw = self.store.meta_get(SKETCH_PREFIX + str(i).encode())
            if raw is not None:
                self.sketch.load_chunk(i, raw)

    # ---- description -------------------------------------------------------------
    def digest(self) -> str:
        """sha256 over everything replicated: scalars, every record in ID
        order, admission counters. Equal on replicas that applied the same
        pushes (call it between pushes)."""
        h = hashlib.sha256()
        meta = self._meta
        h.update(
            json.dumps(
                [
                    meta.name,
                    meta.spec.to_json(),
                    meta.version,
                    meta.step,
                    meta.rows,
                    meta.admitted,
                    meta.refused,
                    meta.evicted,
                ],
                sort_keys=True,
            ).encode()
        )
        with self.reading():
            for keys, recs in self.store.iter_records():
                h.update(keys.astype(">u8").tobytes())
                h.update(recs.tobytes())
        if self.sketch is not None:
            h.update(self.sketch.counters.tobytes())
        return "sha256:" + h.hexdigest()

    def info(self) -> dict[str, Any]:
        m = self._meta
        with self.reading():
            on_disk, in_memory = self.store.disk_bytes(), self.store.memory_bytes()
        return {
            "name": m.name,
            "version": m.version,
            "rows": m.rows,
            "bytes_on_disk": on_disk,
            "bytes_in_memory": in_memory + (self.sketch.nbytes if self.sketch else 0),
            "record_bytes": self.rec.itemsize,
            "step": m.step,
            "admitted": m.admitted,
            "refused": m.refused,
            "evicted": m.evicted,
            "config": m.spec.to_json(),
        }

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
