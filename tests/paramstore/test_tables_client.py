"""Embedding tables through the client on a real 3-replica cluster (2 shards)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from paramstore import Client
from tests.paramstore.devcluster import DevCluster

pytestmark = pytest.mark.cluster


def test_create_push_and_read_back_from_every_replica(ps: Client, cluster: DevCluster) -> None:
    info = ps.create_table(
        "user_emb", dim=8, optimizer={"type": "sgd", "lr": 1.0}, initializer={"type": "normal", "std": 0.1, "seed": 3}
    )
    assert info["rows"] == 0 and info["config"]["dim"] == 8
    ids = np.array([2**62 + 5, -3, 7, 7], dtype=np.int64)  # unbounded IDs, one duplicate
    start = ps.lookup("user_emb", ids[:3])
    out = ps.push_rows("user_emb", ids, np.ones((4, 8), np.float32))
    assert sum(part["rows"] for part in out["shards"].values()) == 3
    expect = start - np.array([[1.0], [1.0], [2.0]], dtype=np.float32)
    for url in cluster.urls:
        with Client([url]) as one:
            assert np.array_equal(one.lookup("user_emb", ids[:3], consistency="linearizable"), expect)
    assert ps.table_info("user_emb")["rows"] == 3
    assert "user_emb" in [t["name"] for t in ps.list_tables()]


def test_concurrent_pushes_to_overlapping_ids_leave_identical_replicas(ps: Client, cluster: DevCluster) -> None:
    ps.create_table(
        "shared_emb",
        dim=16,
        optimizer={"type": "rowwise_adagrad", "lr": 0.05},
        admission={"min_count": 2, "width": 4096},
        eviction={"max_rows": 300},
    )
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            with Client(cluster.urls, timeout=5.0, deadline=30.0) as c:
                for _ in range(15):
                    ids = rng.zipf(1.3, 256) % 1000
                    c.push_rows("shared_emb", ids, rng.normal(0, 1, (256, 16)).astype(np.float32))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    probe = np.arange(1000)
    views = []
    for url in cluster.urls:
        with Client([url]) as one:
            views.append(
                (
                    one.lookup("shared_emb", probe, consistency="linearizable"),
                    {
                        k: v
                        for k, v in one.table_info("shared_emb").items()
                        if k != "bytes_on_disk" and k != "bytes_in_memory"
                    },
                )
            )
    rows0, info0 = views[0]
    assert 0 < info0["rows"] <= 300 * 2 and info0["refused"] > 0
    for rows, info in views[1:]:
        assert np.array_equal(rows, rows0) and info == info0
