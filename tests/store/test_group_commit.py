"""store/group_commit.py without Raft: what goes out when, in which entries,
and how a group's outcomes reach each caller."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from store.errors import Conflict, StoreError, Unavailable
from store.group_commit import FLIGHT_STALE, GROUP_MAX_BYTES, GROUP_MAX_COMMANDS, GROUP_MAX_WAIT, GroupCommit


class Harness:
    """Records what GroupCommit launches and when it asks for the tick thread."""

    def __init__(self) -> None:
        self.now = 100.0
        self.launched: list[tuple[object, Future]] = []
        self.wakes = 0
        self.gc = GroupCommit(
            self.launch, lambda cmds: {"op": "group", "cmds": cmds}, self.wake, label="shard 0", clock=lambda: self.now
        )

    def launch(self, cmd: object, outer: Future) -> None:
        if cmd == "explode":
            raise RuntimeError("cannot encode")
        self.launched.append((cmd, outer))

    def wake(self) -> None:
        self.wakes += 1

    def entries(self) -> list[object]:
        return [cmd for cmd, _ in self.launched]


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_a_lone_command_goes_at_once_and_alone(h):
    fut = h.gc.add("a", 100)
    assert h.wakes == 1  # the tick thread is woken, not left to its poll timeout
    h.gc.flush()
    assert h.entries() == ["a"]
    assert h.launched[0][1] is fut  # no group wrapper: the caller's own future
    h.launched[0][1].set_result(7)
    assert fut.result() == 7


def test_proposals_gather_while_an_entry_is_in_flight(h):
    h.gc.add("a", 100)
    h.gc.flush()
    b, c = h.gc.add("b", 100), h.gc.add("c", 100)
    assert h.wakes == 1  # busy: no wake for b or c
    h.gc.flush()
    assert h.entries() == ["a"]  # held back while "a" is in flight
    h.launched[0][1].set_result(1)  # "a" lands
    assert h.wakes == 2
    h.gc.flush()
    assert h.entries() == ["a", {"op": "group", "cmds": ["b", "c"]}]
    assert not b.done() and not c.done()


def test_the_oldest_waiting_longer_than_group_max_wait_goes_anyway(h):
    h.gc.add("a", 100)
    h.gc.flush()
    h.gc.add("b", 100)
    h.now += GROUP_MAX_WAIT / 2
    h.gc.flush()
    assert h.entries() == ["a"]
    h.now += GROUP_MAX_WAIT / 2
    h.gc.flush()
    assert h.entries() == ["a", "b"]


def test_an_entry_in_flight_too_long_stops_holding_the_queue(h):
    h.gc.add("a", 100)
    h.gc.flush()  # "a" never lands (its callback lost with a broken link)
    h.now += FLIGHT_STALE - 0.1
    h.gc.add("b", 100)
    assert h.wakes == 1
    h.now += 0.2
    h.gc.add("c", 100)
    assert h.wakes == 2  # idle again: wakes the tick thread
    h.gc.flush()
    assert h.entries() == ["a", {"op": "group", "cmds": ["b", "c"]}]


def test_entries_are_capped_by_count(h):
    h.gc.add("first", 10)
    h.gc.flush()
    for i in range(GROUP_MAX_COMMANDS + 44):
        h.gc.add(i, 10)
    h.launched[0][1].set_result(None)
    h.gc.flush()
    groups = h.entries()[1:]
    assert [len(g["cmds"]) for g in groups] == [GROUP_MAX_COMMANDS, 44]
    assert groups[0]["cmds"][0] == 0 and groups[1]["cmds"][-1] == GROUP_MAX_COMMANDS + 43


def test_entries_are_capped_by_bytes_and_a_big_command_goes_alone(h):
    h.gc.add("first", 10)
    h.gc.flush()
    third = GROUP_MAX_BYTES // 3
    for name in ("a", "b", "c", "d"):
        h.gc.add(name, third)
    h.gc.add("huge", GROUP_MAX_BYTES * 2)
    h.gc.add("e", 10)
    h.launched[0][1].set_result(None)
    h.gc.flush()
    assert h.entries()[1:] == [{"op": "group", "cmds": ["a", "b", "c"]}, "d", "huge", "e"]


def test_a_groups_outcomes_go_to_each_caller(h):
    h.gc.add("first", 10)
    h.gc.flush()
    futs = [h.gc.add(x, 10) for x in ("ok", "conflict", "ok2")]
    h.launched[0][1].set_result(None)
    h.gc.flush()
    group = h.launched[1][1]
    group.set_result(
        {"outcomes": [{"ok": {"version": 3}}, Conflict("version moved", current=4).to_dict(), {"ok": {"version": 5}}]}
    )
    assert futs[0].result() == {"version": 3}
    with pytest.raises(Conflict, match="version moved") as e:
        futs[1].result()
    assert e.value.extra == {"current": 4}
    assert futs[2].result() == {"version": 5}


def test_a_failed_group_fails_every_caller(h):
    h.gc.add("first", 10)
    h.gc.flush()
    futs = [h.gc.add(x, 10) for x in ("a", "b")]
    h.launched[0][1].set_result(None)
    h.gc.flush()
    h.launched[1][1].set_exception(Unavailable("leader changed"))
    for f in futs:
        with pytest.raises(Unavailable, match="leader changed"):
            f.result()


def test_a_command_that_cannot_be_proposed_fails_its_caller_not_the_tick(h):
    fut = h.gc.add("explode", 10)
    h.gc.flush()  # does not raise
    with pytest.raises(StoreError, match="shard 0: could not propose: cannot encode"):
        fut.result(0)
    h.gc.add("next", 10)
    h.gc.flush()
    assert h.entries() == ["next"]
