"""Embedding tables on 3 real replicas: a shard leader SIGKILLed in the middle
of pushes, writes go on, and the restarted replica (which replays its log over
tables that are already ahead of it) ends with identical bytes."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from paramstore import Client
from tests.waiting import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]


def digests(c, nid: str, name: str) -> dict[str, tuple[int, str]]:
    info = c.http.get(c.urls[nid] + f"/v1/tables/{name}", params={"digest": 1}, timeout=30).json()
    return {s: (part["version"], part["digest"]) for s, part in info["shards"].items()}


def test_leader_killed_mid_push_restart_catches_up_to_identical_tables(make_cluster) -> None:
    c = make_cluster()
    name = "ads_emb"
    urls = [c.urls[n] for n in c.ids]
    with Client(urls, timeout=5.0, deadline=60.0) as ps:
        ps.create_table(
            name,
            dim=32,
            optimizer={"type": "sparse_adam", "lr": 0.01},
            initializer={"type": "normal", "std": 0.01},
            admission={"min_count": 2},
        )
    stop = threading.Event()
    pushed = [0]
    errors: list[BaseException] = []

    def pusher(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            with Client(urls, timeout=5.0, deadline=60.0) as ps:
                while not stop.is_set():
                    ids = rng.zipf(1.2, 512).astype(np.int64) * 7919
                    ps.push_rows(name, ids, rng.normal(0, 1, (512, 32)).astype(np.float32))
                    pushed[0] += 1
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=pusher, args=(s,)) for s in range(2)]
    for t in threads:
        t.start()
    wait_until(lambda: pushed[0] >= 10, 30, "pushes under way")
    victim = c.leader_of(0)
    c.kill(victim)
    survivors = [n for n in c.ids if n != victim]
    before = pushed[0]
    wait_until(lambda: pushed[0] >= before + 10, 60, "pushes continuing without the old leader")
    c.restart(victim)
    wait_until(lambda: pushed[0] >= before + 20, 60, "pushes continuing with the restarted replica")
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors

    # every replica applies the same log: wait until all report the same per-shard versions
    def same() -> bool:
        for nid in c.ids:  # a barrier on each replica, then compare
            c.http.get(c.urls[nid] + f"/v1/tables/{name}", params={"consistency": "linearizable"}, timeout=30)
        seen = [digests(c, nid, name) for nid in c.ids]
        return all(s == seen[0] for s in seen)

    wait_until(same, 60, "identical table digests on every replica", interval=0.5)
    assert survivors and victim in c.ids

    # min_version: a lookup on any replica waits for the versions a push answered
    hot = np.array([7919, 2 * 7919, 3 * 7919], dtype=np.int64)  # zipf's heaviest: admitted long ago
    with Client(urls, timeout=5.0, deadline=60.0) as ps:
        before = ps.lookup(name, hot, consistency="linearizable")
        answer = ps.push_rows(name, hot, np.ones((3, 32), np.float32))
    seen = []
    for nid in c.ids:
        with Client([c.urls[nid]], timeout=15.0) as one:
            seen.append(one.lookup(name, hot, min_version=answer, timeout=10))
    assert all(np.array_equal(rows, seen[0]) for rows in seen)
    assert not np.array_equal(seen[0], before)


def test_a_joining_replica_receives_the_tables_over_the_data_path(tmp_path) -> None:
    """A fourth replica joins: it downloads each shard's Raft snapshot and a
    checkpoint of its tables (hard links at the source, sendfile), replays
    the log after them, and serves the same rows; no election."""
    from tests.cluster.harness import Cluster
    from tests.ports import free_range

    hosts, spare = ["127.0.0.1", "127.0.0.2", "127.0.0.3"], ["127.0.0.4"]
    c = Cluster(tmp_path, hosts=hosts, spare_hosts=spare, base_port=free_range(5, *hosts, *spare))
    try:
        c.start()
        c.wait_ready(timeout=40)
        urls = [c.urls[n] for n in c.ids]
        rng = np.random.default_rng(5)
        with Client(urls, timeout=5.0, deadline=60.0) as ps:
            ps.create_table(
                "joined_emb",
                dim=16,
                optimizer={"type": "ftrl", "lr": 0.1, "l1": 0.01},
                admission={"min_count": 2},
                eviction={"ttl_versions": 40},
            )
            for _ in range(30):
                ids = rng.zipf(1.3, 256).astype(np.int64)
                ps.push_rows("joined_emb", ids, rng.normal(0, 1, (256, 16)).astype(np.float32))
        terms = {n: c.terms(n) for n in c.ids}
        c.start_joining("n4", seed="n2")
        c.wait_ready(["n4"], timeout=60)
        with Client(urls, timeout=5.0, deadline=60.0) as ps:  # writes after the join reach n4 through Raft
            for _ in range(5):
                ids = rng.zipf(1.3, 256).astype(np.int64)
                ps.push_rows("joined_emb", ids, rng.normal(0, 1, (256, 16)).astype(np.float32))
        assert {n: c.terms(n) for n in terms} == terms, "a join must not cause an election"
        log = (tmp_path / "n4.log").read_text()
        assert log.count("joining: shard") >= 2, log[-2000:]
        everyone = [*c.ids, "n4"]

        def same() -> bool:
            for nid in everyone:
                c.http.get(c.urls[nid] + "/v1/tables/joined_emb", params={"consistency": "linearizable"}, timeout=30)
            seen = [digests(c, nid, "joined_emb") for nid in everyone]
            return all(s == seen[0] for s in seen)

        wait_until(same, 60, "identical table digests on all four replicas", interval=0.5)
    finally:
        c.close()


def test_a_replica_brought_up_to_date_by_a_snapshot_fetches_the_tables(make_cluster) -> None:
    """A replica down while the others compact their logs gets a Raft snapshot
    from the leader, which does not hold tables: it then fetches the leader's
    tables over the data path before applying anything after the snapshot."""
    c = make_cluster(raft={"compaction_min_entries": 20})
    name = "lagging_emb"
    urls = [c.urls[n] for n in c.ids]
    rng = np.random.default_rng(9)
    with Client(urls, timeout=5.0, deadline=60.0) as ps:
        ps.create_table(name, dim=8, optimizer={"type": "adagrad", "lr": 0.1})
        ps.push_rows(name, np.arange(100), np.ones((100, 8), np.float32))
        c.kill("n3")
        with Client([c.urls["n1"], c.urls["n2"]], timeout=5.0, deadline=60.0) as two:
            for _ in range(80):  # far more entries than the logs keep
                ids = rng.integers(0, 500, 64)
                two.push_rows(name, ids, rng.normal(0, 1, (64, 8)).astype(np.float32))
    c.restart("n3")

    def same() -> bool:
        for nid in c.ids:
            c.http.get(c.urls[nid] + f"/v1/tables/{name}", params={"consistency": "linearizable"}, timeout=30)
        seen = [digests(c, nid, name) for nid in c.ids]
        return all(s == seen[0] for s in seen)

    wait_until(same, 60, "identical table digests after the snapshot", interval=0.5)
    assert "tables from" in (c.tmp / "n3.log").read_text(), "n3 was expected to receive a Raft snapshot"


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def test_a_table_larger_than_the_memory_cap_stays_within_it(make_cluster) -> None:
    """~340 MB of rows per replica with a 16 MB cache: once the table is
    written, reading rows all over it (and pushing more) grows a replica's RSS
    by about the cache, not by the rows read (~160 MB of them)."""
    cap = 16 << 20
    c = make_cluster(limits={"table_cache_bytes": cap})
    name = "big_emb"
    urls = [c.urls[n] for n in c.ids]
    pid = c.procs["n2"].pid
    rng = np.random.default_rng(3)
    rows, batch, dim = 300_000, 4096, 256
    with Client(urls, timeout=10.0, deadline=120.0) as ps:
        ps.create_table(name, dim=dim, optimizer={"type": "sgd", "lr": 0.1})
        for start in range(0, rows, batch):
            ids = np.arange(start, min(rows, start + batch))
            ps.push_rows(name, ids, np.ones((len(ids), dim), np.float32))
    before = peak = rss_of(pid)
    with Client([c.urls["n2"]], timeout=10.0, deadline=60.0) as n2, Client(urls, timeout=10.0) as ps:
        for i in range(40):
            got = n2.lookup(name, rng.integers(0, rows, batch))
            assert got.shape == (batch, dim)
            if i % 4 == 0:
                ids = rng.integers(0, rows, batch)
                ps.push_rows(name, ids, rng.normal(0, 1, (batch, dim)).astype(np.float32))
            peak = max(peak, rss_of(pid))
        info = n2.table_info(name)
    on_disk = info["bytes_on_disk"]
    grown = peak - before
    print(f"rows on disk {on_disk >> 20} MB, RSS {before >> 20} -> peak {peak >> 20} MB, cap {cap >> 20} MB")
    assert on_disk > 250 << 20, info
    assert grown <= cap + (64 << 20), f"RSS grew {grown >> 20} MB with {on_disk >> 20} MB of rows, cap {cap >> 20} MB"
