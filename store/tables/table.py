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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import Conflict, Unprocessable
from . import eviction, rowdtype
from .admission import CountMinSketch
from .engine import DEFAULT_BUDGET, MapBudget, RowStore
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
    version: int = 0       # pushes applied
    step: int = 0          # optimizer step count (torch: one per parameter tensor)
    stamp: int = 0         # log stamp of the last applied push
    admitted: int = 0      # rows created
    refused: int = 0       # gradient rows dropped by admission
    evicted: int = 0       # rows evicted
    extra: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps({"name": self.name, "spec": self.spec.to_json(), "version": self.version,
                           "step": self.step, "stamp": self.stamp, "admitted": self.admitted,
                           "refused": self.refused, "evicted": self.evicted, "extra": self.extra},
                          sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Meta":
        d = json.loads(raw)
        return cls(d["name"], parse_spec(d["spec"]), d["version"], d["step"], d["stamp"],
                   d["admitted"], d["refused"], d["evicted"], d.get("extra", {}))


@dataclass(frozen=True)
class PushResult:
    version: int
    rows: int          # distinct IDs updated
    created: int       # rows admitted by this push
    refused: int       # distinct IDs whose gradient admission dropped
    evicted: int
    duplicate: bool = False  # stamp already applied: nothing changed

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "rows": self.rows, "created": self.created,
                "refused": self.refused, "evicted": self.evicted, "duplicate": self.duplicate}


def record_dtype(spec: TableSpec) -> np.dtype:
    """Packed record: last update version, the row (storage dtype), float32 optimizer state."""
    return np.dtype([("v", "<u8"), ("row", rowdtype.STORAGE[spec.dtype], (spec.dim,)),
                     ("state", "<f4", (state_width(spec.optimizer, spec.dim),))])


class TableState:
    def __init__(self, path: Path, meta: Meta, budget: MapBudget, sync: bool) -> None:
        self.path = Path(path)
        self.spec = meta.spec
        self.rec = record_dtype(self.spec)
        self.store = RowStore(self.path, self.rec.itemsize, budget=budget, sync=sync)
        self.sketch = CountMinSketch(self.spec.admission) if self.spec.admission else None
        with self.store.read() as txn:
            raw = self.store.meta_get(txn, META_KEY)
            self._meta = Meta.from_bytes(raw) if raw is not None else meta
            self._load_sketch(txn)
        if raw is None:
            with self.store.write() as txn:
                self.store.meta_put(txn, META_KEY, self._meta.to_bytes())

    @classmethod
    def create(cls, path: Path, name: str, spec: TableSpec, budget: MapBudget = DEFAULT_BUDGET,
               sync: bool = False) -> "TableState":
        if (Path(path) / "data.mdb").exists():
            raise Unprocessable(f"table directory {path} already holds a table")
        return cls(path, Meta(name, spec), budget, sync)

    @classmethod
    def open(cls, path: Path, budget: MapBudget = DEFAULT_BUDGET, sync: bool = False) -> "TableState":
        """Reopen a table: reads its meta record (and admission counters) only."""
        store = RowStore(Path(path), 1, budget=MapBudget(1 << 62))
        try:
            with store.read() as txn:
                raw = store.meta_get(txn, META_KEY)
        finally:
            store.close()
        if raw is None:
            raise Unprocessable(f"{path} holds no table")
        return cls(path, Meta.from_bytes(raw), budget, sync)

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
        with self.store.read() as txn:
            found, raw = self.store.get_records(txn, ukeys)
            version_raw = self.store.meta_get(txn, VERSION_KEY)
        version = int.from_bytes(version_raw, "little") if version_raw else 0
        recs = raw.view(self.rec).reshape(-1)
        rows = np.array(recs["row"])
        if not found.all():
            missing = ~found
            rows[missing] = rowdtype.encode(initial_rows(self.spec.initializer, ukeys[missing],
                                                          self.spec.dim), self.spec.dtype)
        return rows[inverse.reshape(-1)], version

    def lookup_f32(self, ids: np.ndarray) -> np.ndarray:
        return rowdtype.decode(self.lookup(ids)[0], self.spec.dtype)

    def rows_stored(self) -> int:
        with self.store.read() as txn:
            return self.store.count(txn)

    # ---- writes ----------------------------------------------------------------
    def push(self, ids: np.ndarray, grads: np.ndarray, stamp: int | None = None,
             base_version: int | None = None) -> PushResult:
        """Apply one push: duplicates summed, admission, the optimizer on the
        touched rows, eviction. All or nothing."""
        keys = table_keys(ids, self.spec.id_dtype)
        grads = self._check_grads(grads, len(keys))
        meta = self._meta
        if stamp is not None and stamp <= meta.stamp:
            return PushResult(meta.version, 0, 0, 0, 0, duplicate=True)
        lr_scale = self._lr_scale(base_version)
        ukeys, summed, counts = coalesce(keys, grads)
        try:
            with self.store.write() as txn:
                result, meta = self._apply(txn, meta, ukeys, summed, counts, lr_scale,
                                           stamp if stamp is not None else meta.stamp)
        except BaseException:
            if self.sketch is not None:  # counts added in the aborted transaction
                with self.store.read() as txn:
                    self._load_sketch(txn)
            raise
        self._meta = meta
        return result

    def _apply(self, txn: Any, meta: Meta, ukeys: np.ndarray, summed: np.ndarray, counts: np.ndarray,
               lr_scale: float, stamp: int) -> tuple[PushResult, Meta]:
        spec = self.spec
        version, step = meta.version + 1, meta.step + 1
        found, raw = self.store.get_records(txn, ukeys)
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
                    self.store.meta_put(txn, SKETCH_PREFIX + str(i).encode(), self.sketch.chunk(i))
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
            new_rows, new_state = apply_rows(spec.optimizer, rows32, np.asarray(recs["state"][idx]),
                                             summed[idx], step, lr_scale)
            if not np.isfinite(new_rows).all() or not np.isfinite(new_state).all():
                raise Unprocessable(f"table {meta.name!r}: this push would make rows non-finite "
                                    "(overflow); nothing was changed")
            stored = rowdtype.encode(new_rows, spec.dtype)
            if spec.dtype == "float16" and not np.isfinite(stored).all():
                raise Unprocessable(f"table {meta.name!r}: this push overflows float16 rows; "
                                    "nothing was changed")
            out = np.empty(len(idx), dtype=self.rec)
            out["v"] = version
            out["row"] = stored
            out["state"] = new_state
            self.store.put_records(txn, ukeys[idx], out.view(np.uint8).reshape(len(idx), -1))
            if spec.eviction is not None:
                self.store.lru_move(txn, ukeys[found], old_versions, version)
                self.store.lru_move(txn, ukeys[new & touch], None, version)
        evicted = self._evict(txn, version) if spec.eviction is not None else 0
        meta = replace(meta, version=version, step=step, stamp=stamp, admitted=meta.admitted + created,
                       refused=meta.refused + refused, evicted=meta.evicted + evicted)
        self.store.meta_put(txn, META_KEY, meta.to_bytes())
        self.store.meta_put(txn, VERSION_KEY, version.to_bytes(8, "little"))
        return PushResult(version, len(idx), created, refused, evicted), meta

    def _evict(self, txn: Any, version: int) -> int:
        spec = self.spec.eviction
        total = 0
        cutoff = eviction.ttl_cutoff(spec, version)
        if cutoff is not None:
            while True:
                vs, ks = self.store.lru_oldest(txn, 65536, before_version=cutoff)
                if not len(ks):
                    break
                self._drop(txn, vs, ks)
                total += len(ks)
        excess = eviction.excess_rows(spec, self.store.count(txn))
        if excess:
            vs, ks = self.store.lru_oldest(txn, excess)
            self._drop(txn, vs, ks)
            total += len(ks)
        return total

    def _drop(self, txn: Any, versions: np.ndarray, keys: np.ndarray) -> None:
        self.store.lru_delete(txn, versions, keys)
        self.store.delete_records(txn, keys)

    def _check_grads(self, grads: np.ndarray, n: int) -> np.ndarray:
        grads = np.asarray(grads)
        if n == 0:
            raise Unprocessable("empty push: give at least one ID")
        if grads.dtype.kind != "f":
            raise Unprocessable(f"grads: expected floats, got {grads.dtype}")
        if grads.ndim != 2 or grads.shape[0] != n:
            raise Unprocessable(f"grads: expected shape [{n}, {self.spec.dim}] (one row per ID), "
                                f"got {list(grads.shape)}")
        if grads.shape[1] != self.spec.dim:
            raise Unprocessable(f"grads: rows have {grads.shape[1]} values but table "
                                f"{self.name!r} has dim {self.spec.dim}")
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
            raise Conflict(f"base_version {base} is newer than table {self.name!r} (version {current})",
                           current_version=current)
        staleness = current - base
        if self.spec.staleness_policy == "scale":
            return 1.0 / (1 + staleness)
        if self.spec.max_staleness is not None and staleness > self.spec.max_staleness:
            raise Conflict(f"push to table {self.name!r} was computed on version {base}, {staleness} "
                           f"versions behind {current} (max_staleness {self.spec.max_staleness})",
                           current_version=current)
        return 1.0

    def _load_sketch(self, txn: Any) -> None:
        if self.sketch is None:
            return
        self.sketch.counters[:] = 0
        for i in range(self.sketch.chunks):
            raw = self.store.meta_get(txn, SKETCH_PREFIX + str(i).encode())
            if raw is not None:
                self.sketch.load_chunk(i, raw)

    # ---- description -------------------------------------------------------------
    def digest(self) -> str:
        """sha256 over everything replicated: scalars, every record in ID
        order, admission counters. Equal on replicas that applied the same pushes."""
        h = hashlib.sha256()
        with self.store.read() as txn:
            meta = Meta.from_bytes(self.store.meta_get(txn, META_KEY) or self._meta.to_bytes())
            h.update(json.dumps([meta.name, meta.spec.to_json(), meta.version, meta.step, meta.admitted,
                                 meta.refused, meta.evicted], sort_keys=True).encode())
            for keys, recs in self.store.iter_records(txn):
                h.update(keys.astype(">u8").tobytes())
                h.update(recs.tobytes())
            if self.sketch is not None:
                for i in range(self.sketch.chunks):
                    h.update(self.store.meta_get(txn, SKETCH_PREFIX + str(i).encode()) or b"")
        return "sha256:" + h.hexdigest()

    def info(self) -> dict[str, Any]:
        m = self._meta
        return {"name": m.name, "version": m.version, "rows": self.rows_stored(),
                "bytes_on_disk": self.store.disk_bytes(),
                "bytes_in_memory": (self.sketch.nbytes if self.sketch else 0),
                "record_bytes": self.rec.itemsize, "step": m.step, "admitted": m.admitted,
                "refused": m.refused, "evicted": m.evicted, "config": m.spec.to_json()}

    # ---- snapshots -----------------------------------------------------------------
    def begin_snapshot(self) -> Any:
        """Pin the table as it is now (call on the applier thread, between pushes)."""
        return self.store.begin_snapshot()

    def write_snapshot(self, pinned: Any, out: Any) -> int:
        """Stream a pinned state to `out`, a binary file or a socket (any
        thread; pushes go on meanwhile). Open the received file with `open`."""
        return self.store.write_snapshot(pinned, out)

    def close(self) -> None:
        self.store.close()
