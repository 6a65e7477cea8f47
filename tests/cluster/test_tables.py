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
