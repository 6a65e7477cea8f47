"""A membership change in the journal is adopted at start, committed or not
(Raft: a server uses the latest configuration in its log). pysyncobj adopted
it only once it applied the entry, i.e. once a leader told it the commit
index: a replica whose log held 'add n5' past its saved commit index, with n5
leading, refused n5's connections and never learnt of it."""

from __future__ import annotations

import pytest

from tests.ports import free_range
from tests.store.journal_nodes import Node
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


def test_an_uncommitted_member_addition_in_the_log_is_adopted_at_start(tmp_path):
    path = tmp_path / "journal.bin"
    addr = f"127.0.0.1:{free_range(1)}"
    ghost = f"127.0.0.1:{free_range(1)}"  # never started: the addition cannot commit
    node = Node(path, addr, [], dynamic=True)
    try:
        wait_until(lambda: node.role == "leader", 10, "a one-node leader")
        node.addNodeToCluster(ghost, callback=lambda result, err: None)
        node.wake_tick()
        wait_until(lambda: ghost in node.other_member_ids(), 10, "the addition appended")
        logged = node.log_entries
    finally:
        node.destroy_synchronous()
    node = Node(path, addr, [], dynamic=True)  # restarts from the journal alone
    try:
        wait_until(lambda: ghost in node.other_member_ids(), 5, "the logged addition adopted at start")
        assert node.log_entries == logged
        assert node.raftCommitIndex < logged, "the addition must not be committed, or this proves nothing"
    finally:
        node.destroy_synchronous()
