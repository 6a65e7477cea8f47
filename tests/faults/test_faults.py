"""Jepsen-style scenarios: real faults under concurrent load, then the checker.

Replicas run on 127.0.0.1/2/3 inside a private network namespace and
partitions are nftables rules there, or, where namespaces are not allowed,
replicas drop Raft messages on cut links (tests/faults/modes.py; the test id
says which). Every scenario heals, waits for the replicas to converge, and
checks the whole history for linearizability, acknowledged writes and
identical bytes on every replica.
"""

import time

import numpy as np
import pytest

from tests.faults.checks import converge_and_check, run_for
from tests.faults.history import History, check
from tests.faults.workload import Workload
from tests.waiting import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.faults, pytest.mark.timeout(180)]

HOST = {"n1": "127.0.0.1", "n2": "127.0.0.2", "n3": "127.0.0.3"}


def test_leader_partitioned_from_majority(fault_cluster):
    c = fault_cluster
    load = Workload(c).start()
    run_for(2)
    shard = c.shard_of(load.tensor)
    leader = c.leader_of(shard)
    majority = [n for n in c.ids if n != leader]
    c.faults.isolate(HOST[leader], [HOST[n] for n in majority])
    cut_at = time.monotonic()
    try:
        new = c.leader_of(shard, timeout=20, among=majority)
        assert new != leader
        wait_until(lambda: load.acked_writes_after(cut_at + 0.5) >= 5, 20, "the majority commits writes")
        print(f"leader partitioned: first write acknowledged {load.recovery_seconds(cut_at):.2f}s after the cut")
        # the minority serves no linearizable read
        r = c.http.get(
            f"{c.urls[leader]}/v1/tensors/{load.tensor}", params={"consistency": "linearizable", "timeout": 1}
        )
        assert r.status_code == 503, r.status_code
        # ...while a plain local read there is stale, and the checker must say so
        stale = c.http.get(f"{c.urls[leader]}/v1/tensors/{load.tensor}")
        probe = History(ops=list(load.history.ops))
        op = probe.begin(99, "read", load.tensor, replica=leader)
        History.end(op, "ok", int(stale.headers["X-Version"]), int(np.frombuffer(stale.content, np.int64)[0]))
        assert any("stale read" in v for v in check(probe.ops)), "a stale local read went unflagged"
    finally:
        c.faults.heal()
        healed_at = time.monotonic()
    minority_acks = [
        o
        for o in load.history.ops
        if o.kind == "write"
        and o.replica == leader
        and o.status == "ok"
        and o.invoke > cut_at + 0.1
        and o.complete < healed_at
    ]
    assert minority_acks == [], "the partitioned old leader acknowledged writes"
    run_for(2)
    converge_and_check(c, load, load.finish())


def test_follower_partitioned(fault_cluster):
    c = fault_cluster
    load = Workload(c).start()
    shard = c.shard_of(load.tensor)
    leader = c.leader_of(shard)
    follower = next(n for n in c.ids if n != leader)
    term = c.status(leader)["shards"][shard]["term"]
    c.faults.isolate(HOST[follower], [HOST[n] for n in c.ids if n != follower])
    cut_at = time.monotonic()
    try:
        wait_until(lambda: load.acked_writes_after(cut_at + 0.5) >= 10, 20, "writes continue")
        print(f"follower partitioned: first write acknowledged {load.recovery_seconds(cut_at):.2f}s after the cut")
        assert c.status(leader)["shards"][shard]["leader"] == leader
        assert c.status(leader)["shards"][shard]["term"] == term, "the leader was disturbed"
        r = c.http.get(
            f"{c.urls[follower]}/v1/tensors/{load.tensor}", params={"consistency": "linearizable", "timeout": 1}
        )
        assert r.status_code == 503, f"the cut follower served a linearizable read ({r.status_code})"
    finally:
        c.faults.heal()
    run_for(2)
    converge_and_check(c, load, load.finish())


def test_leader_paused(fault_cluster):
    c = fault_cluster
    load = Workload(c).start()
    shard = c.shard_of(load.tensor)
    leader = c.leader_of(shard)
    c.pause(leader)
    paused_at = time.monotonic()
    try:
        others = [n for n in c.ids if n != leader]
        assert c.leader_of(shard, timeout=20, among=others) != leader
        wait_until(lambda: load.acked_writes_after(paused_at + 0.5) >= 5, 20, "writes continue")
        print(f"leader paused: first write acknowledged {load.recovery_seconds(paused_at):.2f}s after SIGSTOP")
        run_for(1)
    finally:
        c.resume(leader)
    run_for(2)
    converge_and_check(c, load, load.finish())


def test_leader_killed_twice(fault_cluster):
    c = fault_cluster
    load = Workload(c).start()
    shard = c.shard_of(load.tensor)
    for _ in range(2):
        leader = c.leader_of(shard)
        killed_at = time.monotonic()
        c.kill(leader)
        others = [n for n in c.ids if n != leader]
        c.leader_of(shard, timeout=20, among=others)
        wait_until(lambda t=killed_at: load.acked_writes_after(t + 0.2) >= 5, 20, "writes continue")
        print(f"leader killed: first write acknowledged {load.recovery_seconds(killed_at):.2f}s after SIGKILL")
        c.restart(leader, timeout=40)
    run_for(2)
    converge_and_check(c, load, load.finish())
