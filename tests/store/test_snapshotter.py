"""store/snapshotter.py without Raft: pysyncobj's serializer hooks driven by
hand, with a real Applier and state."""

from __future__ import annotations

from pathlib import Path

import pytest
from pysyncobj.node import TCPNode

from store.applier import Applier
from store.pysyncobj_adapter import SERIALIZER_STATE
from store.snapshotter import Snapshotter
from store.state import ShardState
from tests.waiting import wait_until

META = ((b"\x00last", 42, 3), (b"\x00prev", 41, 3), {TCPNode("127.0.0.1:7000"), TCPNode("127.0.0.2:7000")})


def make(dump: Path, done: list[tuple[int, int, float]]) -> tuple[Snapshotter, Applier]:
    applier = Applier(ShardState(0), resolve=lambda ref, index: None, on_payload_used=lambda *a: None)
    return Snapshotter(0, dump, applier, fsync=False, on_snapshot=lambda *a: done.append(a)), applier


@pytest.mark.timeout(30)
def test_a_snapshot_is_written_off_the_calling_thread_and_installs_again(tmp_path):
    done: list[tuple[int, int, float]] = []
    snap, applier = make(tmp_path / "snapshot.bin", done)
    try:
        applier.state.members["n2"] = {"http": "127.0.0.2:8000"}
        snap.serialize(str(tmp_path / "snapshot.bin.tmp"), META)
        wait_until(lambda: snap.check() == SERIALIZER_STATE.SUCCESS, 10, "the snapshot writer")
    finally:
        applier.stop()
    assert (tmp_path / "snapshot.bin").exists() and not (tmp_path / "snapshot.writing").exists()
    assert snap.snapshots == 1 and snap.last_snapshot_index == 42 and snap.last_snapshot_bytes > 0
    assert done and done[0][:2] == (42, snap.last_snapshot_bytes)

    other, applier2 = make(tmp_path / "snapshot.bin", [])
    try:
        last, prev, cluster = other.deserialize(str(tmp_path / "snapshot.bin"))
        assert (last, prev) == META[:2]
        assert {n.id for n in cluster} == {"127.0.0.1:7000", "127.0.0.2:7000"}
        assert other.last_snapshot_index == 42
        assert applier2.state.members == {"n2": {"http": "127.0.0.2:8000"}}
    finally:
        applier2.stop()


@pytest.mark.timeout(30)
def test_check_reports_success_once(tmp_path):
    snap, applier = make(tmp_path / "snapshot.bin", [])
    try:
        assert snap.check() == SERIALIZER_STATE.NOT_SERIALIZING
        snap.serialize("unused", META)
        seen = []
        wait_until(lambda: seen.append(snap.check()) or seen[-1] == SERIALIZER_STATE.SUCCESS, 10, "success")
        assert set(seen[:-1]) <= {SERIALIZER_STATE.SERIALIZING}
        assert snap.check() == SERIALIZER_STATE.NOT_SERIALIZING
    finally:
        applier.stop()


@pytest.mark.timeout(30)
def test_a_failed_write_is_reported_and_keeps_the_old_dump(tmp_path):
    dump = tmp_path / "snapshot.bin"
    dump.write_bytes(b"previous dump")
    (tmp_path / "snapshot.writing").mkdir()  # the writer cannot create its file
    snap, applier = make(dump, [])
    try:
        snap.serialize("unused", META)
        seen = []
        wait_until(lambda: seen.append(snap.check()) or seen[-1] == SERIALIZER_STATE.FAILED, 10, "failure")
        assert SERIALIZER_STATE.SUCCESS not in seen
    finally:
        applier.stop()
    assert dump.read_bytes() == b"previous dump" and snap.snapshots == 0
