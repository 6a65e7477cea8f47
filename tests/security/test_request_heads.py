"""A request head that never ends, against a real replica: refused with 431
and the JSON error body once it passes 64 KiB, long before the header
timeout, and nothing is buffered past that (api/slow_clients.py)."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest

from api.slow_clients import MAX_HEAD_BYTES
from tests.cluster.harness import Cluster

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(90)]

HEADER_TIMEOUT = 30.0  # far longer than the test: the cap, not the timeout, must end it


@pytest.fixture
def replica(tmp_path):
    c = Cluster(tmp_path, replicas=1, shards=1, limits={"header_timeout": HEADER_TIMEOUT})
    with c.running():
        yield c


def _stream_header(addr: tuple[str, int], head: bytes) -> tuple[bytes, int, float]:
    """Send `head`, then one header value without end; return what the server
    answered, how many bytes it took before closing, and how long that took."""
    s = socket.create_connection(addr, timeout=10)
    started = time.monotonic()
    s.sendall(head)
    sent, piece = 0, b"a" * 4096
    try:
        while sent < 64 * MAX_HEAD_BYTES:
            s.sendall(piece)
            sent += len(piece)
    except OSError:  # reset or broken pipe: the server closed
        pass
    s.settimeout(10)
    answer = b""
    try:
        while chunk := s.recv(65536):
            answer += chunk
    except OSError:
        pass
    s.close()
    return answer, sent, time.monotonic() - started


@pytest.mark.parametrize(
    "head",
    [b"PUT /v1/tensors/h HTTP/1.1\r\nHost: t\r\nX-Endless: ", b"GET /v1/tensors/" + b"a" * 1000],
    ids=["header-value", "request-line"],
)
def test_a_request_head_without_end_is_431_with_the_json_body(replica, head):
    c = replica
    node = c.cfg.nodes[0]
    answer, sent, took = _stream_header((node.http.host, node.http.port), head)
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 431 Request Header Fields Too Large", answer[:200]
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert body["error"] == "request_header_fields_too_large" and body["detail"]
    print(f"431 after {sent} bytes sent, {took:.2f}s")
    assert took < HEADER_TIMEOUT / 3
    assert sent < 64 * MAX_HEAD_BYTES  # the server stopped reading long before the client stopped sending
    # the replica is fine and serves others; a large but bounded head is still served
    r = c.put("n1", "after", np.ones(2, np.float32), headers={"X-Pad": "b" * (MAX_HEAD_BYTES // 2)})
    assert r.status_code == 201, r.text
    assert c.procs["n1"].poll() is None
