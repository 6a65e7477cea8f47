"""A replica's 307 to the replica that hosts a tensor's shard, against small real
HTTP servers on loopback: the bearer token follows to the client's own replicas
(httpx alone drops it on a cross-origin redirect) and to no other host."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from paramstore import AuthError, Client

TOKEN = "s3cret"


class Server:
    """`redirect_to` set: answers 307 to the same path there. Else: a float32
    tensor for the right bearer token, 401 without it."""

    def __init__(self, redirect_to: str | None = None) -> None:
        self.seen: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.seen.append((self.path, self.headers.get("Authorization")))
                if redirect_to:
                    self.answer(307, b"", {"Location": redirect_to + self.path})
                elif self.headers.get("Authorization") == f"Bearer {TOKEN}":
                    body = np.arange(3, dtype="<f4").tobytes()
                    headers = {"Content-Type": "application/octet-stream", "X-Dtype": "float32", "X-Shape": "3"}
                    self.answer(200, body, {**headers, "X-Version": "1"})
                else:
                    body = b'{"error": "unauthorized", "detail": "no token"}'
                    self.answer(401, body, {"Content-Type": "application/json"})

            def answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hosting() -> Iterator[tuple[Server, Server]]:
    """(a replica that redirects, the one that hosts the tensor)."""
    b = Server()
    a = Server(redirect_to=b.url)
    yield a, b
    a.close()
    b.close()


def test_the_token_follows_a_redirect_to_another_replica(hosting: tuple[Server, Server]) -> None:
    a, b = hosting
    with Client([a.url, b.url], token=TOKEN, deadline=5) as c:
        value, version = c.pull("w")
    assert value.tolist() == [0.0, 1.0, 2.0] and version == 1
    assert a.seen and b.seen[0] == (a.seen[0][0], f"Bearer {TOKEN}")


def test_the_token_does_not_follow_a_redirect_elsewhere(hosting: tuple[Server, Server]) -> None:
    a, b = hosting
    with Client([a.url], token=TOKEN, deadline=5) as c, pytest.raises(AuthError):
        c.pull("w")
    assert b.seen and all(auth is None for _, auth in b.seen)
