"""Quick figures on a local 3-replica cluster: sync write latency, small-push
ops/s, and 1/16/64 MB PUT, push and GET throughput, with the count of leader
elections (term changes) seen while they ran.

    python bench/quick.py [--urls http://127.0.0.1:8700,...]

Without --urls it starts its own cluster (paramstore dev) in a temp dir.
Absolute figures on a shared 2-core machine are noisy; docs/benchmarks.md
(`make bench`, `python -m bench`) compares peers side by side.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def terms(client: httpx.Client, urls: list[str]) -> int:
    return sum(s["term"] for u in urls for s in client.get(u + "/v1/cluster").json()["shards"])


def raw(arr: np.ndarray) -> dict:
    return {
        "Content-Type": "application/octet-stream",
        "X-Dtype": str(arr.dtype),
        "X-Shape": ",".join(map(str, arr.shape)),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--urls")
    ap.add_argument("--small-ops", type=int, default=2000)
    args = ap.parse_args()
    proc = None
    if args.urls:
        urls = args.urls.split(",")
    else:
        tmp = tempfile.mkdtemp(prefix="psbench-")
        proc = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "dev", "--http-port", "11300", "--raft-port", "11400", "--data-dir", tmp],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for line in proc.stdout:
            if "ready. Try" in line:
                break
        urls = [f"http://127.0.0.1:{11300 + i}" for i in range(3)]
    try:
        run(urls, args.small_ops)
    finally:
        if proc:
            proc.terminate()
            proc.wait(30)
    return 0


def run(urls: list[str], small_ops: int) -> None:
    c = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=128))
    t0 = terms(c, urls)
    g = np.ones(256, np.float32)  # 1 KB
    c.put(
        urls[0] + "/v1/tensors/small",
        content=g.tobytes(),
        headers={**raw(g), "X-Optimizer": '{"type":"sgd","lr":0.001}'},
    )
    lat = []
    for i in range(200):
        s = time.perf_counter()
        r = c.post(urls[i % 3] + "/v1/tensors/small/grad", content=g.tobytes(), headers=raw(g))
        assert r.status_code == 200, r.text
        lat.append(time.perf_counter() - s)
    print(
        f"sync 1 KB push latency: p50 {statistics.median(lat) * 1e3:.1f} ms, "
        f"p99 {np.percentile(lat, 99) * 1e3:.1f} ms (any replica)"
    )
    for clients in (1, 16, 64):
        n = small_ops if clients > 1 else 300

        def push(i):
            r = c.post(urls[i % 3] + "/v1/tensors/small/grad", content=g.tobytes(), headers=raw(g))
            return r.status_code

        s = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            codes = list(pool.map(push, range(n)))
        dt = time.perf_counter() - s
        assert set(codes) == {200}, set(codes)
        print(f"1 KB pushes, {clients:2d} clients: {n / dt:7.0f} ops/s")
    for mb in (1, 16, 64):
        arr = np.random.default_rng(0).standard_normal(mb * (1 << 18)).astype(np.float32)
        name = f"big{mb}"
        s = time.perf_counter()
        r = c.put(
            urls[1] + f"/v1/tensors/{name}",
            content=arr.tobytes(),
            headers={**raw(arr), "X-Optimizer": '{"type":"sgd","lr":0.1}'},
        )
        put_dt = time.perf_counter() - s
        assert r.status_code in (200, 201), r.text
        s = time.perf_counter()
        r = c.post(urls[2] + f"/v1/tensors/{name}/grad", content=arr.tobytes(), headers=raw(arr))
        push_dt = time.perf_counter() - s
        assert r.status_code == 200, r.text
        c.get(urls[0] + f"/v1/tensors/{name}", params={"min_version": 2})
        s = time.perf_counter()
        reps = 5
        for _ in range(reps):
            r = c.get(urls[0] + f"/v1/tensors/{name}")
            assert len(r.content) == arr.nbytes
        get_dt = (time.perf_counter() - s) / reps
        print(
            f"{mb:2d} MB: PUT {mb / put_dt:6.0f} MB/s, push {mb / push_dt:6.0f} MB/s, "
            f"GET (follower) {mb / get_dt:6.0f} MB/s"
        )
    print(f"leader elections during the run: {terms(c, urls) - t0}")


if __name__ == "__main__":
    sys.exit(main())
