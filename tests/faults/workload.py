"""Concurrent clients doing linearizable reads and compare-and-set writes,
recording every operation for the checker."""

from __future__ import annotations

import random
import threading

import httpx
import numpy as np

from tests.faults import netns
from tests.faults.history import History
from tests.waiting import wait_until

RAW = {"Content-Type": "application/octet-stream", "X-Dtype": "int64", "X-Shape": "1"}


class Workload:
    def __init__(self, cluster, tensor: str = "reg", clients: int = 4) -> None:
        self.c = cluster
        self.faults = cluster.faults
        self.tensor = tensor
        self.history = History()
        self.stop = threading.Event()
        self.clients = clients
        self.futures = []

    def start(self) -> Workload:
        # the first write of a fresh cluster may outlast the short request timeout these clusters use
        # (its fdatasyncs go through a FUSE disk): retried with its request id, it applies once
        answers: list[httpx.Response] = []

        def created() -> bool:
            answers.append(self.c.put("n1", self.tensor, np.array([0], np.int64), {"X-Request-Id": "workload-start"}))
            return answers[-1].status_code != 503

        wait_until(created, 30, "the workload's first write")
        assert answers[-1].status_code == 201, answers[-1].text
        op = self.history.begin(-1, "write", self.tensor, value=0)
        History.end(op, "ok", version=1)
        self.futures = [self.faults.submit(self._loop, i) for i in range(self.clients)]
        self.c.loads.append(self)
        return self

    def finish(self) -> History:
        self.stop.set()
        for f in self.futures:
            f.result(timeout=60)
        return self.history

    def acked_writes_after(self, t: float) -> int:
        return sum(1 for o in self.history.ops if o.kind == "write" and o.status == "ok" and o.invoke > t)

    def recovery_seconds(self, fault_at: float) -> float | None:
        """From the fault to the first write acknowledged after it."""
        done = [o.complete for o in self.history.ops if o.kind == "write" and o.status == "ok" and o.invoke >= fault_at]
        return min(done) - fault_at if done else None

    def _loop(self, client: int) -> None:
        http = netns.client(timeout=3.0)
        rng = random.Random(client)
        known, seq = 1, 0
        url_of = self.c.urls
        while not self.stop.is_set():
            nid = rng.choice(self.c.ids)
            url = f"{url_of[nid]}/v1/tensors/{self.tensor}"
            if rng.random() < 0.5:
                op = self.history.begin(client, "read", self.tensor, replica=nid)
                try:
                    r = http.get(url, params={"consistency": "linearizable", "timeout": 2})
                except httpx.HTTPError:
                    History.end(op, "fail")
                    continue
                if r.status_code == 200:
                    version = int(r.headers["X-Version"])
                    History.end(op, "ok", version, int(np.frombuffer(r.content, np.int64)[0]))
                    known = max(known, version)
                else:
                    History.end(op, "fail")
            else:
                seq += 1
                value = (client + 1) * 1_000_000_000 + seq
                op = self.history.begin(client, "write", self.tensor, value=value, replica=nid)
                try:
                    r = http.put(
                        url, content=np.array([value], np.int64).tobytes(), headers={**RAW, "If-Match": f'"{known}"'}
                    )
                except httpx.HTTPError:
                    History.end(op, "unknown")
                    continue
                if r.status_code == 200:
                    known = int(r.json()["version"])
                    History.end(op, "ok", known)
                elif r.status_code == 412:
                    History.end(op, "fail")
                    current = r.json().get("current_version")
                    if isinstance(current, int):
                        known = current
                elif r.status_code == 503:
                    History.end(op, "unknown")
                else:
                    History.end(op, "fail")
        http.close()
