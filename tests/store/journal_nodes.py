"""Real pysyncobj nodes through the adapter with a DurableJournal, for the journal tests."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from store import pysyncobj_adapter as adapter
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
