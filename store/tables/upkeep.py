"""A push's admission and eviction bookkeeping: the count-min sketch persisted
in chunks beside the rows, and the rows a push evicts. Both written into the
push's batch, so they commit (or not) with its rows."""

from __future__ import annotations

import numpy as np

from . import eviction
from .admission import CountMinSketch
from .engine import Batch, RowStore
from .records import SKETCH_PREFIX
from .spec import AdmissionSpec, EvictionSpec

MAX_TTL_EVICTIONS = 65536  # per push; older expired rows go with the next pushes


class PersistedSketch:
    """The admission sketch of one table and its chunks in the table's meta keys."""

    def __init__(self, store: RowStore, spec: AdmissionSpec) -> None:
        self.store = store
        self.spec = spec
        self.sketch = CountMinSketch(spec)
        self.load()

    def load(self) -> None:
        """The counters as committed (also drops counts of a push that was not written)."""
        self.sketch.counters[:] = 0
        for i in range(self.sketch.chunks):
            raw = self.store.meta_get(SKETCH_PREFIX + str(i).encode())
            if raw is not None:
                self.sketch.load_chunk(i, raw)

    def admit(self, batch: Batch, keys: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Count the pushes of `keys` (IDs without a row); which of them get one."""
        estimates, chunks = self.sketch.add(keys, counts)
        for i in chunks.tolist():
            self.store.meta_put(batch, SKETCH_PREFIX + str(i).encode(), self.sketch.chunk(i))
        admit: np.ndarray = estimates >= self.spec.min_count
        return admit


def evict(
    store: RowStore, spec: EvictionSpec, batch: Batch, version: int, touched: np.ndarray, rows: int
) -> np.ndarray:
    """Drop expired rows, then the least recently updated beyond max_rows;
    returns their IDs.
    The batch is not written yet, so the index still lists the rows this
    push touched under their old versions: those entries are skipped."""
    skip = set(touched.tolist())
    cutoff = eviction.ttl_cutoff(spec, version)
    vs, ks = (
        store.lru_oldest(MAX_TTL_EVICTIONS, before_version=cutoff, skip=skip)
        if cutoff is not None
        else (np.zeros(0, np.uint64), np.zeros(0, np.uint64))
    )
    excess = eviction.excess_rows(spec, rows - len(ks))
    if excess:
        more_v, more_k = store.lru_oldest(len(ks) + excess, skip=skip)
        more_v, more_k = more_v[len(ks) :], more_k[len(ks) :]
        vs, ks = np.concatenate([vs, more_v]), np.concatenate([ks, more_k])
        short = excess - len(more_k)
        if short > 0:  # this push created more rows than max_rows: its lowest IDs go
            victims = np.sort(touched)[:short]
            vs = np.concatenate([vs, np.full(short, version, dtype=np.uint64)])
            ks = np.concatenate([ks, victims])
    if len(ks):
        store.lru_delete(batch, vs, ks)
        store.delete_records(batch, ks)
    return ks
