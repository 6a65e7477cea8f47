"""`RowFetcher`: a batch's distinct IDs -> their rows, through the worker
cache (`RowCache`) and one lookup per shard touched, sent concurrently."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._rowcache import ROW_OVERHEAD_BYTES, RowCache
from ._table_shards import shard_of_ids


@dataclass
class FetchStats:
    batches: int = 0
    lookups: int = 0  # requests sent
    rows_fetched: int = 0
    bytes_fetched: int = 0  # row bytes received (float32 as stored)


class RowFetcher:
    """Thread-safe. `max_rows` = 0: no cache (every row is fetched);
    `max_bytes` bounds the cache in bytes instead."""

    def __init__(
        self, client: Any, table: str, max_rows: int = 0, max_staleness: int = 0, max_bytes: int | None = None
    ) -> None:
        info = client.table_info(table)
        self.client = client
        self.table = table
        self.dim = int(info["config"]["dim"])
        if max_bytes is not None:
            max_rows = int(max_bytes) // (4 * self.dim + ROW_OVERHEAD_BYTES)
        self.shards = len(info["shards"])
        self.newest = np.zeros(self.shards, dtype=np.int64)
        self.observe({int(s): int(p["version"]) for s, p in info["shards"].items()})
        self.cache = RowCache(self.dim, max_rows, max_staleness) if max_rows > 0 else None
        self.stats = FetchStats()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=self.shards, thread_name_prefix="paramstore-lookup")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def observe(self, versions: Mapping[int, int]) -> None:
        """Shard versions from any answer (lookups, pushes): the clock of the staleness bound."""
        for shard, version in versions.items():
            if 0 <= shard < self.shards and version > self.newest[shard]:
                self.newest[shard] = version

    def observe_push(self, result: Mapping[str, Any]) -> None:
        with self._lock:
            self.observe({int(s): int(part["version"]) for s, part in result.get("shards", {}).items()})

    def fetch(self, ids: np.ndarray) -> np.ndarray:
        """Rows (float32, len(ids) x dim) for distinct int64 `ids`."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        shard = shard_of_ids(ids, self.shards)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        with self._lock:
            self.stats.batches += 1
            if self.cache is None:
                todo = np.ones(len(ids), dtype=bool)
            else:
                rows, served, _ = self.cache.get(ids, self.newest)
                out[served] = rows[served]
                todo = ~served
        if todo.any():
            self._fetch_into(out, ids, shard, np.flatnonzero(todo))
        return out

    def _fetch_into(self, out: np.ndarray, ids: np.ndarray, shard: np.ndarray, idx: np.ndarray) -> None:
        groups = [idx[shard[idx] == s] for s in np.unique(shard[idx]).tolist()]

        def one(pos: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
            rows, versions = self.client.lookup_versions(self.table, ids[pos])
            return np.asarray(rows, dtype=np.float32), versions

        answers = [one(groups[0])] if len(groups) == 1 else list(self._pool.map(one, groups))
        with self._lock:
            for pos, (rows, versions) in zip(groups, answers, strict=True):
                out[pos] = rows
                self.observe(versions)
                self.stats.lookups += 1
                self.stats.rows_fetched += len(pos)
                self.stats.bytes_fetched += rows.nbytes
                if self.cache is not None:
                    s = int(shard[pos[0]])
                    read = np.full(len(pos), versions.get(s, 0), dtype=np.int64)
                    self.cache.put(ids[pos], rows, shard[pos], read)
