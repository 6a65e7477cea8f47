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


def test_compaction_triggers_on_payload_bytes(make_cluster):
    c = make_cluster(raft={"compaction_min_entries": 1_000_000, "compaction_min_bytes": 2 << 20})
    shard = c.shard_of("bytes")
    for i in range(6):  # 6 x 1 MB pushes > 2 MB of payload bytes
        r = c.put(c.ids[i % 3], "bytes", np.full(1 << 18, i, np.float32))
        assert r.status_code in (200, 201), r.text
    wait_until(
        lambda: all(c.status(n)["shards"][shard]["snapshots"] >= 1 for n in c.ids),
        30,
        "a byte-triggered snapshot on every replica",
    )


def test_corrupt_snapshot_stops_the_replica_with_a_clear_message(make_cluster):
    c = make_cluster(raft={"compaction_min_entries": 10})
    for i in range(40):
        assert c.put("n1", f"c{i}", np.full(8, i, np.float32)).status_code == 201
    wait_until(lambda: c.status("n3")["shards"][0]["snapshots"] >= 1, 30, "a snapshot of shard 0 on n3")
    c.kill("n3")
    snap = c.tmp / "n3" / "shard-0" / "snapshot.bin"
    data = bytearray(snap.read_bytes())
    data[len(data) // 2] ^= 0xFF
    data = data[:-3]
    snap.write_bytes(bytes(data))
    c.start("n3")
    code = c.procs["n3"].wait(30)
    assert code == 3
    assert "cannot start" in c.log_tail("n3") and "snapshot" in c.log_tail("n3")
    # the other replicas keep serving
    c.procs.pop("n3")
    assert c.put("n1", "after", np.ones(2, np.float32)).status_code == 201
