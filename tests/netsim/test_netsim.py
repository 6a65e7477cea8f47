"""bench/netsim: hosts in network namespaces behind shaped links (needs root; skipped elsewhere)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from bench.netsim import Shape, SimNet, capabilities, leftovers, remove_stale, unavailable
from bench.netsim.cluster import SimCluster

WHY = unavailable()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"the network simulation cannot run here: {WHY}")


def _receive(port: int, listening: threading.Event) -> tuple[int, float]:
    """Bytes received on one connection and the seconds from the first to the last."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", port))
        s.listen(1)
        listening.set()
        conn, _ = s.accept()
        with conn:
            buf = bytearray(1 << 20)
            n, first = 0, None
            while k := conn.recv_into(buf):
                first = first or time.perf_counter()
                n += k
            return n, time.perf_counter() - (first or time.perf_counter())


def _send(addr: str, port: int, nbytes: int) -> None:
    chunk = bytes(1 << 20)
    with socket.create_connection((addr, port), timeout=10) as s:
        for _ in range(nbytes // len(chunk)):
            s.sendall(chunk)


@pytest.mark.parametrize("rate_mbit", [200, 1000])
def test_a_shaped_link_delivers_its_rate(rate_mbit: int) -> None:
    with SimNet(["a", "b"], Shape(rate_mbit=rate_mbit)) as net:
        assert "htb" in net.qdiscs("a")
        listening = threading.Event()
        got = net.submit("b", _receive, 5001, listening)
        assert listening.wait(5)
        nbytes = int(rate_mbit * 1e6 / 8 * 1.0)  # about a second of traffic
        net.call("a", _send, net.addr("b"), 5001, nbytes)
        n, seconds = got.result(timeout=30)
    assert n == nbytes // (1 << 20) * (1 << 20)
    measured = n * 8 / seconds / 1e6
    # TCP/IP headers take ~3% of the shaped rate; the rest is the shaper's accuracy.
    assert 0.8 * rate_mbit <= measured <= 1.2 * rate_mbit, f"{measured:.0f} Mbit/s through a {rate_mbit} Mbit/s link"


def test_nothing_is_left_behind_when_the_body_raises() -> None:
    with pytest.raises(RuntimeError, match="test body failed"), SimNet(["x", "y", "z"], Shape(rate_mbit=100)) as net:
        prefix = net.prefix
        assert len(leftovers(prefix)) == 4  # three hosts and the switch
        net.popen("x", ["sleep", "60"])
        raise RuntimeError("test body failed")
    assert leftovers(prefix) == []


def test_a_killed_run_is_cleaned_up_by_remove_stale() -> None:
    code = (
        "import sys, time; from bench.netsim import SimNet, Shape\n"
        "net = SimNet(['a'], Shape(rate_mbit=100)); print(net.prefix, flush=True); time.sleep(60)"
    )
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as p:
        try:
            prefix = p.stdout.readline().strip() if p.stdout else ""
            assert prefix.startswith("psim-") and leftovers(prefix)
        finally:
            p.kill()
    assert leftovers(prefix)  # SIGKILL: no finalizer ran
    removed = remove_stale()
    assert prefix + "sw" in removed
    assert leftovers(prefix) == []


def test_delay_without_netem_is_refused_or_applied() -> None:
    if capabilities()["netem"]:
        with SimNet(["a"], Shape(rate_mbit=100, delay_ms=1.0)) as net:
            assert "netem" in net.qdiscs("a") and "delay 1ms" in net.qdiscs("a")
    else:
        with pytest.raises(Exception, match="sch_netem"):
            SimNet(["a"], Shape(rate_mbit=100, delay_ms=1.0))
        with SimNet(["a"], Shape(rate_mbit=100, delay_ms=1.0, required=False)) as net:
            assert net.applied.delay_ms == 0.0 and "netem" not in net.qdiscs("a")


@pytest.mark.cluster
def test_a_cluster_across_namespaces_serves_a_write(tmp_path) -> None:
    with SimNet(["r1", "r2", "r3", "w1"], Shape(rate_mbit=1000)) as net:
        c = SimCluster(net, ["r1", "r2", "r3"], tmp_path, shards=2)
        c.start()
        c.wait_ready("w1")
        value = np.arange(300_000, dtype=np.float32)  # 1.2 MB: sideloaded over the data path

        def write_then_read(client) -> tuple[int, dict]:
            client.create("sim.w", value, optimizer={"type": "sgd", "lr": 1.0})
            version = client.push_grad("sim.w", np.ones_like(value))
            return version, client.cluster()

        version, cluster = c.with_client("w1", write_then_read)
        assert version == 2
        assert {n["http"].split(":")[0] for n in cluster["nodes"]} == {"10.77.0.1", "10.77.0.2", "10.77.0.3"}

        def read(url: str) -> httpx.Response:
            auth = {"Authorization": f"Bearer {c.token}"}
            return httpx.get(url + "/v1/tensors/sim.w", params={"min_version": 2, "timeout": 10}, headers=auth)

        for h, url in c.urls.items():  # every replica applied it
            r = net.call("w1", read, url)
            assert r.status_code == 200, (h, r.status_code, r.text)
            np.testing.assert_array_equal(np.frombuffer(r.content, np.float32), value - 1)
        # r1 listens on its own address only: HTTP, Raft for shards 0 and 1, the data path.
        listening = {line.split()[3] for line in net.run("r1", "ss", "-ltnH").splitlines()}
        assert listening == {f"10.77.0.1:{port}" for port in (8700, 9700, 9701, 9702)}
