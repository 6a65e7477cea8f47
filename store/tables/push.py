"""The push path of a table: checking a push, then applying its coalesced rows
to a batch (admission, the optimizer, eviction, the new `Meta`)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..errors import Unprocessable
from ..tensor_commands import staleness_scale
from . import changes, rowdtype
from .engine import Batch, RowStore
from .initial import initial_rows
from .records import META_KEY, VERSION_KEY, Meta, PushResult
from .rowopt import apply_rows, initial_state
from .spec import TableSpec
from .upkeep import PersistedSketch, evict


def check_grads(spec: TableSpec, name: str, grads: np.ndarray, n: int) -> np.ndarray:
    """`grads` as finite float32 rows, one per ID, or Unprocessable."""
    grads = np.asarray(grads)
    if n == 0:
        raise Unprocessable("empty push: give at least one ID")
    if grads.dtype.kind != "f":
        raise Unprocessable(f"grads: expected floats, got {grads.dtype}")
    if grads.ndim != 2 or grads.shape[0] != n:
        raise Unprocessable(f"grads: expected shape [{n}, {spec.dim}] (one row per ID), got {list(grads.shape)}")
    if grads.shape[1] != spec.dim:
        raise Unprocessable(f"grads: rows have {grads.shape[1]} values but table {name!r} has dim {spec.dim}")
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, refused just below
        out = np.ascontiguousarray(grads, dtype=np.float32)
    if not np.isfinite(out).all():
        raise Unprocessable("grads contain NaN or Inf (or values beyond float32)")
    return out


def lr_scale(spec: TableSpec, name: str, current: int, base: int | None) -> float:
    return staleness_scale(f"table {name!r}", base, current, spec.staleness_policy, spec.max_staleness)


class PushPath:
    """Writes one push into a batch; the caller writes the batch (all or nothing)."""

    def __init__(self, store: RowStore, spec: TableSpec, rec: np.dtype, admission: PersistedSketch | None) -> None:
        self.store = store
        self.spec = spec
        self.rec = rec
        self.admission = admission

    def apply(
        self,
        batch: Batch,
        meta: Meta,
        ukeys: np.ndarray,
        summed: np.ndarray,
        counts: np.ndarray,
        lr_scale: float,
        stamp: int,
    ) -> tuple[PushResult, Meta]:
        """`ukeys` distinct, `summed` their gradients, `counts` how often each was pushed."""
        version, step = meta.version + 1, meta.step + 1
        found, raw, _ = self.store.get_records(ukeys, fill=False)
        recs = raw.view(self.rec).reshape(-1)
        touch = found.copy()
        new = ~found
        created = refused = 0
        if new.any():
            created, refused = self._admit(batch, recs, ukeys, counts, new, touch)
        idx = np.flatnonzero(touch)
        if len(idx):
            self._update(batch, meta.name, recs, ukeys, summed, found, new & touch, idx, step, version, lr_scale)
        rows = meta.rows + created
        gone = np.zeros(0, np.uint64)
        if self.spec.eviction is not None:
            gone = evict(self.store, self.spec.eviction, batch, version, ukeys[idx], rows)
        evicted = len(gone)
        changed = np.union1d(ukeys[idx], gone) if len(gone) else ukeys[idx]  # ukeys: distinct already
        meta = changes.record(self.store, batch, meta, version, changed)
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

    def _admit(
        self, batch: Batch, recs: np.ndarray, ukeys: np.ndarray, counts: np.ndarray, new: np.ndarray, touch: np.ndarray
    ) -> tuple[int, int]:
        """Admission of the IDs without a row: the admitted get initial rows and
        state in `recs` and are marked in `touch`. Returns (created, refused)."""
        spec = self.spec
        admit = np.ones(int(new.sum()), dtype=bool)
        if self.admission is not None:
            admit = self.admission.admit(batch, ukeys[new], counts[new])
        new_idx = np.flatnonzero(new)[admit]
        touch[new_idx] = True
        start = rowdtype.encode(initial_rows(spec.initializer, ukeys[new_idx], spec.dim), spec.dtype)
        recs["row"][new_idx] = start
        recs["state"][new_idx] = initial_state(spec.optimizer, len(new_idx), spec.dim)
        return len(new_idx), int((~admit).sum())

    def _update(
        self,
        batch: Batch,
        name: str,
        recs: np.ndarray,
        ukeys: np.ndarray,
        summed: np.ndarray,
        found: np.ndarray,
        created: np.ndarray,
        idx: np.ndarray,
        step: int,
        version: int,
        lr_scale: float,
    ) -> None:
        """The optimizer step on the touched rows `idx`, written with their LRU entries."""
        spec = self.spec
        old_versions = recs["v"][found].copy()
        rows32 = rowdtype.decode(recs["row"][idx], spec.dtype)
        new_rows, new_state = apply_rows(
            spec.optimizer, rows32, np.asarray(recs["state"][idx]), summed[idx], step, lr_scale
        )
        if not np.isfinite(new_rows).all() or not np.isfinite(new_state).all():
            raise Unprocessable(f"table {name!r}: this push would make rows non-finite (overflow); nothing was changed")
        stored = rowdtype.encode(new_rows, spec.dtype)
        if spec.dtype == "float16" and not np.isfinite(stored).all():
            raise Unprocessable(f"table {name!r}: this push overflows float16 rows; nothing was changed")
        out = np.empty(len(idx), dtype=self.rec)
        out["v"] = version
        out["row"] = stored
        out["state"] = new_state
        self.store.put_records(batch, ukeys[idx], out.view(np.uint8).reshape(len(idx), -1))
        if spec.eviction is not None:
            self.store.lru_move(batch, ukeys[found], old_versions, version)
            self.store.lru_move(batch, ukeys[created], None, version)
