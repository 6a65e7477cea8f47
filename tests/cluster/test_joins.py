"""Joins and removals back to back under write load, on one 3-replica cluster
(nodes on 127.0.0.1-3, a spare on 127.0.0.4).

The first join follows an abandoned one: a joiner that fetched its snapshots
and never registered left the sources holding log compaction (for a joiner
that matches the snapshot index, or 120 s), and the next joiner's snapshot,
which needs a forced compaction, did not come within the deadline ("no
snapshot within the deadline", the bench.join failure of issue 17)."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from store.datapath import DataPathClient
from store.peer_auth import datapath_key
from tests.cluster.harness import Cluster
from tests.ports import free_range
from tests.waiting import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

HOSTS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
SPARE = "127.0.0.4"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(
        tmp_path_factory.mktemp("joins"),
        hosts=HOSTS,
        spare_hosts=[SPARE],
        base_port=free_range(4, *HOSTS, SPARE),
        limits={"max_wait_seconds": 8.0, "request_timeout": 3.0},
    )
    with c.running():
        yield c


class Writer:
    """Gradients pushed through n1 the whole time; counts statuses."""

    def __init__(self, c: Cluster) -> None:
        self.statuses: dict[int, int] = {}
        self._stop = threading.Event()
        assert c.put("n1", "hot", np.zeros(64, np.float32), {"X-Optimizer": '{"type": "sgd", "lr": 0.1}'}).is_success
        self._thread = threading.Thread(target=self._run, args=(c,), daemon=True)
        self._thread.start()

    def _run(self, c: Cluster) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                try:
                    status = client.post(
                        f"{c.urls['n1']}/v1/tensors/hot/grad",
                        content=np.ones(64, np.float32).tobytes(),
                        headers={"Content-Type": "application/octet-stream"},
                    ).status_code
                except httpx.HTTPError:
                    status = 0
                self.statuses[status] = self.statuses.get(status, 0) + 1

    def stop(self) -> dict[int, int]:
        self._stop.set()
        self._thread.join(15)
        return self.statuses


def members(c: Cluster, via: str) -> list[list[str]]:
    return [sorted(s["replicas"]) for s in c.status(via)["shards"]]


def leaders(c: Cluster) -> dict[int, str]:
    return {s["shard"]: s["leader"] for s in c.status("n1")["shards"]}


def abandon_a_join(c: Cluster, dest: Path) -> None:
    """What a joiner does before it registers: a fresh snapshot of every shard from its leader."""
    client = DataPathClient(datapath_key(c.cfg.raft.password or ""), timeout=10)
    nodes = {n.id: n for n in c.cfg.nodes}
    for shard, leader in leaders(c).items():
        client.fetch_snapshot(nodes[leader].data, shard, dest / f"abandoned-{shard}.bin", timeout=20)


def join(c: Cluster, nid: str, seed: str) -> float:
    started = time.monotonic()
    c.start_joining(nid, seed=seed)
    c.wait_ready([nid], timeout=40)
    c.ids.append(nid)
    return time.monotonic() - started


def remove(c: Cluster, nid: str, via: str) -> None:
    r = c.http.delete(f"{c.urls[via]}/v1/cluster/members/{nid}", timeout=30)
    assert r.status_code == 200, r.text
    c.ids.remove(nid)
    wait_until(lambda: all(nid not in m for m in members(c, via)), 10, f"{nid} gone")
    c.kill(nid)
    shutil.rmtree(c.tmp / nid, ignore_errors=True)  # as an operator would before reusing the id


def test_joins_and_removals_back_to_back_under_load(cluster, tmp_path):
    c = cluster
    writer = Writer(c)
    abandon_a_join(c, tmp_path)
    wait_until(lambda: sum(writer.statuses.values()) >= 20, 10, "writes after the abandoned join")
    timings = {"join n4 after an abandoned join": join(c, "n4", seed="n2")}
    assert members(c, "n1") == [["n1", "n2", "n3", "n4"]] * 2
    remove(c, "n4", via="n1")
    timings["join n4 again at once"] = join(c, "n4", seed="n3")
    remove(c, "n3", via="n1")  # an original, possibly a leader
    statuses = writer.stop()
    assert members(c, "n4") == [["n1", "n2", "n4"]] * 2
    digests = {n: c.digest(n, "hot", consistency="linearizable")[0] for n in c.ids}
    assert len(set(digests.values())) == 1, digests
    print(f"joins (s from start to ready): {timings}; writes meanwhile {statuses}")
    assert statuses.get(200, 0) >= 50 and set(statuses) <= {200, 503}, statuses
