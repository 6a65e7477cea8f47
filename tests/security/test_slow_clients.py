"""Slow-loris clients against a real replica: connections whose request head
(or body) trickles in are closed by the server in time, and everyone else is
served meanwhile (api/slow_clients.py)."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time

import numpy as np
import pytest

from tests.cluster.harness import Cluster
from tests.waiting import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(90)]

TIMEOUT = 2.0  # header_timeout and body_idle_timeout of the replica under test
MARGIN = 2.0  # 2 shared cores: the server may fire a little late, never early
SLOW = 300  # connections trickling header bytes
TRICKLE = 0.25  # seconds between two bytes of a slow client


class Trickler:
    """Raw sockets, one thread: every connection sends `prefix`, then one byte
    of `drip` every TRICKLE seconds (round and round if `repeat`); records when
    the server closed each one and what it answered."""

    def __init__(
        self, addr: tuple[str, int], count: int, prefix: bytes, drip: bytes = b"", repeat: bool = False
    ) -> None:
        self.sel = selectors.DefaultSelector()
        self.opened: dict[socket.socket, float] = {}
        self.closed: dict[socket.socket, float] = {}
        self.answers: dict[socket.socket, bytes] = {}
        self.drip = drip * 10_000 if repeat else drip
        self.stop = threading.Event()
        for _ in range(count):
            s = socket.create_connection(addr, timeout=5)
            s.sendall(prefix)
            s.setblocking(False)
            self.opened[s] = time.monotonic()
            self.answers[s] = b""
            self.sel.register(s, selectors.EVENT_READ)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def open_count(self) -> int:
        return len(self.opened) - len(self.closed)

    def _run(self) -> None:
        next_drip, i = time.monotonic(), 0
        while not self.stop.is_set() and self.open_count:
            for key, _ in self.sel.select(timeout=0.05):
                s = key.fileobj
                try:
                    data = s.recv(4096)
                except (ConnectionResetError, BlockingIOError):
                    data = b""
                if data:
                    self.answers[s] += data
                else:
                    self.closed[s] = time.monotonic()
                    self.sel.unregister(s)
            if time.monotonic() >= next_drip and i < len(self.drip):
                byte = self.drip[i : i + 1]
                for s in self.opened:
                    if s not in self.closed:
                        with contextlib.suppress(OSError):
                            s.send(byte)
                i += 1
                next_drip += TRICKLE

    def lifetimes(self) -> list[float]:
        return [self.closed[s] - self.opened[s] for s in self.closed]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for s in self.opened:
            s.close()


@pytest.fixture
def replica(tmp_path):
    c = Cluster(
        tmp_path,
        replicas=1,
        shards=1,
        limits={"header_timeout": TIMEOUT, "body_idle_timeout": TIMEOUT, "max_body_bytes": 1 << 20},
    )
    with c.running():
        yield c


def http_addr(c: Cluster) -> tuple[str, int]:
    node = c.cfg.nodes[0]
    return node.http.host, node.http.port


def request(path: str, body: bytes = b"", method: str = "PUT") -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/octet-stream\r\n"
        f"X-Dtype: float32\r\nX-Shape: {len(body) // 4}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def response(s: socket.socket) -> bytes:
    """One whole HTTP response (Content-Length framed) from a blocking socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    )
    while len(body) < length:
        body += s.recv(4096)
    return head


def test_slow_request_heads_are_closed_in_time_while_others_are_served(replica):
    c = replica
    addr = http_addr(c)
    # a kept-alive connection idle through the whole test: keep-alive (30 s)
    # governs it, not the head timeout
    idle = socket.create_connection(addr, timeout=5)
    idle.sendall(request("/v1/tensors/idle", np.ones(2, np.float32).tobytes()))
    assert response(idle).startswith(b"HTTP/1.1 201")

    started = time.monotonic()
    slow = Trickler(addr, SLOW, b"PUT /v1/tensors/slow HTTP/1.1\r\nHost: t\r\n", b"X-Slow: aaaaaaaa\r\n", repeat=True)
    try:
        served = 0
        while slow.open_count > SLOW // 2 and time.monotonic() - started < TIMEOUT:
            r = c.put("n1", f"ok{served}", np.full(4, served, np.float32))
            assert r.status_code == 201, r.text
            got, version = c.get("n1", f"ok{served}")
            assert version == 1 and got[0] == served
            served += 1
        assert served >= 3, f"only {served} normal requests while {slow.open_count} slow ones were open"
        wait_until(lambda: slow.open_count == 0, TIMEOUT + MARGIN + 5, "the server closed every slow client")
    finally:
        slow.close()
    lifetimes = slow.lifetimes()
    print(
        f"{SLOW} slow clients closed after {min(lifetimes):.2f}..{max(lifetimes):.2f}s "
        f"(header_timeout {TIMEOUT}s); {served} normal requests served meanwhile"
    )
    assert min(lifetimes) >= TIMEOUT - 0.05, "closed before the timeout"
    assert max(lifetimes) <= TIMEOUT + MARGIN, f"closed too late: {max(lifetimes):.2f}s"
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in slow.answers.values()), {a[:40] for a in slow.answers.values()}

    idle.sendall(request("/v1/tensors/idle", np.zeros(2, np.float32).tobytes()))
    assert response(idle).startswith(b"HTTP/1.1 200"), "a kept-alive idle connection was cut"
    idle.close()
    assert c.procs["n1"].poll() is None


def test_a_stalled_body_is_closed_but_a_slow_one_is_not(replica):
    c = replica
    addr = http_addr(c)
    body = np.arange(4, dtype=np.float32).tobytes()  # 16 bytes
    # stalls after 3 of 16 body bytes
    stalled = Trickler(addr, 5, request("/v1/tensors/stalled", body)[:-13])
    # sends one body byte every TRICKLE s: 4 s in all, twice the idle timeout
    head = request("/v1/tensors/steady", body)[: -len(body)]
    steady = Trickler(addr, 1, head, body)
    # answered 413 at once (Content-Length over max_body_bytes), keeps trickling the body
    big = request("/v1/tensors/big", bytes(2 << 20))[: -(2 << 20)]
    refused = Trickler(addr, 1, big, b"x", repeat=True)
    try:
        wait_until(lambda: stalled.open_count == 0, TIMEOUT + MARGIN + 5, "stalled bodies closed")
        wait_until(lambda: b"\r\n\r\n" in next(iter(steady.answers.values())), 20, "the slow body answered")
        wait_until(lambda: refused.open_count == 0, TIMEOUT + MARGIN + 5, "the refused body's connection closed")
    finally:
        stalled.close()
        steady.close()
        refused.close()
    assert next(iter(refused.answers.values())).startswith(b"HTTP/1.1 413 ")
    assert refused.lifetimes()[0] <= TIMEOUT + MARGIN, refused.lifetimes()
    print(f"a body still trickling after its 413 closed {refused.lifetimes()[0]:.2f}s after connecting")
    lifetimes = stalled.lifetimes()
    print(f"stalled bodies closed after {min(lifetimes):.2f}..{max(lifetimes):.2f}s (body_idle_timeout {TIMEOUT}s)")
    assert min(lifetimes) >= TIMEOUT - 0.05 and max(lifetimes) <= TIMEOUT + MARGIN
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in stalled.answers.values())
    assert next(iter(steady.answers.values())).startswith(b"HTTP/1.1 201"), steady.answers
    got, _ = c.get("n1", "steady")
    assert got.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert c.status("n1")["shards"][0]["leader"]  # replica healthy, and the stalled writes applied nothing
    assert c.http.get(c.urls["n1"] + "/v1/tensors/stalled").status_code == 404
    errors = [line for line in c.log_tail("n1", 200).splitlines() if '"level": "error"' in line]
    assert errors == [], errors[:2]  # a client cut off mid-body is no server error
