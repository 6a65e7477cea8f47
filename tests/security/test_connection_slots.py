"""Idle sockets against a real replica (api/connection_caps.py,
api/slow_clients.py): ~1,100 connections that never send a byte, reopened
as they close, from several addresses, do not keep real writes or /readyz
from being served; requests past the in-flight cap get the JSON 503 with
Retry-After while the probes are still answered; a silent socket is closed
after the first-byte timeout."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from tests.cluster.harness import Cluster
from tests.waiting import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

LIMITS = {
    "first_byte_timeout": 3.0,
    "max_connections": 500,
    "max_connections_per_peer": 300,
    "max_active_requests": 16,
}


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("slots"), replicas=1, shards=1, limits=LIMITS)
    with c.running():
        yield c


def _addr(c: Cluster) -> tuple[str, int]:
    node = c.cfg.nodes[0]
    return node.http.host, node.http.port


def _get(addr: tuple[str, int], path: str) -> tuple[bytes, dict[str, str], bytes]:
    with socket.create_connection(addr, timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, f"closed after {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = {k.strip().lower().decode(): v.strip().decode() for k, _, v in (x.partition(b":") for x in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    return lines[0], headers, body


class IdleSockets:
    """`per_source` silent connections from each source address, each reopened
    as soon as the server closes it, until stopped."""

    def __init__(self, addr: tuple[str, int], per_source: dict[str, int]) -> None:
        self.addr = addr
        self.socks: list[tuple[str, socket.socket]] = []
        self.closed_by_server = 0
        for src, n in per_source.items():
            for _ in range(n):
                self.socks.append((src, self._open(src)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._reopen, daemon=True)
        self._thread.start()

    def _open(self, src: str) -> socket.socket:
        s = socket.create_connection(self.addr, timeout=10, source_address=(src, 0))
        s.setblocking(False)
        return s

    def _reopen(self) -> None:
        while not self._stop.is_set():
            for i, (src, s) in enumerate(self.socks):
                try:
                    if s.recv(1) == b"":  # closed by the server: open another at once
                        s.close()
                        self.closed_by_server += 1
                        self.socks[i] = (src, self._open(src))
                except BlockingIOError:
                    pass
                except OSError:
                    s.close()
                    self.socks[i] = (src, self._open(src))
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for _, s in self.socks:
            with contextlib.suppress(OSError):
                s.close()


def _write_for(c: Cluster, seconds: float, statuses: dict[int, int]) -> None:
    """Writes, each on a fresh connection (each one must find room), and a probe after each."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        with httpx.Client(timeout=10) as client:
            r = client.put(
                f"{c.urls['n1']}/v1/tensors/w",
                content=np.ones(4, np.float32).tobytes(),
                headers={"Content-Type": "application/octet-stream", "X-Dtype": "float32", "X-Shape": "4"},
            )
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert client.get(f"{c.urls['n1']}/readyz").status_code == 200


def test_a_thousand_idle_sockets_do_not_starve_real_writes(replica):
    c = replica
    addr = _addr(c)
    baseline: dict[int, int] = {}
    _write_for(c, 1.5, baseline)
    # 1,100 (uvicorn alone refused almost everything past 1,024 idle sockets); one source past its cap
    sources = {"127.0.0.2": 400, "127.0.0.3": 234, "127.0.0.4": 233, "127.0.0.5": 233}
    idle = IdleSockets(addr, sources)
    statuses: dict[int, int] = {}
    try:
        _write_for(c, 3.0, statuses)
    finally:
        idle.close()
    print(
        f"writes+probes: {sum(baseline.values()) / 1.5:.1f}/s alone; {sum(statuses.values()) / 3:.1f}/s with "
        f"1,100 idle sockets reopened as they close ({statuses}; the replica closed {idle.closed_by_server})"
    )
    assert set(statuses) <= {200, 201}, statuses
    assert sum(statuses.values()) >= 2, statuses
    assert idle.closed_by_server > 0  # the caps and the first-byte timeout did close some


def test_past_the_in_flight_cap_the_answer_is_the_json_503_and_probes_still_answer(replica):
    c = replica
    addr = _addr(c)
    assert c.put("n1", "polled", np.ones(2, np.float32)).status_code in (200, 201)
    polls = []
    try:
        for _ in range(LIMITS["max_active_requests"]):  # long polls: requests in flight
            s = socket.create_connection(addr, timeout=10)
            s.sendall(b"GET /v1/tensors/polled?wait_version_gt=1000&timeout=8 HTTP/1.1\r\nHost: t\r\n\r\n")
            polls.append(s)
        status, headers, body = wait_until(
            lambda: (r := _get(addr, "/v1/tensors"))[0].startswith(b"HTTP/1.1 503") and r, 10, "the cap to be reached"
        )
        assert headers["content-type"] == "application/json", headers
        assert headers["retry-after"] == "1"
        doc = json.loads(body)
        assert doc["error"] == "unavailable" and doc["detail"], doc
        for probe in ("/readyz", "/healthz"):
            status, _, body = _get(addr, probe)
            assert status.startswith(b"HTTP/1.1 200"), (probe, status, body)
    finally:
        for s in polls:
            s.close()
    # the polls end by their own timeout (a waiting handler does not see its client leave)
    wait_until(lambda: _get(addr, "/v1/tensors")[0].startswith(b"HTTP/1.1 200"), 30, "served again")


def test_a_silent_socket_is_closed_after_the_first_byte_timeout(replica):
    with socket.create_connection(_addr(replica), timeout=15) as s:
        opened = time.monotonic()
        assert s.recv(1) == b""  # closed, no answer: it never asked anything
        took = time.monotonic() - opened
    assert LIMITS["first_byte_timeout"] - 0.1 <= took < LIMITS["first_byte_timeout"] + 3, took
