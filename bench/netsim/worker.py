"""One data-parallel worker of the simulated job, run on its own host
(`ip netns exec`): each step pushes a synthetic gradient for every tensor,
then pulls every tensor, each to and from the replica chosen for its shard
(its "entry", spread over the nodes), one thread per entry so that every link
is busy at once (as paramstore plan models a step).

    python -m bench.netsim.worker SPEC.json RESULT.json

SPEC: {"token", "urls", "steps", "start_at" (time.time() to begin),
"tensors": [{"name", "numel", "url"}], optional "push": push_grad's
compression keywords ({"wire_dtype", "compress"}), "pull_wire_dtype"}.
RESULT: per step, push and pull seconds.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from paramstore import Client


def main(spec_path: str, result_path: str) -> None:
    spec: dict[str, Any] = json.loads(Path(spec_path).read_text())
    by_url: dict[str, list[dict[str, Any]]] = {}
    for t in spec["tensors"]:
        by_url.setdefault(t["url"], []).append(t)
    rng = np.random.default_rng(int(spec.get("seed", 0)))
    grads = {t["name"]: rng.standard_normal(t["numel"], dtype=np.float32) * 1e-3 for t in spec["tensors"]}
    # A client per entry replica, that replica first (the others only for failover).
    clients = {
        url: Client([url, *(u for u in spec["urls"] if u != url)], token=spec["token"], timeout=300, deadline=600)
        for url in by_url
    }

    push_kw: dict[str, str] = spec.get("push") or {}
    pull_wire_dtype: str | None = spec.get("pull_wire_dtype")

    def push(url: str) -> None:
        for t in by_url[url]:
            clients[url].push_grad(t["name"], grads[t["name"]], **push_kw)

    def pull(url: str) -> None:
        for t in by_url[url]:
            clients[url].pull(t["name"], wire_dtype=pull_wire_dtype)

    steps = []
    with ThreadPoolExecutor(len(by_url)) as pool:
        time.sleep(max(0.0, spec["start_at"] - time.time()))  # all workers begin together
        for _ in range(spec["steps"]):
            t0 = time.perf_counter()
            list(pool.map(push, by_url))
            t1 = time.perf_counter()
            list(pool.map(pull, by_url))
            t2 = time.perf_counter()
            steps.append({"push": t1 - t0, "pull": t2 - t1, "step": t2 - t0})
    for c in clients.values():
        c.close()
    Path(result_path).write_text(json.dumps({"steps": steps}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
