"""Real pysyncobj nodes through the adapter with a DurableJournal, for the journal tests."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from store import pysyncobj_adapter as adapter
from store.commands import Noop, to_log
from store.durable_journal import HEADER
from tests.ports import free_range
from tests.waiting import wait_until


class Node(adapter.TunedSyncObj):
    def __init__(self, journal: Path, addr: str, peers: list[str], fsync: bool = True, dynamic: bool = False) -> None:
        conf = adapter.SyncObjConf(
            journalFile=str(journal),
            dynamicMembershipChange=dynamic,
            appendEntriesPeriod=0.02,
            raftMinTimeout=0.15,
            raftMaxTimeout=0.3,
            connectionTimeout=0.5,
            autoTickPeriod=0.005,
            bindAddress=addr,
        )
        super().__init__(addr, peers, conf, thread_name="raft-test", fsync=fsync)

    @adapter.replicated
    def _apply(self, cmd: Any) -> Any:
        return cmd


def on_disk(path: Path) -> tuple[int, int]:
    """(end offset, durable mark) as the header on disk says."""
    with open(path, "rb") as f:
        _name, mark, _version, _fmt, end = HEADER.unpack(f.read(HEADER.size))
    return end, mark


def write(node: Node, cmd: Any) -> None:
    done = threading.Event()
    result: list[Any] = []
    node._apply(cmd, callback=lambda res, err: (result.append(err), done.set()))
    node.wake_tick()
    assert done.wait(10) and result == [adapter.FAIL_REASON.SUCCESS]


def one_node(journal: Path, fsync: bool = True) -> Node:
    node = Node(journal, f"127.0.0.1:{free_range(1)}", [], fsync)
    wait_until(lambda: node.role == "leader", 10, "a one-node leader")
    return node


@contextmanager
def three_nodes(tmp_path: Path, settled: bool = False) -> Iterator[tuple[list[Node], Node]]:
    """Three nodes on loopback with their journals in `tmp_path`: (nodes,
    leader), destroyed after the block. `settled`: a first write committed
    and every node in the leader's term before the block starts."""
    addrs = [f"127.0.0.{i + 1}:{free_range(1)}" for i in range(3)]
    nodes = [Node(tmp_path / f"n{i}.bin", a, [o for o in addrs if o != a]) for i, a in enumerate(addrs)]
    try:
        wait_until(lambda: any(n.role == "leader" for n in nodes), 20, "a leader")
        leader = next(n for n in nodes if n.role == "leader")
        if settled:
            write(leader, to_log(Noop()))
            term = leader.raftCurrentTerm
            wait_until(lambda: all(n.raftCurrentTerm == term for n in nodes), 10, "followers in the leader's term")
        yield nodes, leader
    finally:
        for n in nodes:
            n.destroy_synchronous()


def slow_journal_syncs(monkeypatch: pytest.MonkeyPatch, delay: float) -> dict[str, int]:
    """Every fdatasync of a journal (.bin) takes `delay` s more from now on;
    the answer counts them."""
    real, slowed = os.fdatasync, {"n": 0}

    def slow_disk(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".bin"):
            slowed["n"] += 1
            time.sleep(delay)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow_disk)
    return slowed
