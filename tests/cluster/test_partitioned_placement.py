"""A partitioned tensor on 4 nodes with replication 2 (issue 16): no replica
hosts every part, so the entry replica forwards the parts it does not host to
a replica that does; a retried create (same X-Request-Id, same layout) is
idempotent; a long poll waits on the parts hosted elsewhere too."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from store.partitions import part_name, shard_of
from store.placement import hosts_for
from tests.cluster.harness import Cluster

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]

NAME, SHAPE, K, SHARDS = "wide", (1001, 8), 4, 4
LR = 0.5


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("partitioned-r2"), replicas=4, shards=SHARDS, replication=2)
    with c.running(timeout=60):
        yield c


def hosts(c: Cluster, shard: int) -> set[str]:
    return {n.id for n in hosts_for(shard, list(c.cfg.nodes), 2)}


def test_create_push_pull_through_a_replica_missing_parts_and_retried_create(cluster):
    c = cluster
    part_shards = [shard_of(part_name(NAME, i), SHARDS) for i in range(K)]
    entry = sorted(hosts(c, shard_of(NAME, SHARDS)))[0]  # hosts the layout, not every part
    assert any(entry not in hosts(c, s) for s in part_shards)
    init = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    opts = {"X-Partitions": str(K), "X-Optimizer": json.dumps({"type": "sgd", "lr": LR}), "X-Request-Id": "mk-1"}

    r = c.put(entry, NAME, init, opts)
    assert r.status_code == 201, r.text
    assert r.json()["versions"] == [1] * K
    again = c.put(entry, NAME, init, opts)  # the SDK's retry after a lost answer
    assert again.status_code in (200, 201), again.text
    assert again.json()["versions"] == [1] * K
    other = c.put(entry, NAME, init, {**opts, "X-Partitions": "2"})  # another layout is still refused
    assert other.status_code == 422, other.text

    grad = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    r = c.grad(entry, NAME, grad, {"X-Request-Id": "push-1"})
    assert r.status_code == 200, r.text
    assert r.json()["versions"] == [2] * K
    r = c.grad(entry, NAME, grad, {"X-Request-Id": "push-1"})  # a retried push applies each part once
    assert r.status_code == 200 and r.json()["versions"] == [2] * K, r.text

    expected = init - np.float32(LR) * grad
    for nid in sorted(hosts(c, shard_of(NAME, SHARDS))):  # every replica of the home shard serves it whole
        value, version = c.get(nid, NAME, min_version=2)
        assert version == 2
        assert value.tobytes() == expected.tobytes()
    value, version = c.get(entry, NAME, consistency="linearizable")
    assert version == 2 and value.tobytes() == expected.tobytes()

    # sparse pushes and row reads through the same replica: parts it does not host are forwarded
    from safetensors.numpy import save

    starts = np.cumsum([0] + [SHAPE[0] // K + (1 if i < SHAPE[0] % K else 0) for i in range(K)])[:-1]
    indices = np.array([int(starts[i]) + 1 for i in range(K)] + [int(starts[-1]) + 1], np.int64)
    values = np.random.default_rng(3).standard_normal((len(indices), SHAPE[1])).astype(np.float32)
    body = save({"indices": indices, "values": values})
    sparse_hd = {"Content-Type": "application/x-safetensors", "X-Request-Id": "rows-1"}
    for _ in range(2):  # the retry applies each part once
        r = c.http.post(f"{c.urls[entry]}/v1/tensors/{NAME}/grad-rows", content=body, headers=sparse_hd)
        assert r.status_code == 200 and r.json()["versions"] == [3] * K, r.text
    summed = np.zeros_like(expected)
    np.add.at(summed, indices, values)  # duplicate indices are summed first, as for a whole tensor
    touched = np.unique(indices)
    expected[touched] -= np.float32(LR) * summed[touched]
    one = save({"indices": np.array([0], np.int64), "values": values[:1]})  # the other parts get empty pushes
    r = c.http.post(
        f"{c.urls[entry]}/v1/tensors/{NAME}/grad-rows", content=one, headers=sparse_hd | {"X-Request-Id": "rows-2"}
    )
    assert r.status_code == 200 and r.json()["versions"] == [4] * K, r.text
    expected[0] -= np.float32(LR) * values[0]
    read = np.append(indices[::-1], 0)
    rows = ",".join(str(int(i)) for i in read)
    r = c.http.get(f"{c.urls[entry]}/v1/tensors/{NAME}", params={"rows": rows, "min_version": 4})
    assert r.status_code == 200, r.text
    got = np.frombuffer(r.content, np.float32).reshape(len(read), SHAPE[1])
    assert got.tobytes() == expected[read].tobytes()
    assert json.loads(r.headers["X-Versions"]) == [4] * K

    batch = save({NAME: np.ones(SHAPE, np.float32)})  # a batch push and pull through the same replica
    r = c.http.post(
        f"{c.urls[entry]}/v1/grads:batch", content=batch, headers={"Content-Type": "application/x-safetensors"}
    )
    assert r.status_code == 200 and r.json()["versions"] == {NAME: 5}, r.text
    expected -= np.float32(LR)
    r = c.http.get(
        f"{c.urls[entry]}/v1/tensors:batch", params={"names": NAME}, headers={"X-Min-Versions": json.dumps({NAME: 5})}
    )
    assert r.status_code == 200, r.text
    from safetensors.numpy import load

    assert load(r.content)[NAME].tobytes() == expected.tobytes()

    r = c.http.delete(f"{c.urls[entry]}/v1/tensors/{NAME}")
    assert r.status_code == 200, r.text
    for i, s in enumerate(part_shards):  # every part is gone, wherever it was hosted
        nid = sorted(hosts(c, s))[0]
        got = c.http.get(f"{c.urls[nid]}/v1/tensors/{part_name(NAME, i).replace('#', '%23')}")
        assert got.status_code == 404, (i, got.status_code, got.text)


def test_long_poll_waits_on_the_parts_hosted_elsewhere(cluster):
    c = cluster
    name = "polled"
    part_shards = [shard_of(part_name(name, i), SHARDS) for i in range(K)]
    entry = sorted(hosts(c, shard_of(name, SHARDS)))[0]
    elsewhere = [i for i, s in enumerate(part_shards) if entry not in hosts(c, s)]
    assert elsewhere, "the test needs a part the entry replica does not host"
    j = elsewhere[0]
    r = c.put(entry, name, np.zeros(SHAPE, np.float32), {"X-Partitions": str(K)})
    assert r.status_code == 201, r.text
    rows = [p["rows"] for p in r.json()["partitions"]]

    def push_part(i: int) -> None:
        grad = np.ones((rows[i][1] - rows[i][0], SHAPE[1]), np.float32)
        got = c.grad(sorted(hosts(c, part_shards[i]))[0], part_name(name, i).replace("#", "%23"), grad)
        assert got.status_code == 200 and got.json()["version"] == 2, got.text

    def poll(timeout: float) -> tuple[httpx.Response, float]:
        t0 = time.monotonic()
        got = c.http.head(
            f"{c.urls[entry]}/v1/tensors/{name}",
            params={"wait_version_gt": 1, "timeout": timeout},
            timeout=timeout + 10,
        )
        return got, time.monotonic() - t0

    for i in range(K):
        if i != j:
            push_part(i)
    # Every part but j is past 1: the poll waits for j on its host, and times out.
    got, _ = poll(2.0)
    assert got.status_code == 304, (got.status_code, got.headers)
    versions = json.loads(got.headers["X-Versions"])
    assert versions[j] == 1 and got.headers["X-Version"] == "1", versions

    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(poll, 30.0)
        push_part(j)
        got, took = waiting.result(timeout=40)
    assert got.status_code == 200, (got.status_code, got.headers)
    assert json.loads(got.headers["X-Versions"]) == [2] * K and got.headers["X-Version"] == "2"
    assert took < 25, took  # woken by the push, not by the timeout
