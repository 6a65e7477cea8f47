"""Deterministic placement: which shard a tensor lives in, which nodes host a shard.

Every replica and every client computes the same answers from the config alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def shard_for(name: str, shards: int) -> int:
    """Stable across processes and Python versions (unlike `hash`)."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def hosts_for(shard: int, nodes: Sequence[T], replication: int) -> list[T]:
    """Shard k is hosted by `replication` consecutive nodes starting at k mod N."""
    n = len(nodes)
    return [nodes[(shard + i) % n] for i in range(replication)]
