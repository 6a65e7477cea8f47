"""Change tracking for delta export (store/tables/changes.py, export.py):
a delta since V names exactly the rows changed or evicted after V, the log
is bounded by delta_versions, and full dumps stream every record."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from store.errors import CorruptData, Gone
from store.tables import changes, export
from store.tables.engine import CHANGE, Batch
from store.tables.records import META_KEY
from store.tables.spec import parse_spec
from store.tables.table import TableState


def make(tmp_path: Path, **cfg: Any) -> TableState:
    cfg.setdefault("dim", 2)
    cfg.setdefault("optimizer", {"type": "sgd", "lr": 1.0})
    return TableState.create(tmp_path / "t", "emb", parse_spec(cfg))


def push(t: TableState, *ids: int) -> None:
    t.push(np.array(ids, dtype=np.int64), np.ones((len(ids), 2), np.float32))


def all_rows(t: TableState) -> dict[int, bytes]:
    return {int(k): r.tobytes() for keys, recs in t.store.iter_records() for k, r in zip(keys, recs, strict=True)}


def test_a_delta_names_the_rows_changed_after_the_version_with_their_values(tmp_path: Path) -> None:
    t = make(tmp_path)
    push(t, 1, 2, 3)
    push(t, 3, 4)
    push(t, 5)
    d = export.delta(t, 1, limit=100)
    assert (sorted(d.keys.tolist()), d.removed.tolist(), d.complete, d.version) == ([3, 4, 5], [], 3, 3)
    assert d.rows.tolist() == t.lookup(d.keys.view(np.int64))[0].tolist()
    assert export.delta(t, 3, limit=100).keys.tolist() == []
    assert sorted(export.delta(t, 0, limit=100).keys.tolist()) == [1, 2, 3, 4, 5]


def test_evicted_rows_are_named_as_removed(tmp_path: Path) -> None:
    t = make(tmp_path, eviction={"max_rows": 2})
    push(t, 1, 2)
    push(t, 3)  # evicts 1 (least recently updated, lowest ID)
    d = export.delta(t, 1, limit=100)
    assert (d.keys.tolist(), d.removed.tolist()) == ([3], [1])
    # a row evicted after it changed reads as removed, whatever came first
    assert sorted(export.delta(t, 0, limit=100).removed.tolist()) == [1]


def test_a_delta_stops_between_versions_at_the_limit_and_says_how_far_it_is_complete(tmp_path: Path) -> None:
    t = make(tmp_path)
    for i in range(5):
        push(t, 10 * i, 10 * i + 1)
    d = export.delta(t, 0, limit=3)  # versions 1..5 hold 2 IDs each: 1 fits, 2 would pass the limit
    assert (sorted(d.keys.tolist()), d.complete) == ([0, 1], 1)
    d = export.delta(t, 1, limit=4)
    assert (sorted(d.keys.tolist()), d.complete) == ([10, 11, 20, 21], 3)
    one = export.delta(t, 4, limit=1)  # one version always fits, even over the limit
    assert (sorted(one.keys.tolist()), one.complete) == ([40, 41], 5)


def test_the_change_log_keeps_delta_versions_entries_then_answers_gone(tmp_path: Path) -> None:
    t = make(tmp_path, delta_versions=3)
    for i in range(6):
        push(t, i)
    entries = [k for k, _ in t.store.db.items(from_key=CHANGE) if k.startswith(CHANGE)]
    assert len(entries) == 3  # versions 4, 5, 6: bounded on disk too
    assert changes.oldest(t.meta) == 3
    assert sorted(export.delta(t, 3, limit=100).keys.tolist()) == [3, 4, 5]
    with pytest.raises(Gone) as e:
        export.delta(t, 2, limit=100)
    assert e.value.extra["oldest_version"] == 3


def test_a_table_from_before_change_tracking_starts_its_log_at_its_next_push(tmp_path: Path) -> None:
    t = make(tmp_path)
    push(t, 1)
    old = replace(t.meta, extra={})  # as a table created before the change log existed
    batch = Batch()
    t.store.meta_put(batch, META_KEY, old.to_bytes())
    t.store.write(batch)
    t.store.close()
    t = TableState.open(tmp_path / "t")
    with pytest.raises(Gone):
        export.delta(t, 0, limit=100)  # what changed before is unknown
    push(t, 2)
    assert changes.oldest(t.meta) == 1
    assert export.delta(t, 1, limit=100).keys.tolist() == [2]


def test_two_tables_fed_the_same_pushes_keep_the_same_change_log(tmp_path: Path) -> None:
    a = TableState.create(tmp_path / "a", "emb", parse_spec({"dim": 2, "eviction": {"max_rows": 3}}))
    b = TableState.create(tmp_path / "b", "emb", parse_spec({"dim": 2, "eviction": {"max_rows": 3}}))
    rng = np.random.default_rng(1)
    for _ in range(20):
        ids = rng.integers(0, 12, 5)
        for t in (a, b):
            push(t, *ids.tolist())
    logs = [[(k, v) for k, v in t.store.db.items(from_key=CHANGE) if k.startswith(CHANGE)] for t in (a, b)]
    assert logs[0] == logs[1] and len(logs[0]) == 20


def test_a_full_dump_streams_every_record_column_by_column_from_one_snapshot(tmp_path: Path) -> None:
    t = make(tmp_path, optimizer={"type": "rowwise_adagrad", "lr": 0.1})
    push(t, 7, -3, 1 << 40)
    dump = export.PartDump(t, shard=0)
    push(t, 99)  # after the snapshot: not in the dump
    try:
        assert (dump.rows, dump.version) == (3, 1)
        keys = np.concatenate(list(dump.column("ids")))
        rows = np.concatenate(list(dump.column("rows")))
        state = np.concatenate(list(dump.column("state")))
        versions = np.concatenate(list(dump.column("v")))
    finally:
        dump.close()
    assert not list(tmp_path.glob("dump-*"))  # the frozen copy is gone
    stored = all_rows(t)
    rec = t.rec
    assert sorted(keys.tolist()) == keys.tolist() and 99 not in keys.tolist()
    for k, row, st, v in zip(keys, rows, state, versions, strict=True):
        want = np.frombuffer(stored[int(k)], dtype=rec)[0]
        assert (row.tobytes(), st.tobytes(), int(v)) == (want["row"].tobytes(), want["state"].tobytes(), 1)


def test_a_dump_whose_count_disagrees_with_its_records_is_cut_not_wrong(tmp_path: Path) -> None:
    t = make(tmp_path)
    push(t, 1, 2)
    batch = Batch()
    t.store.meta_put(batch, META_KEY, replace(t.meta, rows=3).to_bytes())
    t.store.write(batch)
    dump = export.PartDump(t, shard=0)
    try:
        with pytest.raises(CorruptData):
            list(dump.column("ids"))
    finally:
        dump.close()


def test_delta_versions_0_keeps_no_change_log(tmp_path: Path) -> None:
    t = make(tmp_path, delta_versions=0)
    push(t, 1)
    push(t, 2)
    assert not [k for k, _ in t.store.db.items(from_key=CHANGE) if k.startswith(CHANGE)]
    with pytest.raises(Gone):
        export.delta(t, 1, limit=100)
    assert export.delta(t, 2, limit=100).keys.tolist() == []  # nothing since the current version
