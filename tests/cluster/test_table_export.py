"""Delta export on 3 real replicas: `paramstore export --follow` long-polls a
follower while two clients push and rows are evicted; the base plus the delta
files rebuild the table byte for byte, as every replica holds it."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import load

from api.export_cli import Exporter
from paramstore import Client, ServingTable
from tests.cluster.harness import Cluster
from tests.waiting import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]
NAME = "serve_emb"
DIM = 8


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("export"))
    try:
        c.start()
        c.wait_ready()
        yield c
    finally:
        c.close()


def full_export(c: Cluster, nid: str) -> tuple[np.ndarray, np.ndarray, str]:
    r = c.http.get(c.urls[nid] + f"/v1/tables/{NAME}/delta", params={"since": "0"}, timeout=30)
    assert r.status_code == 200, r.text
    got = load(r.content)
    order = np.argsort(got["ids"])
    return got["ids"][order], got["rows"][order], r.headers["x-version"]


def test_base_plus_deltas_equal_the_table_under_concurrent_pushes_and_evictions(
    cluster: Cluster, tmp_path: Path
) -> None:
    c = cluster
    urls = [c.urls[n] for n in c.ids]
    with Client(urls, timeout=5.0, deadline=60.0) as ps:
        ps.create_table(
            NAME,
            dim=DIM,
            optimizer={"type": "sparse_adam", "lr": 0.01},
            initializer={"type": "uniform", "bound": 0.1, "seed": 3},
            eviction={"max_rows": 300, "ttl_versions": 30},
        )
    stop = threading.Event()
    pushed = [0]
    errors: list[BaseException] = []

    def pusher(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            with Client(urls, timeout=5.0, deadline=60.0) as ps:
                while not stop.is_set():
                    ids = (rng.zipf(1.3, 256) * 7 + seed).astype(np.int64)
                    ps.push_rows(NAME, ids, rng.normal(0, 1, (256, DIM)).astype(np.float32))
                    pushed[0] += 1
        except BaseException as e:  # reported below
            errors.append(e)

    follower = next(n for n in c.ids if n != c.leader_of(0))
    out = io.StringIO()
    http = httpx.Client(timeout=30.0)
    exporter = Exporter(http, c.urls[follower], NAME, tmp_path, {}, out)
    export_thread = threading.Thread(target=lambda: exporter.follow(wait=2.0, stop=stop.is_set))
    export_thread.start()
    wait_until(lambda: exporter.files >= 1, 30, "the base file")
    serving = ServingTable.load(tmp_path, refresh_every=0.1)  # reads while files keep coming
    threads = [threading.Thread(target=pusher, args=(s,)) for s in range(2)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: pushed[0] >= 60 and exporter.files >= 5, 90, "pushes and delta files")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        export_thread.join(60)
    assert not errors, errors
    assert not export_thread.is_alive()

    # the follower has applied every acknowledged push once a barrier passed there
    c.http.get(c.urls[follower] + f"/v1/tables/{NAME}", params={"consistency": "linearizable"}, timeout=30)
    ids, rows, cursor = full_export(c, follower)
    info = c.http.get(c.urls[follower] + f"/v1/tables/{NAME}").json()
    assert info["evicted"] > 0 and len(ids) == info["rows"]
    # what was pushed after the follower stopped: one more catch-up round
    exporter.follow(once=True)
    http.close()
    wait_until(lambda: serving.refresh() >= 0 and serving.cursor == cursor, 30, "the serving table caught up")
    serving.close()
    assert serving.ids().tobytes() == ids.tobytes()
    assert serving.lookup(ids).tobytes() == rows.tobytes()
    assert ServingTable.load(tmp_path).lookup(ids).tobytes() == rows.tobytes()  # a fresh reader too
    deltas = len(list(tmp_path.glob("*.done"))) - 1
    assert deltas >= 4, out.getvalue()

    # and every replica holds those same bytes
    for nid in c.ids:
        c.http.get(c.urls[nid] + f"/v1/tables/{NAME}", params={"consistency": "linearizable"}, timeout=30)
        other_ids, other_rows, other_cursor = full_export(c, nid)
        assert (other_ids.tobytes(), other_rows.tobytes(), other_cursor) == (ids.tobytes(), rows.tobytes(), cursor)
