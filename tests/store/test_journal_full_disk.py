"""A full disk under the journal, the payload store and the snapshot writer,
on a real 32 MB tmpfs: nothing dies, nothing half-written stays behind, and
writes resume once space is freed (root only: mounts a tmpfs)."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pysyncobj.node import TCPNode

from store import pysyncobj_adapter as adapter
from store.applier import Applier
from store.payloads import PayloadStore
from store.raft import WRITE_HEADROOM
from store.snapshotter import Snapshotter
from store.state import ShardState, Tensor
from tests.store.journal_nodes import one_node
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """A file taking all but about `leave` bytes of the file system."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\1" * max(0, free - leave))
    return filler


def test_a_full_disk_stops_the_journal_not_the_replica(small_disk):
    node = one_node(small_disk / "journal.bin")
    try:
        filler = fill(small_disk, 64 << 10)
        assert not node.journal_has_room(WRITE_HEADROOM)  # what ShardReplica checks before taking a write
        # entries past the reserved space wait in the queue: no SIGBUS, no exception on the tick
        done = threading.Event()
        result: list[Any] = []
        chunk = b"x" * (40 << 10)
        for _ in range(150):  # 6 MB of entries: more than the journal has reserved (RESERVE, 4 MB)
            node._apply(chunk, callback=lambda res, err: None)
        node._apply(b"last", callback=lambda res, err: (result.append(err), done.set()))
        node.wake_tick()
        assert not done.wait(2), "a write was appended with the disk full"
        assert node.role == "leader"
        filler.unlink()  # space is freed: the queued writes go on without a restart
        assert done.wait(20) and result == [adapter.FAIL_REASON.SUCCESS]
        assert node.journal_has_room(WRITE_HEADROOM)
    finally:
        node.destroy_synchronous()


def test_a_payload_that_does_not_fit_leaves_no_part_file(small_disk):
    store = PayloadStore(small_disk / "payloads", fsync=True)
    fill(small_disk, 1 << 20)
    with pytest.raises(OSError):
        store.put(np.ones(1 << 20, np.float32).tobytes())  # 4 MB
    assert list((small_disk / "payloads").iterdir()) == []


def test_a_snapshot_that_does_not_fit_keeps_the_previous_one(small_disk):
    meta = ((b"\x00last", 42, 3), (b"\x00prev", 41, 3), {TCPNode("127.0.0.1:7000")})
    dump = small_disk / "snapshot.bin"
    state = ShardState(0)
    applier = Applier(state, resolve=lambda ref, index: None, on_payload_used=lambda *a: None)
    snap = Snapshotter(0, dump, applier, fsync=True, on_snapshot=lambda *a: None)
    try:
        snap.serialize(str(dump) + ".tmp", meta)
        wait_until(lambda: snap.check() == adapter.SERIALIZER_STATE.SUCCESS, 10, "the first snapshot")
        before = dump.read_bytes()
        value = np.ones(4 << 20, np.float32)  # 16 MB: cannot fit in what is left
        state.tensors["big"] = Tensor(
            name="big", dtype="float32", shape=value.shape, value=value, version=1, optimizer={"type": "sgd", "lr": 0.1}
        )
        fill(small_disk, 1 << 20)
        snap.serialize(str(dump) + ".tmp", meta)
        wait_until(lambda: snap.check() == adapter.SERIALIZER_STATE.FAILED, 10, "the failed snapshot")
    finally:
        applier.stop()
    assert dump.read_bytes() == before
    assert not dump.with_suffix(".writing").exists()
