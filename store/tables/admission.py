"""Admission of new IDs: a count-min sketch of how often each ID without a row
was pushed. Bounded (depth x width saturating 16-bit counters, sized in the
table config) and deterministic: it changes only through pushes, identically
on every replica. Like DeepRec's CounterFilter, counts never decay, so a
saturated sketch admits more IDs than it should; size it for the ID space.
"""

from __future__ import annotations

import numpy as np

from .initial import splitmix64
from .spec import AdmissionSpec

CHUNK = 1 << 15  # counters per persisted chunk (64 KB): a push rewrites only the chunks it touched
_MAX = np.uint32(0xFFFF)


class CountMinSketch:
    def __init__(self, spec: AdmissionSpec, counters: np.ndarray | None = None) -> None:
        self.width, self.depth = spec.width, spec.depth
        shape = (self.depth, self.width)
        self.counters = np.zeros(shape, dtype=np.uint16) if counters is None else counters.reshape(shape)
        salts = np.arange(1, self.depth + 1, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)
        with np.errstate(over="ignore"):
            self._salts = splitmix64(salts)

    @property
    def nbytes(self) -> int:
        return int(self.counters.nbytes)

    def _flat_buckets(self, keys: np.ndarray) -> np.ndarray:
        """(depth, n) indices into the flattened counters."""
        with np.errstate(over="ignore"):
            h = splitmix64(np.asarray(keys, dtype=np.uint64)[None, :] ^ self._salts[:, None])
        cols = (h % np.uint64(self.width)).astype(np.int64)
        return cols + (np.arange(self.depth, dtype=np.int64) * self.width)[:, None]

    def estimate(self, keys: np.ndarray) -> np.ndarray:
        flat = self._flat_buckets(keys)
        return np.asarray(self.counters.reshape(-1)[flat].min(axis=0), dtype=np.int64)

    def add(self, keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Count `counts[i]` more pushes of `keys[i]` (distinct keys). Returns the
        estimates after counting and the indices of the chunks that changed."""
        if len(keys) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        flat = self._flat_buckets(keys).reshape(-1)
        inc = np.broadcast_to(np.asarray(counts, dtype=np.uint32)[None, :], (self.depth, len(keys))).reshape(-1)
        cells, inverse = np.unique(flat, return_inverse=True)
        total = np.zeros(len(cells), dtype=np.uint32)
        np.add.at(total, inverse, inc)  # keys sharing a bucket add up, as one at a time would
        view = self.counters.reshape(-1)
        view[cells] = np.minimum(view[cells].astype(np.uint32) + total, _MAX).astype(np.uint16)
        return self.estimate(keys), np.unique(cells // CHUNK)

    def chunk(self, i: int) -> bytes:
        flat = self.counters.reshape(-1)
        return flat[i * CHUNK : (i + 1) * CHUNK].tobytes()

    def load_chunk(self, i: int, data: bytes) -> None:
        flat = self.counters.reshape(-1)
        part = np.frombuffer(data, dtype=np.uint16)
        flat[i * CHUNK : i * CHUNK + len(part)] = part

    @property
    def chunks(self) -> int:
        return -(-self.counters.size // CHUNK)


def admitted(spec: AdmissionSpec, estimates: np.ndarray) -> np.ndarray:
    return estimates >= spec.min_count
