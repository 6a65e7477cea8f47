"""SIGKILL and SIGSTOP a shard leader; elections, catch-up from disk."""

import numpy as np
import pytest

from tests.cluster.harness import wait_version_everywhere
from tests.waiting import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]


def test_leader_killed_new_leader_writes_continue_and_restart_catches_up(make_cluster):
    c = make_cluster()
    name = "weights"
    shard = c.shard_of(name)
    rng = np.random.default_rng(2)
    c.put("n1", name, np.zeros(50_000, np.float32), headers={"X-Optimizer": '{"type":"sgd","lr":0.1}'})
    for i in range(5):
        assert c.grad(c.ids[i % 3], name, rng.standard_normal(50_000).astype(np.float32)).status_code == 200
    old_leader = c.leader_of(shard)
    c.kill(old_leader)
    survivors = [n for n in c.ids if n != old_leader]
    new_leader = c.leader_of(shard, timeout=20, among=survivors)
    assert new_leader != old_leader
    # writes continue on the surviving majority, through either survivor
    for i in range(10):
        nid = survivors[i % 2]
        r = c.grad(nid, name, rng.standard_normal(50_000).astype(np.float32))
        assert r.status_code == 200, r.text
    last = c.get(survivors[0], name, consistency="linearizable")[1]
    assert last == 16
    # the killed replica restarts from its data dir and catches up to identical bytes
    c.restart(old_leader)
    wait_version_everywhere(c, name, last)
    digests = {nid: c.digest(nid, name) for nid in c.ids}
    assert len(set(digests.values())) == 1, digests


def test_paused_leader_is_replaced_and_rejoins(make_cluster):
    c = make_cluster()
    c.put("n1", "x", np.ones(10, np.float32))
    shard = c.shard_of("x")
    leader = c.leader_of(shard)
    others = [n for n in c.ids if n != leader]
    c.pause(leader)
    try:
        wait_until(
            lambda: c.status(others[0])["shards"][shard]["leader"] not in (None, leader),
            20,
            "a new leader while the old one is paused",
        )
        r = c.put(others[0], "x", np.full(10, 2, np.float32))
        assert r.status_code == 200, r.text
    finally:
        c.resume(leader)
    wait_version_everywhere(c, "x", 2)
    got, _ = c.get(leader, "x", consistency="linearizable")
    assert got[0] == 2


def test_write_forwarded_to_a_leader_that_just_died_is_reproposed(make_cluster):
    """A follower forwards to the leader it knows; if that leader is dead the
    command is lost on the way. The replica proposes it again once a new
    leader is known (same request id: applied at most once)."""
    c = make_cluster()
    c.put("n1", "fw", np.zeros(4, np.float32), headers={"X-Optimizer": '{"type":"sgd","lr":1.0}'})
    shard = c.shard_of("fw")
    leader = c.leader_of(shard)
    survivor = next(n for n in c.ids if n != leader)
    c.kill(leader)
    r = c.grad(survivor, "fw", np.ones(4, np.float32), headers={"X-Request-Id": "fw-after-kill"})
    assert r.status_code == 200, r.text
    got, version = c.get(survivor, "fw", consistency="linearizable")
    assert version == 2 and got.tolist() == [-1.0] * 4  # applied exactly once
