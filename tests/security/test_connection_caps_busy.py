"""A connection past the per-peer or the total cap when every open connection
has a request in flight (api/connection_caps.py): nothing can be evicted, so
the newcomer's request gets the JSON 503 with Retry-After and the connection
is closed after the answer; probes are still answered; the busy requests are
not disturbed."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

from tests.cluster.harness import Cluster
from tests.waiting import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]

POLL_SECONDS = 4
# 64: the least total cap the server keeps (api/server.py), whatever is configured
LIMITS = {"first_byte_timeout": 10.0, "max_connections": 64, "max_connections_per_peer": 32, "max_active_requests": 128}


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory):
    c = Cluster(tmp_path_factory.mktemp("caps"), replicas=1, shards=1, limits=LIMITS)
    with c.running():
        yield c


def _request(addr: tuple[str, int], src: str, path: str) -> tuple[bytes, dict[str, str], bytes, bool]:
    """One GET from `src`: status line, headers, body, and (for a 503) whether
    the server closed the connection after it."""
    with socket.create_connection(addr, timeout=10, source_address=(src, 0)) as s:
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
            assert chunk, "closed mid-body"
            body += chunk
        closed = False
        if lines[0].startswith(b"HTTP/1.1 503"):
            s.settimeout(5)
            closed = s.recv(1) == b""
    return lines[0], headers, body, closed


def _assert_busy_503(answer: tuple[bytes, dict[str, str], bytes, bool]) -> None:
    status, headers, body, closed = answer
    assert status.startswith(b"HTTP/1.1 503"), (status, body)
    assert headers["content-type"] == "application/json" and headers["retry-after"] == "1", headers
    doc = json.loads(body)
    assert doc["error"] == "unavailable" and "connection slot" in doc["detail"], doc
    assert closed  # a connection past the cap does not stay


def test_past_a_cap_with_every_connection_busy_the_answer_is_the_json_503(replica: Cluster) -> None:
    node = replica.cfg.nodes[0]
    addr = (node.http.host, node.http.port)
    assert replica.put("n1", "polled", np.ones(2, np.float32)).status_code in (200, 201)
    poll = f"GET /v1/tensors/polled?wait_version_gt=1000&timeout={POLL_SECONDS} HTTP/1.1\r\nHost: t\r\n\r\n"
    polls = []
    try:
        # 32 from one address (its cap), 32 from another: 64 connections (the total cap), all busy
        for src in ("127.0.0.7",) * 32 + ("127.0.0.9",) * 32:
            s = socket.create_connection(addr, timeout=POLL_SECONDS + 10, source_address=(src, 0))
            s.sendall(poll.encode())
            polls.append(s)
        # A newcomer past a cap closes an idle connection if there is one (a poll
        # not yet in flight, the harness's kept-alive ones) and is served: retry
        # until none is left. Polls closed that way fail the check at the end.
        for src, path in (("127.0.0.7", "/v1/tensors"), ("127.0.0.10", "/v1/tensors/polled")):
            # from the polls' address: past the per-peer cap; from another: past the total cap only
            def busy(src: str = src, path: str = path) -> bool:
                return _request(addr, src, path)[0].startswith(b"HTTP/1.1 503")

            wait_until(busy, 10, f"503 for {src}")
            _assert_busy_503(_request(addr, src, path))
        for probe in ("/readyz", "/healthz"):
            status, _, body, _ = _request(addr, "127.0.0.10", probe)
            assert status.startswith(b"HTTP/1.1 200"), (probe, status, body)
        for s in polls:  # none was closed to make room: each gets its own answer
            answer = s.recv(4096)
            assert answer.startswith(b"HTTP/1.1 "), answer
            assert not answer.startswith(b"HTTP/1.1 503"), answer
    finally:
        for s in polls:
            s.close()
    status, _, body, _ = _request(addr, "127.0.0.7", "/v1/tensors")  # the slots are free again
    assert status.startswith(b"HTTP/1.1 200"), (status, body)
