"""Snapshots on disk: compaction, full-cluster crash, restart, nothing lost."""
import numpy as np
import pytest

from tests.waiting import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]


def test_kill_all_after_compaction_loses_no_acknowledged_write(make_cluster):
    # compact after 40 log entries (by count) and after 1 MB of payloads (by bytes)
    c = make_cluster(raft={"compaction_min_entries": 40, "compaction_min_bytes": 1 << 20})
    rng = np.random.default_rng(3)
    acked: dict[str, tuple[int, np.ndarray]] = {}
    for i in range(120):
        name = f"t{i % 12}"
        size = 70_000 if i % 3 == 0 else 16  # some sideloaded, some inline
        value = rng.standard_normal(size).astype(np.float32)
        if name in acked and acked[name][1].size != size:
            name = f"{name}_{size}"
        r = c.put(c.ids[i % 3], name, value)
        assert r.status_code in (200, 201), r.text
        acked[name] = (r.json()["version"], value)

    def compacted_everywhere():
        return all(all(s["snapshots"] >= 1 for s in c.status(n)["shards"]) for n in c.ids)
    wait_until(compacted_everywhere, 30, "a snapshot of every shard on every replica")
    for nid in list(c.ids):
        c.kill(nid)
    for nid in c.ids:
        c.start(nid)
    c.wait_ready(timeout=60)
    for name, (version, value) in acked.items():
        for nid in c.ids:
            got, v = c.get(nid, name, consistency="linearizable")
            assert v == version, (nid, name, v, version)
            assert np.array_equal(got, value), (nid, name)
