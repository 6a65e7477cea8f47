"""The row cache in front of a table's RocksDB: recently read or written
records in numpy arrays, so a hit costs a gather, not a RocksDB point read
(~3.6 µs per key through rocksdict even from the block cache).

Set-associative with two choices: key k may only live in the `WAYS` slots
of two sets given by its hash (a new key goes to the emptier one, which
keeps sets evenly filled), so a batch is probed, read and filled with
whole-array operations (no per-key Python). Within a set the least recently used slot
is replaced. A cache grows with its table's rows while the process's
`RowPool` (the row caches' share of `limits.table_cache_bytes`) grants the
bytes, first come, first served: a table that finds the pool spent caches
in what it has, and the pool is not rebalanced between open tables.

Not thread-safe on its own: `RowStore` calls it under its lock, which is
also what keeps the cache equal to RocksDB (store/tables/engine.py).
"""

from __future__ import annotations

import threading

import numpy as np

WAYS = 8
_32 = np.uint64(32)
# Grow before more than this share of the slots is taken. Lower than a hash
# table's usual: while a level is partly split the unsplit sets are twice as
# full as the split ones. Measured (250 K / 400 K keys, random 4,096-key reads
# refilling their misses): 0.7 keeps 97-98% hits with 1.4 slots per key,
# 0.8 86-92% with 1.1-1.2, 0.9 66-71%; growing by whole doublings instead
# keeps 98-99% with 1.05-2.1 slots per key.
LOAD = 0.7


class RowPool:
    """The bytes the row caches of one process may take, shared first come, first served."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, capacity)
        self.reserved = 0
        self._lock = threading.Lock()

    def reserve(self, want: int) -> int:
        """Up to `want` bytes more; returns how many were granted."""
        with self._lock:
            got = max(0, min(want, self.capacity - self.reserved))
            self.reserved += got
            return got

    def release(self, n: int) -> None:
        with self._lock:
            self.reserved -= n


class RowCache:
    """Records of `record_size` bytes by uint64 key. Keys given to `put` may
    repeat (the last one wins, as in a RocksDB write batch).

    Grows without copying (linear hashing): the arrays are allocated once at
    the pool's size but untouched pages take no memory; the sets in use are
    a prefix [0, 2^level + split), and a key's two sets are two halves of
    its hash mod 2^level, or mod 2^(level+1) where that is below `split`.
    Growing splits the next sets in order: an entry whose sets, with one more
    bit, no longer include this one moves to the new set (empty: it keeps
    its way). Only the prefix's bytes are taken from the pool."""

    def __init__(self, record_size: int, pool: RowPool) -> None:
        self.record_size = record_size
        self.pool = pool
        self.slot_bytes = record_size + 16  # record, key, tick
        self.set_bytes = WAYS * self.slot_bytes
        self.max_sets = pool.capacity // self.set_bytes if record_size else 0
        self.nbytes = 0  # reserved from the pool: the sets in use
        self.count = 0  # slots in use
        self.hits = 0
        self.misses = 0
        self._tick = 1  # 0 marks an empty slot
        self.level = self.split = self.sets = 0
        self.keys = np.zeros((self.max_sets, WAYS), np.uint64)
        self.ticks = np.zeros((self.max_sets, WAYS), np.uint64)
        self.recs = np.zeros((self.max_sets, WAYS, record_size), np.uint8)

    def _addr(self, h: np.ndarray) -> np.ndarray:
        low = h & np.uint64((1 << self.level) - 1)
        return np.where(low < self.split, h & np.uint64((2 << self.level) - 1), low).astype(np.intp)

    def _sets_of(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The two sets a key may live in (from the low and the high half of its hash)."""
        h = _hash(keys)
        return self._addr(h), self._addr(h >> _32)

    def _probe(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(set, way, hit, first choice, second choice) of each key; set and way where it was found."""
        s1, s2 = self._sets_of(keys)
        both = np.concatenate([self.keys[s1], self.keys[s2]], axis=1) == keys[:, None]
        # an emptied slot keeps its key: look at the ticks of the matches only
        # (about one per key), not of all 16 candidate slots (half the cache misses)
        row, col = np.nonzero(both)
        empty = self.ticks[np.where(col < WAYS, s1[row], s2[row]), col % WAYS] == 0
        both[row[empty], col[empty]] = False
        at = both.argmax(axis=1)
        return np.where(at < WAYS, s1, s2), at % WAYS, both.any(axis=1), s1, s2

    def _next_tick(self) -> np.uint64:
        self._tick += 1
        return np.uint64(self._tick)

    def get(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hit mask, the hits' records in key order)."""
        keys = np.asarray(keys, np.uint64)
        if self.sets == 0 or len(keys) == 0:
            self.misses += len(keys)
            return np.zeros(len(keys), bool), np.zeros((0, self.record_size), np.uint8)
        s, way, hit, _, _ = self._probe(keys)
        s, way = s[hit], way[hit]
        self.ticks[s, way] = self._next_tick()
        n = int(hit.sum())
        self.hits += n
        self.misses += len(keys) - n
        return hit, self.recs[s, way]

    def put(self, keys: np.ndarray, recs: np.ndarray) -> None:
        """Insert or overwrite; the least recently used slots of a set make room."""
        if len(keys) == 0:
            return
        keys, recs = _last_of_each(np.asarray(keys, np.uint64), recs)
        if self.count + len(keys) > LOAD * self.sets * WAYS:
            self._grow(int((self.count + len(keys)) / (LOAD * WAYS)) + 1)
        if self.sets == 0:
            return
        s, way, hit, s1, s2 = self._probe(keys)
        tick = self._next_tick()
        self.recs[s[hit], way[hit]] = recs[hit]
        self.ticks[s[hit], way[hit]] = tick
        miss = np.flatnonzero(~hit)
        if not len(miss):
            return
        # a new key goes to the emptier of its two sets (as things were before this batch);
        # the r-th new key of a set takes the set's r-th least recently used slot
        s1, s2 = s1[miss], s2[miss]
        full1 = (self.ticks[s1] != 0).sum(axis=1)
        full2 = (self.ticks[s2] != 0).sum(axis=1)
        s[miss] = np.where(full1 <= full2, s1, s2)
        order = miss[np.argsort(s[miss], kind="stable")]
        ms = s[order]
        first = np.flatnonzero(np.r_[True, ms[1:] != ms[:-1]])
        rank = np.arange(len(ms)) - np.repeat(first, np.diff(np.r_[first, len(ms)]))
        fits = rank < WAYS  # more new keys than ways in a set: the later ones are not cached
        order, ms, rank = order[fits], ms[fits], rank[fits]
        victim = np.argsort(self.ticks[ms], axis=1, kind="stable")[np.arange(len(ms)), rank]
        self.count += int((self.ticks[ms, victim] == 0).sum())
        self.keys[ms, victim] = keys[order]
        self.recs[ms, victim] = recs[order]
        self.ticks[ms, victim] = tick

    def drop(self, keys: np.ndarray) -> None:
        if self.sets == 0 or len(keys) == 0:
            return
        s, way, hit, _, _ = self._probe(np.unique(np.asarray(keys, np.uint64)))
        self.count -= int(hit.sum())
        self.ticks[s[hit], way[hit]] = 0

    def _grow(self, want_sets: int) -> None:
        """Use up to `want_sets` sets, as far as the pool grants their bytes."""
        want_sets = min(want_sets, self.max_sets)
        if want_sets <= self.sets:
            return
        granted = self.pool.reserve((want_sets - self.sets) * self.set_bytes)
        got = granted // self.set_bytes
        self.pool.release(granted - got * self.set_bytes)
        self.nbytes += got * self.set_bytes
        target = self.sets + got
        if self.sets == 0 and target:
            self.sets = 1  # set 0 holds every key: level 0
        while self.sets < target:
            half = 1 << self.level
            n = min(target - self.sets, half - self.split)
            lo, hi = self.split, self.split + n
            keys, ticks = self.keys[lo:hi], self.ticks[lo:hi]
            # an entry stays if one of its two sets, with one more hash bit, is still this one;
            # else that bit moved it to the new set lo+half.. (empty: it keeps its way)
            h = _hash(keys)
            mask, here = np.uint64((2 << self.level) - 1), np.arange(lo, hi, dtype=np.uint64)[:, None]
            stays = ((h & mask) == here) | (((h >> _32) & mask) == here)
            move = (ticks != 0) & ~stays
            self.keys[lo + half : hi + half][move] = keys[move]
            self.recs[lo + half : hi + half][move] = self.recs[lo:hi][move]
            self.ticks[lo + half : hi + half][move] = ticks[move]
            ticks[move] = 0
            self.sets += n
            self.split += n
            if self.split == half:
                self.level, self.split = self.level + 1, 0

    def clear(self) -> None:
        self.ticks[: self.sets] = 0
        self.count = 0

    def close(self) -> None:
        self.pool.release(self.nbytes)
        self.nbytes = self.sets = self.max_sets = self.count = 0
        self.level = self.split = 0
        self.keys = self.ticks = np.zeros((0, WAYS), np.uint64)
        self.recs = np.zeros((0, WAYS, self.record_size), np.uint8)


def _hash(keys: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every bit of the key reaches the low bits (IDs are often sequential)."""
    z: np.ndarray = keys ^ (keys >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)  # wraps mod 2^64 on purpose
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    out: np.ndarray = z ^ (z >> np.uint64(31))
    return out


def _last_of_each(keys: np.ndarray, recs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct keys with the last record given for each."""
    keys = np.asarray(keys, np.uint64)
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    last = np.r_[sk[1:] != sk[:-1], True]
    if last.all():
        return keys, recs
    pick = order[last]
    return keys[pick], recs[pick]
