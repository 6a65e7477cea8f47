"""Three real replicas on loopback: replication, linearizable reads, CAS races."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.cluster.harness import wait_version_everywhere

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]


def follower_of(cluster, name):
    leader = cluster.leader_of(cluster.shard_of(name))
    return next(n for n in cluster.ids if n != leader), leader


def test_write_on_follower_read_linearizably_elsewhere(make_cluster):
    c = make_cluster()
    follower, _ = follower_of(c, "w")
    other = next(n for n in c.ids if n not in (follower,))
    value = np.arange(12, dtype=np.float32).reshape(3, 4)
    r = c.put(follower, "w", value)
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 1
    for nid in c.ids:
        got, version = c.get(nid, "w", consistency="linearizable")
        assert version == 1 and np.array_equal(got, value)
    # a large value goes over the data path, not through the Raft log
    big = np.random.default_rng(0).standard_normal(300_000).astype(np.float32)
    assert c.put(follower, "big", big).status_code == 201
    got, version = c.get(other, "big", consistency="linearizable")
    assert version == 1 and np.array_equal(got, big)


def test_min_version_gives_read_your_writes_on_any_replica(make_cluster):
    c = make_cluster()
    c.put("n1", "t", np.zeros(4, np.float32))
    for i in range(1, 20):
        r = c.put("n2", "t", np.full(4, i, np.float32))
        v = r.json()["version"]
        got, version = c.get("n3", "t", min_version=v)
        assert version >= v and got[0] == i


def test_cas_races_have_exactly_one_winner_per_version(make_cluster):
    c = make_cluster()
    c.put("n1", "cas", np.zeros(1, np.int64))
    rounds, clients = 8, 6
    wins: dict[int, list[int]] = {}

    def attempt(args):
        version, who = args
        nid = c.ids[who % 3]
        with httpx.Client(timeout=10) as h:
            r = h.put(
                f"{c.urls[nid]}/v1/tensors/cas",
                content=np.array([who], np.int64).tobytes(),
                headers={
                    "Content-Type": "application/octet-stream",
                    "X-Dtype": "int64",
                    "X-Shape": "1",
                    "If-Match": f'"{version}"',
                },
            )
        assert r.status_code in (200, 412), r.text
        if r.status_code == 412:
            assert r.json()["error"] == "precondition_failed"
            assert r.json()["current_version"] >= version + 1
        return r.status_code == 200, who

    with ThreadPoolExecutor(clients) as pool:
        for version in range(1, rounds + 1):
            outcomes = list(pool.map(attempt, [(version, w) for w in range(clients)]))
            winners = [who for ok, who in outcomes if ok]
            assert len(winners) == 1, f"version {version}: winners {winners}"
            wins[version] = winners
    wait_version_everywhere(c, "cas", rounds + 1)
    for nid in c.ids:
        got, version = c.get(nid, "cas")
        assert version == rounds + 1
        assert got[0] == wins[rounds][0]


def test_gradient_pushes_apply_identically_everywhere(make_cluster):
    c = make_cluster()
    rng = np.random.default_rng(1)
    shape = (64, 32)
    r = c.put(
        "n1",
        "p",
        rng.standard_normal(shape).astype(np.float32),
        headers={"X-Optimizer": '{"type": "adam", "lr": 0.01}'},
    )
    assert r.status_code == 201

    def push(i):
        nid = c.ids[i % 3]
        return c.grad(nid, "p", rng.standard_normal(shape).astype(np.float32)).status_code

    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(push, range(40))) == {200}
    wait_version_everywhere(c, "p", 41)
    digests = {c.digest(nid, "p")[0] for nid in c.ids}
    assert len(digests) == 1


def test_logs_are_json_lines_with_shard_and_term(make_cluster):
    import json

    c = make_cluster()
    docs = [json.loads(line) for line in (c.tmp / "n1.log").read_text().splitlines() if line.startswith("{")]
    raft = [d for d in docs if "shard" in d and "term" in d]
    assert raft and all(d["node"] == "n1" and d["level"] in ("info", "warning") for d in raft)
    assert any("leader is now" in d["msg"] for d in raft)
