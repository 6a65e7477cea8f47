"""tests/faults/powerloss_fs.py by itself: what survives a power cut is what
was fsynced, per file and per directory entry (needs FUSE)."""

from __future__ import annotations

import mmap
import os

import pytest

from store.durable_journal import fsync_dir
from tests.faults.powerloss import PowerLossMount, fuse_unavailable

pytestmark = [pytest.mark.faults, pytest.mark.timeout(60)]


@pytest.fixture
def mount(tmp_path):
    why = fuse_unavailable()
    if why:
        pytest.skip(f"needs FUSE: {why}")
    m = PowerLossMount(tmp_path / "mnt", tmp_path / "disk")
    yield m
    m.close()


def synced(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def test_a_cut_keeps_exactly_what_was_synced(mount):
    d = mount.mountpoint / "shard"
    d.mkdir()
    synced(d / "a", b"synced")
    fsync_dir(d)
    with open(d / "a", "r+b") as f:  # written, never synced
        f.seek(6)
        f.write(b"+lost")
    synced(d / "c", b"file and directory entry synced")
    with open(d / "m", "wb") as f:
        f.write(b"\0" * 4096)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(d)
    with open(d / "m", "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:  # shared-writable mmap, msync'ed
        mm[:5] = b"hello"
        mm.flush()
    synced(d / "b", b"file synced, its directory entry not")
    os.rename(d / "m", d / "m2")  # a rename without a directory fsync
    assert (d / "a").read_bytes() == b"synced+lost" and sorted(os.listdir(d)) == ["a", "b", "c", "m2"]

    stats = mount.cut()

    assert sorted(os.listdir(d)) == ["a", "c", "m"]
    assert (d / "a").read_bytes() == b"synced"
    assert (d / "m").read_bytes()[:5] == b"hello"  # msync reached the file system as fsync
    assert (d / "c").read_bytes() == b"file and directory entry synced"
    assert stats["cuts"] == 1 and stats["dropped_writes"] >= 1 and stats["dropped_entries"] >= 2


def test_a_rename_made_durable_by_a_directory_fsync(mount):
    d = mount.mountpoint
    synced(d / "x", b"old")
    fsync_dir(d)
    synced(d / "x.tmp", b"new")
    os.replace(d / "x.tmp", d / "x")
    fsync_dir(d)
    mount.cut()
    assert os.listdir(d) == ["x"] and (d / "x").read_bytes() == b"new"
