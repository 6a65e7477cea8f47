"""Change tracking for delta export: which rows of a table part changed
after a version.

Every push writes, in its own batch, one change-log entry: its version ->
the IDs it updated, created or evicted. Entries older than the table's
`delta_versions` are deleted by the push that makes them too old, so the log
is bounded (on disk, never in memory) and, being written by the replicated
pushes alone, the same on every replica. A delta since V is the union of the
entries after V, read with the current records of those IDs: an ID with a
record is changed, one without was evicted (or never admitted a row).

`changes_from` (in the table's `Meta.extra`) is the version the log starts
at: 0 for tables created with it, the version of the first push after an
upgrade for older ones.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..errors import Gone
from .engine import Batch, RowStore, TableView
from .records import Meta

CHANGES_FROM = "changes_from"


def oldest(meta: Meta) -> int:
    """The oldest `since` a delta can still be computed from."""
    start = meta.extra.get(CHANGES_FROM)
    if not isinstance(start, int):
        return meta.version  # a table from before change tracking: nothing older is known
    return max(start, meta.version - meta.spec.delta_versions)


def record(
    store: RowStore, batch: Batch, meta: Meta, version: int, keys: np.ndarray, previous: int | None = None
) -> Meta:
    """Log the (distinct) `keys` that `version` changed; drop the entries that fall out
    of the window (the one of version - delta_versions; all those up to it
    when the version jumps from `previous`, as a restore may make it).
    Returns `meta` with `changes_from` set."""
    kept = meta.spec.delta_versions
    if kept and len(keys):  # 0: no tracking (every delta but since=version is Gone)
        store.change_put(batch, version, keys)
    first = version - kept if previous is None else max(1, previous + 1 - kept)
    for drop in range(max(1, first), version - kept + 1) if kept else ():
        store.change_delete(batch, drop)
    if CHANGES_FROM in meta.extra:
        return meta
    # the first push to a table made before change tracking: the log starts here
    return replace(meta, extra={**meta.extra, CHANGES_FROM: version - 1})


@dataclass(frozen=True)
class Changed:
    """The IDs (table keys) changed after `since`, complete up to `complete`."""

    keys: np.ndarray
    since: int
    complete: int
    version: int  # the part's version when read


def changed_since(view: TableView, meta: Meta, since: int, limit: int) -> Changed:
    """Union of the change log after `since` (`meta` read from `view`). At
    most about `limit` IDs: it stops between two versions (never inside
    one), and `complete` says up to which version the IDs are complete."""
    first = oldest(meta)
    if since < first:
        raise Gone(
            f"table {meta.name!r}: changes since version {since} are no longer kept "
            f"(the oldest is {first}; it keeps the last {meta.spec.delta_versions} versions); "
            "start again from a full export (since=0)",
            oldest_version=first,
        )
    if since >= meta.version:
        return Changed(np.zeros(0, np.uint64), since, since, meta.version)
    parts: list[np.ndarray] = []
    n = 0
    complete = meta.version
    for version, keys in view.changes(since, meta.version):
        if n and n + len(keys) > limit:
            complete = version - 1
            break
        parts.append(keys)
        n += len(keys)
    keys = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)
    return Changed(keys, since, complete, meta.version)
