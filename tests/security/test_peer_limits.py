"""Peer input limits on a real 3-replica cluster (one cluster for the module):
a Raft frame announcing 2**31-1 bytes is dropped when its length arrives (no
buffering, no election), and every refusal is logged once per peer."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time

import numpy as np
import pytest

from store.pysyncobj_adapter import MAX_RAFT_FRAME, oversized_frame
from tests.cluster.harness import Cluster
from tests.waiting import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("limits"), replicas=3, shards=1)
    with c.running():
        yield c


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def flood_raft_port(addr: tuple[str, int], announce: int, limit: int, seconds: float) -> int:
    """Announce a frame of `announce` bytes, then send junk until the replica
    drops the connection (or `limit` bytes / `seconds` went); returns bytes sent."""
    junk = os.urandom(1 << 20)
    sent = 0
    deadline = time.monotonic() + seconds
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(struct.pack("i", announce))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, TimeoutError):
            while sent < limit and time.monotonic() < deadline:
                sent += s.send(junk)
    return sent


def test_frame_lengths_are_checked_in_a_run_of_frames():
    ok = struct.pack("i", 3) + b"abc"
    assert oversized_frame(ok + ok[:2]) is None  # a partial length is not read
    assert oversized_frame(ok + struct.pack("i", MAX_RAFT_FRAME) + b"x") is None
    assert oversized_frame(ok + struct.pack("i", MAX_RAFT_FRAME + 1)) == MAX_RAFT_FRAME + 1
    assert oversized_frame(struct.pack("i", -5)) == -5


def test_a_frame_announcing_2gb_is_dropped_before_it_is_buffered(cluster):
    c = cluster
    leader = c.leader_of(0)
    target = next(n for n in c.ids if n != leader)  # a follower: its lost heartbeats would show as an election
    node = next(n for n in c.cfg.nodes if n.id == target)
    addr = node.raft_address(0)
    terms = {n: c.terms(n) for n in c.ids}
    pid = c.procs[target].pid
    before = rss_mb(pid)
    sent = [flood_raft_port((addr.host, addr.port), 2**31 - 1, 256 << 20, 10.0) for _ in range(3)]
    grown = rss_mb(pid) - before
    print(f"flooded {target}'s Raft port: sent {[s >> 20 for s in sent]} MB before the drop; RSS {grown:+.1f} MB")
    # what the kernel's socket buffers took before the replica read the length (4 MB each way), not more
    assert all(s < 32 << 20 for s in sent), sent
    assert grown < 48, f"RSS grew {grown:.0f} MB"
    assert c.put(leader, "after-flood", np.ones(4, np.float32)).status_code == 201
    assert {n: c.terms(n) for n in c.ids} == terms, "an election happened"
    log = (c.tmp / f"{target}.log").read_text()
    refused = [line for line in log.splitlines() if "refused Raft frame" in line]
    assert len(refused) == 1, refused  # three floods, one line (per peer, rate-limited)
    assert "announcing 2147483647 bytes" in refused[0] and "Traceback" not in log


def test_a_frame_under_another_secret_is_refused_and_logged_once(cluster):
    from pysyncobj.encryptor import getEncryptor

    c = cluster
    target = c.leader_of(0)  # not the replica flooded above: its refusals from this address are rate-limited
    node = next(n for n in c.cfg.nodes if n.id == target)
    addr = node.raft_address(0)
    frame = getEncryptor("not the cluster secret").encrypt_at_time(b"x" * 100, int(time.monotonic()))
    for _ in range(5):
        with socket.create_connection((addr.host, addr.port), timeout=5) as s:
            s.sendall(struct.pack("i", len(frame)) + frame)
            s.settimeout(5)
            assert s.recv(1) == b""  # dropped
    log = c.tmp / f"{target}.log"
    wait_until(lambda: "not authentic" in log.read_text(), 10, "the refusal logged")
    lines = [line for line in log.read_text().splitlines() if "not authentic" in line]
    assert len(lines) == 1, lines
