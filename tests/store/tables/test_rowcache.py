"""The row cache in front of RocksDB: the same answers as RocksDB alone
under pushes, evictions and loads; reads of one version while pushes race
them; within its bytes."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from store.tables.engine import MemoryBudget
from store.tables.rowcache import WAYS, RowCache, RowPool
from store.tables.spec import parse_spec
from store.tables.table import TableState


def check_consistent(cache: RowCache) -> None:
    used = cache.ticks[: cache.sets] != 0
    keys = cache.keys[: cache.sets][used]
    assert len(np.unique(keys)) == len(keys), "a key is cached twice"
    assert cache.count == int(used.sum())
    assert cache.nbytes == cache.sets * cache.set_bytes <= cache.pool.capacity


def test_cache_answers_as_a_dict_through_growth_crowded_sets_and_drops() -> None:
    rng = np.random.default_rng(3)
    pool = RowPool(300 * 8 * (8 + 16))  # ~300 sets: crowded, so sets fill and evict
    cache = RowCache(8, pool)
    ref: dict[int, bytes] = {}
    for step in range(200):
        keys = rng.integers(0, 20_000, int(rng.integers(1, 3000))).astype(np.uint64)
        recs = rng.integers(0, 256, (len(keys), 8), dtype=np.uint8)
        if step % 4 == 3:
            cache.drop(keys[:200])
            for k in keys[:200].tolist():
                ref.pop(k, None)
        else:
            cache.put(keys, recs)  # repeated keys: the last record wins
            for k, r in zip(keys.tolist(), recs, strict=True):
                ref[k] = r.tobytes()
        probe = rng.integers(0, 20_000, 2000).astype(np.uint64)
        hit, got = cache.get(probe)
        assert [ref.get(k) for k in probe[hit].tolist()] == [r.tobytes() for r in got]
        check_consistent(cache)
    assert cache.sets > 1 and pool.reserved == cache.nbytes  # it grew, within the pool
    assert cache.count > 0.5 * cache.sets * WAYS
    cache.close()
    assert pool.reserved == 0


def test_caches_share_their_pool_and_never_pass_it() -> None:
    pool = RowPool(64 << 10)
    a, b = RowCache(100, pool), RowCache(40, pool)
    for cache in (a, b):
        keys = np.arange(5000, dtype=np.uint64)
        cache.put(keys, np.zeros((5000, cache.record_size), np.uint8))
        check_consistent(cache)
    assert a.nbytes > 0 and b.nbytes > 0 and pool.reserved == a.nbytes + b.nbytes <= pool.capacity
    assert pool.capacity - pool.reserved < b.set_bytes  # the pool is spent
    a.close()
    assert pool.reserved == b.nbytes


def table(tmp_path: Path, name: str, budget: MemoryBudget, **cfg: Any) -> TableState:
    spec = parse_spec({"dim": 8, **cfg})
    return TableState.create(tmp_path / name, "emb", spec, budget=budget)


def test_cached_reads_equal_rocksdb_through_pushes_evictions_and_loads(tmp_path: Path) -> None:
    cfg: dict[str, Any] = {
        "optimizer": {"type": "rowwise_adagrad", "lr": 0.1},
        "eviction": {"max_rows": 3000, "ttl_versions": 6},
    }
    # a cache a third of the table: hits, misses and fills all happen
    cached = table(tmp_path, "cached", MemoryBudget(1 << 20, row_share=0.15), **cfg)
    plain = table(tmp_path, "plain", MemoryBudget(1 << 20, row_share=0.0), **cfg)
    assert cached.store.cache is not None and plain.store.cache is not None and plain.store.cache.max_sets == 0
    rng = np.random.default_rng(9)
    every = np.arange(6000, dtype=np.int64)
    for step in range(30):
        ids = rng.integers(0, 6000, 1500)
        grads = rng.standard_normal((1500, 8)).astype(np.float32)
        if step % 10 == 9:  # a checkpoint restore: records written as they are
            keys = np.unique(ids).astype(np.uint64)
            _, raw, _ = plain.store.get_records(keys[::-1])
            recs = raw.view(plain.rec).reshape(-1)[::-1].copy()
            recs["row"] += 1.0
            for t in (cached, plain):
                t.load(keys, recs, stamp=step + 1, version=t.version + 1)
        else:
            for t in (cached, plain):
                t.push(ids, grads, stamp=step + 1)
        assert cached.meta.evicted == plain.meta.evicted
        assert np.array_equal(cached.lookup(every)[0], plain.lookup(every)[0]), step
        keys = every.astype(np.uint64)
        found, recs, _ = cached.store.get_records(keys)  # the cache and RocksDB beneath it agree
        truth = cached.store._read_db(keys)
        assert np.array_equal(found, truth[0]) and np.array_equal(recs, truth[1]), step
    hits, misses = cached.store.row_cache_hits()
    assert hits > 0 and misses > 0 and plain.meta.evicted > 0
    assert cached.digest() == plain.digest()
    check_consistent(cached.store.cache)
    for t in (cached, plain):
        t.close()


def test_a_reader_racing_pushes_never_mixes_two_versions(tmp_path: Path) -> None:
    """Every push sets every row to its own version (sgd, lr 1, gradient -1,
    from zeros), so a lookup whose rows are not all its version mixed two."""
    n = 3000
    # a row cache for about a third of the rows: reads mix hits and RocksDB reads
    t = table(tmp_path, "race", MemoryBudget(1 << 20, row_share=0.1), optimizer={"type": "sgd", "lr": 1.0})
    every = np.arange(n, dtype=np.int64)
    minus_one = -np.ones((n, 8), np.float32)
    t.push(every, minus_one)
    stop = threading.Event()
    seen: list[int] = []
    bad: list[tuple[int, float, float]] = []

    def read() -> None:
        rng = np.random.default_rng(1)
        while not stop.is_set():
            rows, version = t.lookup(rng.choice(n, 1000, replace=False))
            seen.append(version)
            if not (rows == version).all():
                bad.append((version, float(rows.min()), float(rows.max())))

    readers = [threading.Thread(target=read) for _ in range(2)]
    for r in readers:
        r.start()
    try:
        for _ in range(80):
            t.push(every, minus_one)
    finally:
        stop.set()
        for r in readers:
            r.join()
    assert not bad, bad[:5]
    assert len(set(seen)) > 10  # the reads did overlap the pushes
    hits, misses = t.store.row_cache_hits()
    assert hits > 100_000 and misses > 100_000  # the lookups found rows in both
    t.close()
