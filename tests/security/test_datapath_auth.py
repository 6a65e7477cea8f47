"""Data-path authentication (store/peer_auth.py) against a real server on
loopback: what a real client sent, captured and replayed, is refused; so are
stale, unsigned and wrongly signed headers; refusals are logged once per peer."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time

import pytest

from store.config import Address
from store.datapath import DataPathClient, DataPathServer
from store.payloads import PayloadStore
from store.peer_auth import PeerAuth
from tests.ports import free_range

SECRET = b"auth-secret"


@pytest.fixture
def server(tmp_path):
    port = free_range(1)
    store = PayloadStore(tmp_path / "p")
    srv = DataPathServer(Address("127.0.0.1", port), {0: store}, SECRET, max_size=1 << 20)
    srv.start()
    yield Address("127.0.0.1", port), store
    srv.close()


def capture_put_stream(data: bytes) -> bytes:
    """Everything a real client sends for one `put_stream` of `data`, as an eavesdropper saw it."""
    listener = socket.create_server(("127.0.0.1", 0))
    got = bytearray()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while got.count(b"\n") < 2:  # header line, raw bytes, trailer line
                chunk = conn.recv(1 << 16)
                if not chunk:
                    return
                got.extend(chunk)
            conn.sendall(b'{"ok": true}\n')

    t = threading.Thread(target=serve)
    t.start()
    client = DataPathClient(SECRET, timeout=5)
    client.replicate([Address("127.0.0.1", listener.getsockname()[1])], 0, _pid(data), data, need=1, timeout=5)
    t.join(5)
    listener.close()
    return bytes(got)


def _pid(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def send(addr: Address, raw: bytes) -> dict:
    with socket.create_connection((addr.host, addr.port), timeout=5) as s:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused before the body
            s.sendall(raw)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = s.recv(4096)
            assert chunk, f"closed without an answer after {answer!r}"
            answer += chunk
    reply = json.loads(answer)
    assert isinstance(reply, dict)
    return reply


def test_a_captured_put_stream_replayed_is_refused(server):
    addr, store = server
    data = b"a payload an eavesdropper captured" * 100
    captured = capture_put_stream(data)
    assert send(addr, captured) == {"ok": True}  # delivered once: the capture is a real, valid request
    assert bytes(store.get(_pid(data))) == data
    reply = send(addr, captured)
    assert reply["ok"] is False and "replayed" in reply["error"], reply


def test_a_captured_header_on_another_body_is_refused(server):
    """The trailer's MAC is bound to its header's nonce: a valid trailer spliced after a fresh header fails."""
    addr, store = server
    data = b"x" * 1000
    captured = capture_put_stream(data)
    _, rest = captured.split(b"\n", 1)
    trailer = rest[len(data) :]
    fresh = PeerAuth(SECRET).header("put_stream", 0, "", len(data))
    reply = send(addr, json.dumps(fresh).encode() + b"\n" + data + trailer)
    assert reply["ok"] is False and "authentication failed" in reply["error"], reply
    assert store.get(_pid(data)) is None


def header(**change: object) -> bytes:
    msg = PeerAuth(SECRET).header("get", 0, "0" * 64, 0)
    msg.update(change)
    return json.dumps(msg).encode() + b"\n"


def stale_header() -> bytes:
    auth = PeerAuth(SECRET)
    real_time = time.time
    try:
        time.time = lambda: real_time() - 2 * auth.window  # type: ignore[assignment]
        msg = auth.header("get", 0, "0" * 64, 0)
    finally:
        time.time = real_time  # type: ignore[assignment]
    return json.dumps(msg).encode() + b"\n"


@pytest.mark.parametrize(
    "raw, why",
    [
        (lambda: header(mac=""), "authentication failed"),
        (lambda: header(mac=None, ts=None, nonce=None), "no timestamp or nonce"),
        (lambda: b'{"op": "get", "shard": 0, "id": "x", "size": 0, "mac": ""}\n', "no timestamp or nonce"),
        (lambda: json.dumps(PeerAuth(b"wrong").header("get", 0, "x", 0)).encode() + b"\n", "authentication failed"),
        (lambda: header(id="1" * 64), "authentication failed"),  # a field changed after signing
        (stale_header, "off this replica's clock"),
    ],
    ids=["empty-mac", "unsigned", "old-format", "wrong-secret", "tampered", "stale"],
)
def test_unauthenticated_headers_are_refused(server, raw, why):
    addr, _ = server
    reply = send(addr, raw())
    assert reply["ok"] is False and why in reply["error"], reply


def test_a_get_is_served_once_per_header(server):
    addr, _ = server
    data = os.urandom(4096)
    DataPathClient(SECRET, timeout=5).replicate([addr], 0, _pid(data), data, need=1, timeout=5)
    line = json.dumps(PeerAuth(SECRET).header("get", 0, _pid(data), 0)).encode() + b"\n"
    with socket.create_connection((addr.host, addr.port), timeout=5) as s:
        s.sendall(line)
        first = s.recv(64)
    assert json.loads(first.split(b"\n")[0]) == {"ok": True, "size": len(data)}
    reply = send(addr, line)
    assert reply["ok"] is False and "replayed" in reply["error"], reply


def test_refusals_are_logged_once_per_peer_without_tracebacks(server, caplog):
    addr, _ = server
    with caplog.at_level(logging.WARNING, logger="store.datapath"):
        for _ in range(20):
            send(addr, header(mac="0" * 10_000))
    lines = [r for r in caplog.records if r.name == "store.datapath"]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].exc_info is None and len(lines[0].getMessage()) < 400
    assert "127.0.0.1" in lines[0].getMessage()
