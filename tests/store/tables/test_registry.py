"""The tables of a shard: create, delete, and replays after a restart change nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from store.errors import AlreadyExists, NotFound, PreconditionFailed
from store.tables.registry import Tables
from store.tables.spec import parse_spec

SPEC = parse_spec({"dim": 4, "optimizer": {"type": "sgd", "lr": 1.0}})


def test_create_get_delete(tmp_path: Path) -> None:
    t = Tables(tmp_path)
    assert t.create("emb", SPEC, stamp=3).replayed is False
    assert t.names() == ["emb"] and "emb" in t
    with pytest.raises(AlreadyExists):
        t.create("emb", SPEC, stamp=4)
    t.get("emb").push(np.array([1]), np.ones((1, 4), np.float32), stamp=5)
    with pytest.raises(PreconditionFailed):
        t.delete("emb", stamp=6, if_match=7)
    t.delete("emb", stamp=7, if_match=1)
    assert t.names() == [] and not list(tmp_path.glob("emb@*"))
    with pytest.raises(NotFound):
        t.get("emb")
    with pytest.raises(NotFound):
        t.delete("emb", stamp=8)


def test_replay_after_restart_changes_nothing(tmp_path: Path) -> None:
    """The log from the last Raft snapshot is applied again at restart: every
    create, delete and push it holds was applied to the tables already."""
    log = [
        ("create", "a", 2),
        ("push", "a", 3),
        ("create", "b", 4),
        ("delete", "a", 5),
        ("create", "a", 6),
        ("push", "b", 7),
        ("create", "c", 8),
        ("push", "a", 9),
    ]

    def run(tables: Tables) -> list[object]:
        out: list[object] = []
        for op, name, stamp in log:
            if op == "create":
                out.append(tables.create(name, SPEC, stamp).replayed)
            elif op == "delete":
                out.append(tables.delete(name, stamp).replayed)
            else:
                out.append(tables.get(name).push(np.array([stamp]), np.ones((1, 4), np.float32), stamp=stamp).duplicate)
        return out

    first = Tables(tmp_path)
    assert run(first) == [False] * len(log)
    digests = {n: first.get(n).digest() for n in first.names()}
    first.close()
    again = Tables(tmp_path)
    # the push to the first "a" (stamp 3) finds the second "a", created after it: skipped as well
    assert run(again) == [True] * len(log)
    assert {n: again.get(n).digest() for n in again.names()} == digests
    assert again.get("a").lookup(np.array([9, 3]))[0][:, 0].tolist() == [-1.0, 0.0]


def test_existed_at_answers_for_the_past(tmp_path: Path) -> None:
    t = Tables(tmp_path)
    t.create("x", SPEC, stamp=10)
    t.delete("x", stamp=20)
    assert [t.existed_at("x", s) for s in (5, 10, 11, 19, 20, 21)] == [False, False, True, True, False, False]
    t.create("x", SPEC, stamp=30)
    assert t.existed_at("x", 31) and not t.existed_at("x", 25)
    # a create replayed at a stamp where the table existed fails again
    with pytest.raises(AlreadyExists):
        t.create("x", SPEC, stamp=15)


def test_stray_directories_are_removed_at_start(tmp_path: Path) -> None:
    t = Tables(tmp_path)
    t.create("keep", SPEC, stamp=1)
    t.close()
    (tmp_path / "gone@2").mkdir()  # a create that crashed before the registry write
    Tables(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep@1", "registry.json"]


def test_a_table_deleted_while_it_is_read(tmp_path: Path) -> None:
    """A lookup in progress finishes before the database closes; later ones get 404."""
    import threading

    t = Tables(tmp_path)
    t.create("emb", SPEC, stamp=1)
    table = t.get("emb")
    table.push(np.arange(1000), np.ones((1000, 4), np.float32), stamp=2)
    entered, release = threading.Event(), threading.Event()
    results: list[object] = []

    def slow_reader() -> None:
        with table.reading():
            entered.set()
            release.wait(5)
            results.append(table.store.get_records(np.arange(3, dtype=np.uint64))[0].tolist())

    reader = threading.Thread(target=slow_reader)
    reader.start()
    entered.wait(5)
    deleter = threading.Thread(target=lambda: t.delete("emb", stamp=3))
    deleter.start()
    deleter.join(0.2)
    assert deleter.is_alive()  # waits for the reader
    release.set()
    reader.join(5)
    deleter.join(5)
    assert results == [[True, True, True]] and not deleter.is_alive()
    with pytest.raises(NotFound):
        table.lookup(np.array([1]))
