"""A worker-side LRU cache of table rows with a staleness bound in versions.

Each cached row remembers the shard it lives on and the version that shard's
part of the table had when the row was read (the lookup answer says). A row
is served from the cache only while the newest version of its shard the
worker has seen is at most `max_staleness` ahead of that; otherwise it counts
as stale and is fetched again. Capacity is in rows; least recently used rows
go first (recency is per batch: rows of one batch tie; a full cache frees
1/16 of its rows at a time). Not thread-safe: the
fetcher holds a lock around it.
"""

from __future__ import annotations

import numpy as np

ROW_OVERHEAD_BYTES = 40  # per cached row beyond its float32 values: ID, shard, version, recency, dict entry


class RowCache:
    def __init__(self, dim: int, max_rows: int, max_staleness: int) -> None:
        if max_rows < 0 or max_staleness < 0:
            raise ValueError("max_rows and max_staleness must be >= 0")
        self.dim = dim
        self.max_rows = max_rows
        self.max_staleness = max_staleness
        self.rows = np.empty((max_rows, dim), dtype=np.float32)
        self.ids = np.zeros(max_rows, dtype=np.int64)
        self.shard = np.zeros(max_rows, dtype=np.int64)
        self.version = np.zeros(max_rows, dtype=np.int64)
        self.used = np.zeros(max_rows, dtype=np.int64)  # batch counter of the last use
        self.in_use = np.zeros(max_rows, dtype=bool)
        self.slot_of: dict[int, int] = {}
        self.free = list(range(max_rows - 1, -1, -1))
        self.tick = 0
        self.hits = 0
        self.misses = 0  # never cached, evicted, or stale
        self.stale = 0  # of the misses: cached, but older than the bound

    @property
    def nbytes(self) -> int:
        return int(self.rows.nbytes)

    def __len__(self) -> int:
        return len(self.slot_of)

    def get(self, ids: np.ndarray, newest: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For distinct `ids`: their fresh cached rows, a mask of the IDs
        served, and the shard versions those rows were read at. `newest[s]`:
        the newest version of shard s seen so far."""
        self.tick += 1
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        read_at = np.zeros(len(ids), dtype=np.int64)
        slots = np.fromiter((self.slot_of.get(i, -1) for i in ids.tolist()), dtype=np.int64, count=len(ids))
        cached = slots >= 0
        fresh = cached.copy()
        s = slots[cached]
        fresh[cached] = newest[self.shard[s]] - self.version[s] <= self.max_staleness
        hit = slots[fresh]
        out[fresh] = self.rows[hit]
        read_at[fresh] = self.version[hit]
        self.used[hit] = self.tick
        n_hit = int(fresh.sum())
        self.hits += n_hit
        self.misses += len(ids) - n_hit
        self.stale += int(cached.sum()) - n_hit
        return out, fresh, read_at

    def put(self, ids: np.ndarray, rows: np.ndarray, shards: np.ndarray, versions: np.ndarray) -> None:
        """Cache distinct `ids`' rows read at `versions` of their `shards`,
        evicting the least recently used rows if full."""
        if self.max_rows == 0 or len(ids) == 0:
            return
        if len(ids) > self.max_rows:  # a batch larger than the cache: keep its first rows
            ids, rows, shards, versions = (a[: self.max_rows] for a in (ids, rows, shards, versions))
        id_list = ids.tolist()
        slots = np.fromiter((self.slot_of.get(i, -1) for i in id_list), dtype=np.int64, count=len(ids))
        new = slots < 0
        need = int(new.sum()) - len(self.free)
        if need > 0:
            self._evict(need, keep=slots[~new])
        for j in np.flatnonzero(new).tolist():
            slot = self.free.pop()
            slots[j] = slot
            self.slot_of[id_list[j]] = slot
        self.rows[slots] = rows
        self.ids[slots] = ids
        self.shard[slots] = shards
        self.version[slots] = versions
        self.used[slots] = self.tick
        self.in_use[slots] = True

    def _evict(self, n: int, keep: np.ndarray) -> None:
        """Free at least `n` of the least recently used slots, never one in
        `keep`. A full cache frees 1/16 of itself at once, so the sort over
        all slots runs once per many batches rather than on every one."""
        candidate = self.in_use.copy()
        candidate[keep] = False
        slots = np.flatnonzero(candidate)
        n = min(len(slots), max(n, self.max_rows // 16))
        if n < len(slots):
            slots = slots[np.argpartition(self.used[slots], n - 1)[:n]]
        for slot in slots.tolist():
            del self.slot_of[int(self.ids[slot])]
        self.in_use[slots] = False
        self.free.extend(slots.tolist())

    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0
