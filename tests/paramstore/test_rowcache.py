"""The worker row cache on its own: LRU order, the staleness bound, counters."""

from __future__ import annotations

import numpy as np

from paramstore._rowcache import RowCache


def rows(ids: list[int]) -> np.ndarray:
    return np.array([[i, -i] for i in ids], dtype=np.float32)


def put(cache: RowCache, ids: list[int], version: int = 0, shard: int = 0) -> None:
    n = len(ids)
    cache.put(np.array(ids), rows(ids), np.full(n, shard), np.full(n, version))


def test_least_recently_used_rows_go_first() -> None:
    cache = RowCache(dim=2, max_rows=3, max_staleness=0)
    newest = np.zeros(1, dtype=np.int64)
    put(cache, [1, 2, 3])
    cache.get(np.array([1, 3]), newest)  # 2 is now the least recently used
    put(cache, [4])
    out, hit, _ = cache.get(np.array([1, 2, 3, 4]), newest)
    assert hit.tolist() == [True, False, True, True]
    assert np.array_equal(out[hit], rows([1, 3, 4]))
    assert len(cache) == 3 and (cache.hits, cache.misses) == (5, 1)


def test_a_row_is_served_only_within_the_bound_of_its_shards_newest_version() -> None:
    cache = RowCache(dim=2, max_rows=10, max_staleness=2)
    put(cache, [1], version=5, shard=0)
    put(cache, [2], version=5, shard=1)
    newest = np.array([7, 8], dtype=np.int64)  # shard 0: 2 versions on (fresh); shard 1: 3 (stale)
    _, hit, read_at = cache.get(np.array([1, 2]), newest)
    assert hit.tolist() == [True, False] and read_at[0] == 5
    assert (cache.hits, cache.misses, cache.stale) == (1, 1, 1)
    put(cache, [2], version=8, shard=1)  # refetched: fresh again, same slot
    _, hit, _ = cache.get(np.array([2]), newest)
    assert hit.tolist() == [True] and len(cache) == 2


def test_a_batch_larger_than_the_cache_and_a_disabled_cache() -> None:
    cache = RowCache(dim=2, max_rows=2, max_staleness=0)
    put(cache, [1, 2, 3, 4])
    assert len(cache) == 2
    off = RowCache(dim=2, max_rows=0, max_staleness=0)
    put(off, [1])
    _, hit, _ = off.get(np.array([1]), np.zeros(1, dtype=np.int64))
    assert not hit.any() and off.hit_rate() == 0.0


def test_a_full_cache_frees_a_sixteenth_of_itself_at_once_oldest_first() -> None:
    cache = RowCache(dim=2, max_rows=32, max_staleness=0)
    newest = np.zeros(1, dtype=np.int64)
    for i in range(32):  # one batch each: 0 is the oldest
        cache.tick += 1
        put(cache, [i])
    cache.tick += 1
    put(cache, [100])
    _, hit, _ = cache.get(np.array([0, 1, 2, 100]), newest)
    assert hit.tolist() == [False, False, True, True] and len(cache) == 31
