"""The client's direct part traffic against a small real HTTP server on
loopback whose answers each test chooses (no cluster): parts pulled in
order, a failed part named with the parts that applied, a wrong shape
refused before anything is sent."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from paramstore import Client, InvalidError

ROWS = [(0, 3), (3, 5)]  # a (5, 2) float32 tensor "t" in two parts


class PartServer:
    """Serves "t" as two parts; `refuse` holds part indices whose pushes get a 422."""

    def __init__(self) -> None:
        self.refuse: set[int] = set()
        self.pushed: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path.startswith("/v1/cluster"):
                    self._send(200, b'{"nodes": [], "shards": []}', {"Content-Type": "application/json"})
                    return
                part = int(self.path.split("%23p")[1].split("?")[0])
                a, b = ROWS[part]
                value = np.arange(a * 2, b * 2, dtype="<f4")
                headers = {"X-Dtype": "float32", "X-Shape": f"{b - a},2", "X-Version": str(4 + part)}
                self._send(200, value.tobytes(), {"Content-Type": "application/octet-stream", **headers})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                part = int(self.path.split("%23p")[1].split("/")[0])
                server.pushed.append(self.path)
                if part in server.refuse:
                    body = json.dumps({"error": "unprocessable", "detail": "test refusal"}).encode()
                    self._send(422, body, {"Content-Type": "application/json"})
                else:
                    self._send(200, b'{"version": 9}', {"Content-Type": "application/json", "X-Version": "9"})

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def served() -> Iterator[tuple[PartServer, Client]]:
    server = PartServer()
    client = Client(server.url, timeout=2, deadline=4)
    client._learn_parts("t", (5, 2), [{"rows": list(r), "shard": i} for i, r in enumerate(ROWS)])
    yield server, client
    client.close()
    server.server.shutdown()
    server.server.server_close()


def test_parts_are_pulled_in_parallel_and_assembled_in_order(served):
    _, client = served
    value, version = client.pull("t")
    assert value.tolist() == np.arange(10, dtype=np.float32).reshape(5, 2).tolist()
    assert version == 4  # the lowest part's


def test_a_failed_part_is_named_with_the_parts_that_applied(served):
    server, client = served
    server.refuse = {1}
    with pytest.raises(InvalidError) as err:
        client.push_grad("t", np.ones((5, 2), np.float32))
    assert "part 1" in str(err.value) and "1 of 2 applied" in str(err.value)
    assert err.value.body["applied"] == [{"part": 0, "version": 9}]
    assert [f["part"] for f in err.value.body["failed"]] == [1]
    server.refuse = set()
    assert client.push_grad("t", np.ones((5, 2), np.float32)) == 9


def test_a_gradient_of_the_wrong_shape_is_refused_before_anything_is_sent(served):
    server, client = served
    with pytest.raises(InvalidError):
        client.push_grad("t", np.ones((4, 2), np.float32))
    assert server.pushed == []
