"""Every replica's data dir on a 64 MB tmpfs, then filled: writes answer 503
with reason disk_full on every replica, no replica dies, acknowledged writes
stay readable (linearizable reads too), and writes resume once space is
freed, without a restart (root only: mounts tmpfs)."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

from tests.cluster.harness import Cluster, wait_version_everywhere
from tests.waiting import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

RAW = {"Content-Type": "application/octet-stream", "X-Dtype": "float32", "X-Shape": "2048"}  # 8 KB: inline


@pytest.fixture
def small_disks(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounts = []
    for nid in ("n1", "n2", "n3"):
        d = tmp_path / "cluster" / nid
        d.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(d)], check=True)
        mounts.append(d)
    c = Cluster(tmp_path / "cluster", shards=1)
    try:
        c.start()
        c.wait_ready(timeout=60)
        yield c, mounts
    finally:
        c.close()
        for d in mounts:
            subprocess.run(["umount", "-l", str(d)], check=False)


def fill(disk, leave: int) -> None:
    st = os.statvfs(disk)
    with open(disk / "filler", "wb") as f:
        f.write(b"\1" * max(0, st.f_bavail * st.f_frsize - leave))


def test_full_disks_refuse_writes_keep_reads_and_recover(small_disks):
    c, disks = small_disks
    value = np.full(2048, 7.0, np.float32)
    assert c.put("n1", "w", value).status_code == 201
    wait_version_everywhere(c, "w", 1)
    for d in disks:
        fill(d, 256 << 10)
    refused = {}
    version = 1
    for nid in c.ids:
        for _ in range(1000):
            r = c.http.put(f"{c.urls[nid]}/v1/tensors/w", content=value.tobytes(), headers=RAW)
            if r.status_code == 200:
                version = max(version, r.json()["version"])
                continue
            assert r.status_code == 503, (nid, r.status_code, r.text)
            body = r.json()
            if body.get("reason") == "disk_full":
                assert "Retry-After" in r.headers and "disk is full" in body["detail"]
                refused[nid] = body["detail"]
                break
        else:
            pytest.fail(f"{nid} kept taking writes on a full disk")
    print(f"writes refused with disk_full on {sorted(refused)} after version {version}")
    for nid, p in c.procs.items():
        assert p.poll() is None, f"{nid} died on a full disk: {c.log_tail(nid)}"
    for nid in c.ids:  # reads go on, linearizable ones included
        got, v = c.get(nid, "w", consistency="linearizable")
        assert v >= version and got[0] == 7.0
    for d in disks:
        (d / "filler").unlink()

    def accepted() -> bool:
        return all(
            c.http.put(f"{c.urls[nid]}/v1/tensors/w", content=value.tobytes(), headers=RAW).status_code == 200
            for nid in c.ids
        )

    wait_until(accepted, 30, "writes accepted again on every replica without a restart")
    final = c.get("n1", "w", consistency="linearizable")[1]
    wait_version_everywhere(c, "w", final)
    assert len({c.digest(nid, "w") for nid in c.ids}) == 1
