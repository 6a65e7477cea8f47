"""Eviction decisions, from the table's version (the replicated log's clock)
only, never from a clock or memory pressure: every replica evicts the same rows.

A row's age is the number of pushes to its table (on its shard) since the row
was last updated. `ttl_versions = K` evicts rows older than K; `max_rows = M`
keeps the M most recently updated rows (ties broken by the lowest ID first).
"""

from __future__ import annotations

from .spec import EvictionSpec


def ttl_cutoff(spec: EvictionSpec | None, version: int) -> int | None:
    """Rows last updated before this version are expired (None: no TTL)."""
    if spec is None or spec.ttl_versions is None:
        return None
    cutoff = version - spec.ttl_versions
    return cutoff if cutoff > 0 else None


def excess_rows(spec: EvictionSpec | None, rows: int) -> int:
    """How many of the least recently updated rows to drop."""
    if spec is None or spec.max_rows is None:
        return 0
    return max(0, rows - spec.max_rows)
