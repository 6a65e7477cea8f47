"""Every connection slot of a real replica held by an idle socket: the
refusal is like every other 503 (JSON error body, Retry-After), /readyz and
/healthz still answer, and the replica serves again once they go
(api/slow_clients.py)."""

from __future__ import annotations

import contextlib
import json
import socket

import numpy as np
import pytest

from tests.cluster.harness import Cluster
from tests.waiting import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]

SLOTS = 1024  # limit_concurrency in api/server.py


@pytest.fixture
def replica(tmp_path):
    c = Cluster(tmp_path, replicas=1, shards=1, limits={"header_timeout": 60.0})
    c.start()
    try:
        c.wait_ready()
        yield c
    finally:
        c.close()


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


def test_a_replica_without_a_free_slot_answers_503_with_the_json_body(replica):
    c = replica
    node = c.cfg.nodes[0]
    addr = (node.http.host, node.http.port)
    idle = []
    try:
        for _ in range(SLOTS):
            idle.append(socket.create_connection(addr, timeout=10))
        _, headers, body = wait_until(
            lambda: (r := _get(addr, "/v1/tensors"))[0].startswith(b"HTTP/1.1 503") and r, 20, "the slots to be spent"
        )
        assert headers["content-type"] == "application/json", headers
        assert headers["retry-after"] == "1"
        doc = json.loads(body)
        assert doc["error"] == "unavailable" and doc["detail"], doc
        # readiness does not depend on the slots: probes are still answered
        for probe in ("/readyz", "/healthz"):
            status, _, body = _get(addr, probe)
            assert status.startswith(b"HTTP/1.1 200"), (probe, status, body)
    finally:
        for s in idle:
            with contextlib.suppress(OSError):
                s.close()
    wait_until(lambda: _get(addr, "/readyz")[0].startswith(b"HTTP/1.1 200"), 20, "served again")
    assert c.put("n1", "after", np.ones(2, np.float32)).status_code == 201
