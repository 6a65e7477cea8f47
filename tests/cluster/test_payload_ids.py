"""Payload ids across an upgrade (store/content_id.py): a cluster that named
its payloads by SHA-256, as earlier versions do (here `limits.payload_ids =
"sha256"`), restarts on its data dirs naming new payloads by BLAKE3; every
replica replays a log and a payload store holding both forms and ends with
identical bytes."""

from pathlib import Path

import numpy as np
import pytest

from tests.cluster.harness import Cluster, wait_version_everywhere

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]


def payload_files(c: Cluster, nid: str) -> set[str]:
    return {p.name for p in Path(c.tmp / nid).rglob("payloads/*") if p.is_file()}


def test_sha256_payloads_of_an_earlier_version_replay_beside_new_b3_ones(make_cluster):
    c = make_cluster(shards=1, env={"PARAMSTORE_LIMITS__PAYLOAD_IDS": "sha256"})
    n = 1 << 20  # 4 MB of float32: sideloaded and streamed to the peers
    rng = np.random.default_rng(7)
    value, g1, g2 = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    r = c.put("n1", "w", value, headers={"X-Optimizer": '{"type":"sgd","lr":0.5}'})
    assert r.status_code == 201, r.text
    assert c.grad("n2", "w", g1).status_code == 200
    wait_version_everywhere(c, "w", 2)
    old = {nid: payload_files(c, nid) for nid in c.ids}
    for nid, names in old.items():
        assert names and all(len(p) == 64 and not p.startswith("b3-") for p in names), (nid, names)

    c.env = {}  # the upgrade: the default, BLAKE3 ids, from here on
    for nid in list(c.ids):
        c.kill(nid)
    c.start()
    c.wait_ready()  # each replica replays its journal, whose payloads are SHA-256 files
    r = c.grad("n3", "w", g2)
    assert r.status_code == 200, r.text
    wait_version_everywhere(c, "w", 3)
    for nid in c.ids:
        new = payload_files(c, nid) - old[nid]
        assert new and all(p.startswith("b3-") for p in new), (nid, new)
    c.kill("n2")  # a replay of both forms, the last one logged as b3
    c.restart("n2")
    wait_version_everywhere(c, "w", 3)

    expected = value - np.float32(0.5) * g1 - np.float32(0.5) * g2
    digests = set()
    for nid in c.ids:
        got, version = c.get(nid, "w")
        assert version == 3 and np.array_equal(got, expected), nid
        digests.add(c.digest(nid, "w")[0])
    assert len(digests) == 1
