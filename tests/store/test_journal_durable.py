"""store/durable_journal.py under real pysyncobj nodes: same format as
pysyncobj's FileJournal, synced before an append is acknowledged, torn tails
cut at start, damage below the durable mark refused."""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from pathlib import Path

import pytest
from pysyncobj.journal import FileJournal

from store.commands import Noop, to_log
from store.durable_journal import HEADER, DurableJournal
from store.errors import CorruptData
from store.journal import check_journal
from tests.ports import free_range
from tests.store.journal_nodes import Node, on_disk, one_node, slow_journal_syncs, three_nodes, write
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


def test_a_durable_journal_is_what_pysyncobj_and_the_check_read(tmp_path):
    path = tmp_path / "journal.bin"
    node = one_node(path)
    try:
        for _ in range(20):
            write(node, to_log(Noop()))
    finally:
        node.destroy_synchronous()
    count = check_journal(path, repair=False)
    assert count >= 22  # pysyncobj's first no-op, the leader's no-op, ours
    ours = DurableJournal(path, fsync=True)
    theirs = FileJournal(str(path))
    try:
        assert len(ours) == len(theirs) == count
        assert [ours[i] for i in range(count)] == [tuple(theirs[i]) for i in range(count)]
        assert ours.getCurrentTerm() == theirs.getCurrentTerm() >= 1
        assert ours.getVotedForNodeId() == theirs.getVotedForNodeId() == node.selfNode.id
    finally:
        ours._destroy()
        theirs._destroy()
    node = Node(path, f"127.0.0.1:{free_range(1)}", [])  # restarts on it
    try:
        wait_until(lambda: node.role == "leader", 10, "leader again")
        write(node, to_log(Noop()))
        assert node.log_entries >= count + 1
    finally:
        node.destroy_synchronous()


@pytest.mark.timeout(90)
def test_an_acknowledged_entry_is_on_disk_on_a_majority_first(tmp_path, monkeypatch):
    """A slow disk (20 ms per fdatasync) widens the window: each write's
    callback fires only once at least two of the three journals finished an
    fdatasync covering the entry."""
    synced: dict[str, int] = {}  # journal path -> header end as of its last completed fdatasync
    real = os.fdatasync

    def slow_disk(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        time.sleep(0.02)
        if not path.endswith(".bin"):  # the .meta files
            real(fd)
            return
        end = HEADER.unpack(os.pread(fd, HEADER.size, 0))[4]
        real(fd)
        synced[path] = max(synced.get(path, 0), end)

    monkeypatch.setattr(os, "fdatasync", slow_disk)
    paths = [tmp_path / f"n{i}.bin" for i in range(3)]
    with three_nodes(tmp_path) as (nodes, leader):
        for i in range(20):
            write(leader, to_log(Noop()))
            entry_end = leader._journal._end  # nothing else is appended meanwhile
            covered = [synced.get(str(p), 0) >= entry_end for p in paths]
            assert covered[nodes.index(leader)] and sum(covered) >= 2, (i, covered)
            for n in nodes:  # a follower's answer never runs ahead of its disk (match read first: durable only grows)
                if n is not leader:
                    match = leader.match_indexes()[n.selfNode.id]
                    assert match <= n._journal.durable_index, (i, match)


@pytest.mark.timeout(90)
def test_heartbeats_and_votes_go_on_while_the_journal_syncs(tmp_path, monkeypatch):
    """Each journal fdatasync takes 0.5 s, longer than the election timeout
    (0.15-0.3 s): synced on the Raft tick thread, followers would stop
    hearing the leader and elect another. The sync thread does it beside the
    tick, so writes commit (after their syncs) in one term, under one leader."""
    with three_nodes(tmp_path, settled=True) as (nodes, leader):
        term = leader.raftCurrentTerm
        slow = slow_journal_syncs(monkeypatch, 0.5)
        start = time.monotonic()
        for _ in range(4):
            write(leader, to_log(Noop()))
        took = time.monotonic() - start
        assert slow["n"] >= 8 and took >= 4 * 0.5, (slow, took)  # the writes did wait for the slow syncs
        assert [n.raftCurrentTerm for n in nodes] == [term] * 3
        assert [n.role for n in nodes].count("leader") == 1 and leader.role == "leader"


@pytest.mark.timeout(90)
def test_the_leader_syncs_its_journal_while_the_followers_sync_theirs(tmp_path, monkeypatch):
    """Raft thesis 10.2.1: the leader sends new entries to the followers before
    its own fdatasync, not after it, so a commit waits for one disk sync, not
    two in a row. With every journal fdatasync taking 0.2 s, a write commits in
    about 0.2 s; syncing first and sending after would take 0.4 s or more. The
    once-a-second chores (settling the mark, saving the commit index) are off
    here: one running when an entry arrives delays it by a sync of its own."""
    delay = 0.2
    with three_nodes(tmp_path, settled=True) as (nodes, leader):
        term = leader.raftCurrentTerm
        monkeypatch.setattr(DurableJournal, "onOneSecondTimer", lambda self: None)
        slow_journal_syncs(monkeypatch, delay)
        took = []
        for _ in range(7):
            start = time.monotonic()
            write(leader, to_log(Noop()))
            took.append(time.monotonic() - start)
        assert min(took) >= delay, took  # each write did wait for a sync
        assert sorted(took)[3] < 1.5 * delay, took  # the median: one sync, not the leader's then a follower's
        assert [n.raftCurrentTerm for n in nodes] == [term] * 3


def test_group_commit_syncs_once_per_batch(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = os.fdatasync

    def counting(fd: int) -> None:
        calls["n"] += 1
        real(fd)

    path = tmp_path / "journal.bin"
    node = one_node(path)
    try:
        monkeypatch.setattr(os, "fdatasync", counting)
        done = threading.Semaphore(0)
        for _ in range(300):
            node._apply(to_log(Noop()), callback=lambda res, err: done.release())
        node.wake_tick()
        for _ in range(300):
            assert done.acquire(timeout=10)
        assert 1 <= calls["n"] < 100, calls  # hundreds of entries, a few syncs
    finally:
        node.destroy_synchronous()


@pytest.fixture
def journal(tmp_path) -> Path:
    path = tmp_path / "journal.bin"
    node = one_node(path)
    try:
        for _ in range(10):
            write(node, to_log(Noop()))
    finally:
        node.destroy_synchronous()
    return path


def append_unsynced(path: Path, data: bytes) -> None:
    """What a power cut mid-batch leaves: the header names bytes that never
    reached the disk (zeros, or half a record)."""
    end, _ = on_disk(path)
    with open(path, "r+b") as f:
        f.seek(end)
        f.write(data)
        f.seek(0)
        f.write(HEADER.pack(b"PYSYNCOBJ".ljust(16, b"\0"), end, b"0.3.17\0\0", 1, end + len(data)))


def test_a_torn_tail_is_cut_with_a_log_line(journal, caplog):
    count = check_journal(journal, repair=False)
    end, _ = on_disk(journal)
    record = journal.read_bytes()[end - 60 : end]  # the tail of a real record: sizes will not match
    append_unsynced(journal, b"\0" * 300 + record)
    with pytest.raises(CorruptData):
        check_journal(journal, repair=False)
    with caplog.at_level(logging.WARNING):
        assert check_journal(journal) == count
    assert "torn tail" in caplog.text and str(journal) in caplog.text
    assert on_disk(journal) == (end, end)
    assert check_journal(journal, repair=False) == count


def test_a_tail_past_the_end_of_the_file_is_cut(journal):
    count = check_journal(journal, repair=False)
    end, _ = on_disk(journal)
    append_unsynced(journal, b"\1" * 100)
    os.truncate(journal, end + 40)  # the file's growth did not survive, the header did
    assert check_journal(journal) == count
    assert on_disk(journal) == (end, end)


def test_damage_below_the_durable_mark_refuses_to_start(journal):
    end, mark = on_disk(journal)
    assert mark == end  # closed cleanly: everything synced, the last batch too
    data = bytearray(journal.read_bytes())
    struct.pack_into("<I", data, end - 4, 7)  # the last record's closing size
    journal.write_bytes(bytes(data))
    with pytest.raises(CorruptData) as e:
        check_journal(journal)
    assert str(journal) in e.value.detail and "size fields differ" in e.value.detail


def test_a_journal_pysyncobj_wrote_has_no_mark_and_is_not_repaired(tmp_path):
    path = tmp_path / "journal.bin"
    fj = FileJournal(str(path))
    fj.add(b"\x01", 1, 1)
    fj._destroy()
    assert on_disk(path)[1] == 0
    append_unsynced(path, b"\0" * 64)
    data = bytearray(path.read_bytes())
    data[16:24] = b"\0" * 8  # no mark, as pysyncobj writes it
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptData):
        check_journal(path)


def test_fsync_off_writes_the_same_file(tmp_path):
    path = tmp_path / "journal.bin"
    node = one_node(path, fsync=False)
    try:
        write(node, to_log(Noop()))
    finally:
        node.destroy_synchronous()
    assert check_journal(path, repair=False) >= 3
