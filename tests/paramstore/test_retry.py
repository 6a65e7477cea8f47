"""Which answers the client retries on another replica, against two small real
HTTP servers on loopback (no cluster: the answers are chosen per test)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from paramstore import Client, NotFoundError, UnavailableError


class Replica:
    """Answers every GET with a fixed status; 200 carries a float32 tensor at version 3."""

    def __init__(self, status: int, error: str = "") -> None:
        self.status, self.error, self.requests = status, error, 0
        replica = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                replica.requests += 1
                if replica.status == 200:
                    body = np.arange(3, dtype="<f4").tobytes()
                    headers = {
                        "Content-Type": "application/octet-stream",
                        "X-Dtype": "float32",
                        "X-Shape": "3",
                        "X-Version": "3",
                    }
                else:
                    body = json.dumps({"error": replica.error, "detail": "test answer"}).encode()
                    headers = {"Content-Type": "application/json"}
                self.send_response(replica.status)
                for k, v in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    made: list[Replica] = []
    yield made
    for r in made:
        r.close()


@pytest.mark.parametrize("status,error", [(503, "unavailable"), (503, "timeout"), (408, "timeout")])
def test_a_replica_that_cannot_answer_yet_is_retried_on_the_next(
    replicas: list[Replica], status: int, error: str
) -> None:
    behind, ok = Replica(status, error), Replica(200)
    replicas += [behind, ok]
    with Client([behind.url, ok.url], timeout=2.0, deadline=10.0) as c:
        value, version = c.pull("w")
        assert version == 3 and value.tolist() == [0.0, 1.0, 2.0]
        assert c._transport.preferred == 1  # the next call goes to the replica that answered
    assert behind.requests == 1 and ok.requests == 1


def test_retries_end_at_the_deadline_with_the_last_answer(replicas: list[Replica]) -> None:
    behind = Replica(408, "timeout")
    replicas.append(behind)
    with Client([behind.url], timeout=0.5, deadline=0.5) as c, pytest.raises(UnavailableError) as info:
        c.pull("w")
    assert info.value.status == 408 and info.value.code == "timeout"
    assert behind.requests >= 2


def test_a_definite_answer_is_not_retried(replicas: list[Replica]) -> None:
    missing, ok = Replica(404, "not_found"), Replica(200)
    replicas += [missing, ok]
    with Client([missing.url, ok.url], timeout=2.0, deadline=10.0) as c, pytest.raises(NotFoundError):
        c.pull("w")
    assert missing.requests == 1 and ok.requests == 0
