"""Table commands through the shard's state machine: dispatch, stamps from the
log, the shared tensor/table namespace, request ids, and replays at restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from store.commands import Command, Group, Inline, Put, TableCreate, TableDelete, TableFence, TablePush
from store.errors import AlreadyExists, NotFound, PreconditionFailed, Unavailable, Unprocessable
from store.state import ShardState
from store.tables.registry import Tables

CONFIG = {"dim": 2, "optimizer": {"type": "sgd", "lr": 1.0}}


def resolve(ref: Inline) -> bytes:
    return ref.data


def state(tmp_path: Path) -> ShardState:
    s = ShardState(0)
    s.tables = Tables(tmp_path / "tables")
    return s


def push(name: str, ids: list[int], grads: list[list[float]], rid: str | None = None) -> TablePush:
    return TablePush(
        name=name,
        n=len(ids),
        id_dtype="int64",
        ids=Inline(np.array(ids, "<i8").tobytes()),
        grads=Inline(np.array(grads, "<f4").tobytes()),
        rid=rid,
    )


def apply(s: ShardState, index: int, cmd: Command) -> dict:
    s.log_index = index
    return s.apply(cmd, resolve)


def rows(s: ShardState, name: str, ids: list[int]) -> list[list[float]]:
    assert s.tables is not None
    return s.tables.get(name).lookup(np.array(ids))[0].tolist()


def test_create_push_delete(tmp_path: Path) -> None:
    s = state(tmp_path)
    assert apply(s, 1, TableCreate(name="emb", config=CONFIG))["created"]
    r = apply(s, 2, push("emb", [7, 7, 9], [[1, 2], [3, 4], [5, 6]]))
    assert (r["version"], r["rows"], r["created"]) == (1, 2, 2)
    assert rows(s, "emb", [7, 9, 8]) == [[-4, -6], [-5, -6], [0, 0]]
    assert apply(s, 3, TableDelete(name="emb"))["deleted"]
    with pytest.raises(NotFound):
        apply(s, 4, push("emb", [1], [[1, 1]]))


def test_tensors_and_tables_share_names(tmp_path: Path) -> None:
    s = state(tmp_path)
    apply(s, 1, Put(name="w", dtype="float32", shape=(1,), data=Inline(b"\0" * 4)))
    with pytest.raises(AlreadyExists):
        apply(s, 2, TableCreate(name="w", config=CONFIG))
    apply(s, 3, TableCreate(name="emb", config=CONFIG))
    with pytest.raises(AlreadyExists):
        apply(s, 4, Put(name="emb", dtype="float32", shape=(1,), data=Inline(b"\0" * 4)))
    assert "emb" not in s.tensors


def test_bad_commands_change_nothing(tmp_path: Path) -> None:
    s = state(tmp_path)
    with pytest.raises(Unprocessable):
        apply(s, 1, TableCreate(name="emb", config={"dim": 2, "optimizer": {"type": "adamax"}}))
    apply(s, 2, TableCreate(name="emb", config=CONFIG))
    assert s.tables is not None
    before = s.tables.get("emb").digest()
    short = TablePush(name="emb", n=2, id_dtype="int64", ids=Inline(b"\0" * 8), grads=Inline(b"\0" * 16))
    with pytest.raises(Unprocessable):
        apply(s, 3, short)
    with pytest.raises(Unprocessable):
        apply(s, 4, push("emb", [1], [[float("nan"), 0]]))
    assert s.tables.get("emb").digest() == before


def test_request_ids_apply_once(tmp_path: Path) -> None:
    s = state(tmp_path)
    apply(s, 1, TableCreate(name="emb", config=CONFIG))
    apply(s, 2, push("emb", [1], [[1, 1]], rid="a"))
    again = apply(s, 3, push("emb", [1], [[1, 1]], rid="a"))
    assert again["duplicate"] and rows(s, "emb", [1]) == [[-1, -1]]


def test_pushes_sharing_a_log_entry_each_apply(tmp_path: Path) -> None:
    s = state(tmp_path)
    apply(s, 1, TableCreate(name="emb", config=CONFIG))
    out = apply(s, 2, Group(cmds=(push("emb", [1], [[1, 1]]), push("emb", [1], [[2, 2]]))))
    assert [o["ok"]["version"] for o in out["outcomes"]] == [1, 2]
    assert rows(s, "emb", [1]) == [[-3, -3]]


def test_replaying_the_log_after_a_restart_changes_nothing(tmp_path: Path) -> None:
    """The tables are on disk, ahead of the Raft snapshot (here: none): the log
    replayed into a fresh state finds every table change applied already."""
    log: list[Command] = [
        TableCreate(name="a", config=CONFIG),
        push("a", [1, 2], [[1, 1], [2, 2]]),
        Group(cmds=(push("a", [2], [[1, 0]]), TableCreate(name="b", config=CONFIG))),
        TableDelete(name="a"),
        TableCreate(name="a", config=CONFIG),
        Put(name="t", dtype="float32", shape=(1,), data=Inline(b"\0" * 4)),
        push("a", [5], [[1, 1]]),
        push("b", [5], [[2, 2]]),
    ]
    first = state(tmp_path)
    for i, cmd in enumerate(log, start=1):
        apply(first, i, cmd)
    assert first.tables is not None
    digests = {n: first.tables.get(n).digest() for n in first.tables.names()}
    first.tables.close()

    again = state(tmp_path)
    for i, cmd in enumerate(log, start=1):
        apply(again, i, cmd)
    assert again.tables is not None
    assert {n: again.tables.get(n).digest() for n in again.tables.names()} == digests
    assert rows(again, "a", [1, 5]) == [[0, 0], [-1, -1]] and "t" in again.tensors


def test_a_fence_holds_pushes_off_until_released(tmp_path: Path) -> None:
    s = state(tmp_path)
    apply(s, 1, TableCreate(name="emb", config=CONFIG))
    apply(s, 2, push("emb", [1], [[1, 1]]))
    with pytest.raises(PreconditionFailed) as moved:
        apply(s, 3, TableFence(name="emb", version=0))
    assert moved.value.extra["current_version"] == 1
    apply(s, 4, push("emb", [1], [[1, 1]]))  # the failed fence fenced nothing
    assert apply(s, 5, TableFence(name="emb", version=2))["fenced"]
    with pytest.raises(Unavailable, match="being deleted"):
        apply(s, 6, push("emb", [1], [[5, 5]]))
    assert rows(s, "emb", [1]) == [[-2, -2]]
    apply(s, 7, TableFence(name="emb", release=True))
    assert apply(s, 8, push("emb", [1], [[1, 1]]))["version"] == 3


def test_a_push_refused_by_a_fence_stays_refused_in_a_replay(tmp_path: Path) -> None:
    """The fence's interval is kept, so a replay after the release answers as the first time."""
    log: list[Command] = [
        TableCreate(name="a", config=CONFIG),
        TableFence(name="a", version=0),
        push("a", [1], [[1, 1]]),
        TableFence(name="a", release=True),
    ]
    first = state(tmp_path)
    for i, cmd in enumerate(log, start=1):
        try:
            apply(first, i, cmd)
        except Unavailable:
            assert i == 3
    assert first.tables is not None
    first.tables.close()
    again = state(tmp_path)
    with pytest.raises(Unavailable):
        for i, cmd in enumerate(log, start=1):
            apply(again, i, cmd)
    assert rows(again, "a", [1]) == [[0, 0]]
