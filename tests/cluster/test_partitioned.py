"""A partitioned tensor on a 3-replica, 3-shard cluster: parts on every shard
with their leaders on different nodes; concurrent pushes through different
replicas; SIGKILL of one part's leader in the middle of a push."""

import json
import threading
import uuid

import numpy as np
import pytest
from pysyncobj.utility import TcpUtility

from paramstore import Client
from store.partitions import part_name, shard_of
from tests.cluster.harness import Cluster
from tests.waiting import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

NAME, SHAPE, K = "emb", (3000, 16), 3
LR = 0.25


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Elections slower than the request deadline: a part whose leader is
    # killed stays leaderless past the push's deadline (503), deterministically.
    c = Cluster(
        tmp_path_factory.mktemp("partitioned"),
        replicas=3,
        shards=3,
        raft={"min_timeout": 2.5, "max_timeout": 3.0, "connection_timeout": 3.5},
        limits={"request_timeout": 1.5},
    )
    with c.running(timeout=60):
        yield c


def part_shards() -> list[int]:
    return [shard_of(part_name(NAME, i), 3) for i in range(K)]


def lead(c: Cluster, shard: int, nid: str) -> None:
    """Hand shard `shard`'s leadership to `nid` (Raft TimeoutNow)."""
    target = str(c.cfg.node_by_id(nid).raft_address(shard))

    def moved() -> bool:
        leader = c.leader_of(shard, timeout=20)
        if leader == nid:
            return True
        source = str(c.cfg.node_by_id(leader).raft_address(shard))
        TcpUtility(c.cfg.raft.password, timeout=2.0).executeCommand(source, ["transfer", target])
        return False

    wait_until(moved, 30, f"{nid} leads shard {shard}", interval=0.5)


def whole(c: Cluster, nid: str, **params) -> tuple[bytes, list[int]]:
    r = c.http.get(f"{c.urls[nid]}/v1/tensors/{NAME}", params=params)
    assert r.status_code == 200, r.text
    return r.content, json.loads(r.headers["X-Versions"])


def test_parts_on_every_shard_with_leaders_on_every_node_and_concurrent_pushes_agree(cluster):
    c = cluster
    init = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    with Client(list(c.urls.values())) as client:
        assert client.create(NAME, init, optimizer={"type": "sgd", "lr": LR}, partitions=K) == 1
        assert len(client._layouts[NAME].rows) == K  # pushes and pulls go to the parts from now on
        value, version = client.pull(NAME)
        assert version == 1 and value.tobytes() == init.tobytes()
    listed = {t["name"]: t for t in c.http.get(c.urls["n2"] + "/v1/tensors").json()}
    assert [p["shard"] for p in listed[NAME]["partitions"]] == part_shards()
    assert sorted(part_shards()) == [0, 1, 2]
    for i, shard in enumerate(part_shards()):  # part i led by n(i+1)
        lead(c, shard, c.ids[i])
    assert [c.leader_of(s) for s in part_shards()] == c.ids

    pushes = 4
    grads = {nid: np.random.default_rng(i + 1).standard_normal(SHAPE).astype(np.float32) for i, nid in enumerate(c.ids)}
    errors: list[BaseException] = []

    def pusher(nid: str) -> None:
        """Each client learns the parts from its first answer and then pushes
        them itself, in parallel; n3's client knows every replica and sends
        each part to its shard's leader."""
        try:
            with Client(list(c.urls.values()) if nid == "n3" else c.urls[nid]) as client:
                for _ in range(pushes):
                    client.push_grad(NAME, grads[nid])
                assert NAME in client._layouts
                if nid == "n3":
                    assert client._layouts[NAME].replicas == (0, 1, 2)  # n(i+1) leads part i's shard
                assert client.pull(NAME)[1] >= pushes + 1
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=pusher, args=(nid,)) for nid in c.ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    final = 1 + pushes * len(c.ids)
    answers = {nid: whole(c, nid, min_version=final) for nid in c.ids}
    assert {tuple(v) for _, v in answers.values()} == {(final,) * K}
    assert len({body for body, _ in answers.values()}) == 1  # every part bit-identical on every replica
    got = np.frombuffer(answers["n1"][0], np.float32).reshape(SHAPE)
    expected = init - LR * pushes * sum(grads.values())
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_a_part_whose_leader_is_killed_fails_alone_and_a_retry_applies_each_part_once(cluster):
    c = cluster
    before, versions = whole(c, "n1", consistency="linearizable")
    assert len(set(versions)) == 1
    v = versions[0]
    victim = c.leader_of(part_shards()[2])  # n3, from the test above
    assert victim == "n3" and c.leader_of(part_shards()[0]) == "n1" and c.leader_of(part_shards()[1]) == "n2"
    grad = np.ones(SHAPE, np.float32)
    rid = uuid.uuid4().hex
    c.kill(victim)
    r = c.grad("n1", NAME, grad, headers={"X-Request-Id": rid})
    assert r.status_code == 503, r.text
    body = r.json()
    assert [f["part"] for f in body["failed"]] == [2] and "part 2" in body["detail"]
    assert sorted((a["part"], a["version"]) for a in body["applied"]) == [(0, v + 1), (1, v + 1)]

    c.leader_of(part_shards()[2], timeout=30, among=["n1", "n2"])
    for _ in range(2):  # the retry, and a retry of the retry: each part applied once
        r = c.grad("n2", NAME, grad, headers={"X-Request-Id": rid})
        assert r.status_code == 200, r.text
        assert r.json()["versions"] == [v + 1] * K
    after, versions = whole(c, "n2", consistency="linearizable")
    assert versions == [v + 1] * K
    expected = np.frombuffer(before, np.float32) - np.float32(LR) * grad.ravel()
    assert after == expected.astype(np.float32).tobytes()
    assert whole(c, "n1", min_version=v + 1)[0] == after

    with Client([c.urls["n1"], c.urls["n2"]]) as client:  # the SDK, straight to the parts, after the failover
        client.pull(NAME)
        assert client.push_grad(NAME, grad) == v + 2 and NAME in client._layouts
        value, version = client.pull(NAME)
    assert version == v + 2 and whole(c, "n2", min_version=v + 2)[1] == [v + 2] * K
    assert value.tobytes() == (expected - np.float32(LR) * grad.ravel()).astype(np.float32).tobytes()
