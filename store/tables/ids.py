"""Table IDs from clients -> the uint64 keys rows are stored under.

An int64 table keeps each ID's two's-complement bits, so -1 and 2**64-1 are
the same row of different tables; a uint64 table refuses negative IDs.
"""

from __future__ import annotations

import numpy as np

from ..errors import Unprocessable
from .initial import splitmix64

MAX_INT64 = (1 << 63) - 1


def table_keys(ids: np.ndarray, id_dtype: str) -> np.ndarray:
    """Validate a 1-D array of IDs for a table of `id_dtype`; return uint64 keys."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise Unprocessable(f"ids: expected a 1-D list of IDs, got shape {list(ids.shape)}")
    if ids.dtype.kind not in "iu":
        raise Unprocessable(f"ids: expected integer IDs (int64 or uint64), got {ids.dtype}")
    if id_dtype == "uint64":
        if ids.dtype.kind == "i" and ids.size and int(ids.min()) < 0:
            raise Unprocessable("ids: negative ID in a uint64 table")
        return ids.astype(np.uint64)
    if ids.dtype.kind == "u" and ids.size and int(ids.max()) > MAX_INT64:
        raise Unprocessable("ids: ID above 2**63-1 in an int64 table")
    return ids.astype(np.int64).view(np.uint64)


def ids_from_keys(keys: np.ndarray, id_dtype: str) -> np.ndarray:
    keys = np.asarray(keys, dtype=np.uint64)
    return keys if id_dtype == "uint64" else keys.view(np.int64)


def ids_from_json(values: object) -> np.ndarray:
    """A JSON list of integers -> int64, or uint64 when some ID needs it."""
    if not isinstance(values, list):
        raise Unprocessable("ids: expected a JSON list of integers")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise Unprocessable("ids: expected integer IDs")
    if any(v < -(1 << 63) or v >= (1 << 64) for v in values):
        raise Unprocessable("ids: an ID does not fit in 64 bits")
    if any(v > MAX_INT64 for v in values):
        if any(v < 0 for v in values):
            raise Unprocessable("ids: mixes negative IDs with IDs above 2**63-1")
        return np.array(values, dtype=np.uint64)
    return np.array(values, dtype=np.int64)


_SHARD_SALT = np.uint64(0x5851F42D4C957F2D)


def shard_of_keys(keys: np.ndarray, shards: int) -> np.ndarray:
    """The shard of each key: a stable hash of the ID (never Python's hash),
    so every replica, client and restart agrees."""
    with np.errstate(over="ignore"):
        return (splitmix64(np.asarray(keys, dtype=np.uint64) ^ _SHARD_SALT) % np.uint64(shards)).astype(np.int64)


def split_by_shard(keys: np.ndarray, shards: int) -> dict[int, np.ndarray]:
    """shard -> positions (into `keys`) of the IDs that live there, in order."""
    owner = shard_of_keys(keys, shards)
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(shards + 1))
    return {s: order[bounds[s] : bounds[s + 1]] for s in range(shards) if bounds[s + 1] > bounds[s]}
