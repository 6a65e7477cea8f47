"""Membership changes under load: add a fourth replica (it catches up from a
snapshot fetched over the data path, not through Raft messages), remove
replicas (the leader among them), and replace a dead replica with an empty
one. Every scenario ends with the history checker and identical bytes."""

import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.cluster.harness import ROOT, Cluster
from tests.faults.checks import converge_and_check, run_for
from tests.faults.workload import Workload
from tests.waiting import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.faults, pytest.mark.timeout(240)]

BULK_MB = 96  # bulk state the joining replica must download (per run, over 2 shards)


def cli(c: Cluster, *args: str) -> str:
    """`paramstore cluster ...` run inside the namespace; returns its output."""
    proc = subprocess.run(
        [*c.launcher, sys.executable, "-m", "api.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=90,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.returncode == 0, f"{args}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def members(c: Cluster, via: str) -> list[list[str]]:
    return [sorted(s["replicas"]) for s in c.status(via)["shards"]]


def elections(c: Cluster, nodes: list[str]) -> dict[str, list[int]]:
    return {n: c.terms(n) for n in nodes}


def load_bulk(c: Cluster) -> dict[str, str]:
    """Tensors spread over both shards, so the snapshot is worth fetching."""
    digests = {}
    rng = np.random.default_rng(7)
    for i in range(BULK_MB // 16):
        name = f"bulk{i}"
        r = c.put("n1", name, rng.standard_normal(4 << 20, dtype=np.float32))
        assert r.status_code == 201, r.text
        digests[name] = c.digest("n1", name, consistency="linearizable")[0]
    return digests


def test_add_a_fourth_replica_under_load_then_remove_two(member_cluster):
    c = member_cluster
    bulk = load_bulk(c)
    load = Workload(c).start()
    run_for(1.5)
    terms_before = elections(c, c.ids)

    started = time.monotonic()
    c.start_joining("n4", seed="n2")
    c.wait_ready(["n4"], timeout=60)
    joined = time.monotonic() - started
    assert members(c, "n1") == [["n1", "n2", "n3", "n4"]] * 2
    assert elections(c, ["n1", "n2", "n3"]) == terms_before, "a join must not cause an election"
    log = (c.tmp / "n4.log").read_text()
    fetched = [int(m) for m in re.findall(r"joining: shard \d+ snapshot from n\d, (\d+) bytes", log)]
    assert len(fetched) == 2 and sum(fetched) >= BULK_MB << 20, log[-2000:]
    c.ids.append("n4")
    for name, digest in bulk.items():
        assert c.digest("n4", name)[0] == digest
    print(f"n4 joined under load: {sum(fetched) >> 20} MB of snapshots, ready {joined:.2f}s after start, 0 elections")

    # remove two of the original members, the leader of shard 0 first: n4 is then
    # one of the two voters every commit needs
    leader = c.leader_of(0)
    other = next(n for n in ("n2", "n3") if n != leader)
    for gone in (leader, other):
        removed_at = time.monotonic()
        survivor = next(n for n in c.ids if n != gone)
        out = cli(c, "cluster", "remove", gone, "--url", c.urls[survivor])
        assert out.count(f"{gone} removed") == 2, out
        c.ids.remove(gone)
        wait_until(lambda g=gone, s=survivor: all(g not in m for m in members(c, s)), 10, f"{gone} gone")
        wait_until(lambda t=removed_at: load.acked_writes_after(t) >= 5, 20, "writes go on")
    assert members(c, "n4") == [sorted(c.ids)] * 2
    # the joined replica restarts from its own data dir (membership.json, a
    # journal with membership entries) without --join
    c.kill("n4")
    c.restart("n4", timeout=40)
    assert members(c, "n4") == [sorted(c.ids)] * 2
    history = load.finish()
    converge_and_check(c, load, history)


def test_replace_a_dead_replica_with_an_empty_one(member_cluster):
    c = member_cluster
    load = Workload(c).start()
    run_for(1.5)
    c.kill("n3")
    c.ids.remove("n3")
    killed_at = time.monotonic()
    out = cli(c, "cluster", "remove", "n3", "--url", c.urls["n1"])
    assert out.count("n3 removed") == 2, out
    c.start_joining("n5", seed="n1")
    c.wait_ready(["n5"], timeout=60)
    c.ids.append("n5")
    assert members(c, "n2") == [["n1", "n2", "n5"]] * 2
    print(f"n3 replaced by n5 {time.monotonic() - killed_at:.2f}s after the kill")
    # n5 is a real voter: with n1 gone, n2 + n5 are the majority that commits
    c.kill("n1")
    c.ids.remove("n1")
    killed_at = time.monotonic()
    wait_until(lambda: load.acked_writes_after(killed_at + 0.5) >= 5, 30, "n2 + n5 commit writes")
    # n1 comes back from a journal holding the membership changes
    c.restart("n1", timeout=40)
    c.ids.append("n1")
    # ready means serving, not caught up: the leader may still be sending n1 the entries that added n5
    want = [["n1", "n2", "n5"]] * 2
    wait_until(lambda: members(c, "n1") == want, 30, "restarted n1 reports the membership with n5")
    history = load.finish()
    converge_and_check(c, load, history)
