"""Which shard of a table each ID lives on, as the store computes it
(store/tables/ids.py `shard_of_keys`; tests/paramstore/test_embedding_bag.py
checks the two agree). The client needs it to send one lookup per shard."""

from __future__ import annotations

import numpy as np

_U = np.uint64
_GOLDEN = _U(0x9E3779B97F4A7C15)
_M1 = _U(0xBF58476D1CE4E5B9)
_M2 = _U(0x94D049BB133111EB)
_SHARD_SALT = _U(0x5851F42D4C957F2D)


def table_keys(ids: np.ndarray) -> np.ndarray:
    """int64 or uint64 IDs as the uint64 keys the store hashes (two's complement bits)."""
    ids = np.asarray(ids)
    return ids.view(np.uint64) if ids.dtype == np.int64 else ids.astype(np.uint64)


def shard_of_ids(ids: np.ndarray, shards: int) -> np.ndarray:
    """The shard of each ID (int64), a splitmix64 hash of its key."""
    with np.errstate(over="ignore"):
        z = (table_keys(ids) ^ _SHARD_SALT) + _GOLDEN
        z = (z ^ (z >> _U(30))) * _M1
        z = (z ^ (z >> _U(27))) * _M2
        z = z ^ (z >> _U(31))
        return (z % _U(shards)).astype(np.int64)
