"""Malformed requests to a real data-path server on loopback: each is
answered with a refusal (never a traceback in the server thread) after at
most the capped header line, and the server keeps serving."""

from __future__ import annotations

import hashlib
import json
import socket

import pytest

from store.config import Address
from store.datapath import MAX_HEADER, DataPathClient, DataPathServer
from store.payloads import PayloadStore
from tests.ports import free_range

SECRET = b"input-secret"


@pytest.fixture
def server(tmp_path):
    port = free_range(1)
    store = PayloadStore(tmp_path / "p")
    srv = DataPathServer(Address("127.0.0.1", port), {0: store}, SECRET, max_size=1 << 20)
    srv.start()
    yield Address("127.0.0.1", port), store
    srv.close()


def _ask(addr: Address, data: bytes) -> dict:
    with socket.create_connection((addr.host, addr.port), timeout=5) as s:
        s.sendall(data)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = s.recv(4096)
            assert chunk, f"closed without an answer after {answer!r}"
            answer += chunk
    reply = json.loads(answer)
    assert isinstance(reply, dict)
    return reply


def _threads_raised(capsys) -> str:
    return capsys.readouterr().err  # socketserver prints a handler's uncaught exception there


@pytest.mark.parametrize(
    "line",
    [
        b"[" * (MAX_HEADER - 1) + b"\n",  # nesting deeper than the recursion limit
        b"\xff\xfe\n",
        b"[]\n",
        b'{"op": "get", "size": true, "shard": 0, "id": "x", "mac": ""}\n',
        b"a" * (4 * MAX_HEADER),  # no newline: refused once past the cap
    ],
    ids=["nested", "not-utf8", "not-an-object", "bool-size", "endless"],
)
def test_malformed_headers_are_refused_and_the_server_keeps_serving(server, capsys, line):
    addr, store = server
    reply = _ask(addr, line)
    assert reply["ok"] is False and reply["error"], reply
    assert "Traceback" not in _threads_raised(capsys)
    payload = b"still serving"
    pid = hashlib.sha256(payload).hexdigest()
    DataPathClient(SECRET, timeout=5).replicate([addr], 0, pid, payload, need=1, timeout=5)
    assert bytes(store.get(pid)) == payload
