"""Reading a table part out whole or by change: full dumps (export bases,
checkpoints) stream from one RocksDB snapshot, column by column, so a part
larger than memory is never held whole; deltas name the rows changed after a
version (store/tables/changes.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import CorruptData, NotFound
from .changes import changed_since
from .engine import FrozenTable
from .records import META_KEY, Meta
from .table import TableState

COLUMNS = ("ids", "rows", "state", "v")  # keys, row values, optimizer state, last update versions
_FIELDS = {"rows": "row", "state": "state", "v": "v"}


@dataclass(frozen=True)
class DeltaPart:
    keys: np.ndarray  # table keys (uint64) of changed rows that have a record
    rows: np.ndarray  # their rows, storage dtype
    removed: np.ndarray  # keys of changed IDs without a record (evicted)
    complete: int  # every change up to this version is in here
    version: int  # the part's version when read


def delta(table: TableState, since: int, limit: int) -> DeltaPart:
    """The rows of this part changed after `since` (Gone if older than its
    change log). Rows are read after the log, so some may be newer than
    `complete`; the next delta from `complete` names them again."""
    with table.reading(), table.store.view() as view:
        raw_meta = view.meta_get(META_KEY)
        if raw_meta is None:
            raise NotFound(f"table {table.name!r} has no state")
        ch = changed_since(view, Meta.from_bytes(raw_meta), since, limit)
        found, raw, _ = table.store.get_records(ch.keys, fill=False)
    recs = raw.view(table.rec).reshape(-1)
    return DeltaPart(ch.keys[found], np.array(recs["row"][found]), ch.keys[~found], ch.complete, ch.version)


class PartDump:
    """Every record of a table part at one version, for streaming: `rows` and
    `version` are known up front, each column is read in a pass of its own
    over a frozen copy (hard links; pushes go on). `close` deletes the copy."""

    def __init__(self, table: TableState, shard: int) -> None:
        self.table = table
        self.shard = shard
        with table.reading():  # the copy sits beside the table dirs; the registry drops strays at start
            self.view = FrozenTable(table.store, table.path.parent / f"dump-{uuid.uuid4().hex}")
        raw = self.view.meta_get(META_KEY)
        if raw is None:
            self.close()
            raise NotFound(f"table {table.name!r} has no state")
        self.meta = Meta.from_bytes(raw)

    @property
    def rows(self) -> int:
        return self.meta.rows

    @property
    def version(self) -> int:
        return self.meta.version

    def column(self, name: str) -> Iterator[np.ndarray]:
        """Chunks of one column, in ID order; CorruptData if the records are
        not as many as the part's row count says (the stream is then cut)."""
        seen = 0
        for keys, raw in self.view.records():
            recs = raw.view(self.table.rec).reshape(-1)
            seen += len(keys)
            if seen > self.rows:
                break
            yield keys if name == "ids" else np.ascontiguousarray(recs[_FIELDS[name]])
        if seen != self.rows:
            raise CorruptData(
                f"table {self.table.name!r} shard {self.shard}: {seen} records, its count says {self.rows}"
            )

    def close(self) -> None:
        self.view.close()
