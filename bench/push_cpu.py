"""Replica CPU per committed large push, A/B between paramstore trees, interleaved.

    python -m bench.push_cpu --tree A=/work/main --tree B=. [--mb 64] [--pushes 8] [--rounds 2]
    python -m bench.push_cpu --tree sha=. --tree b3=. --env sha:PARAMSTORE_LIMITS__PAYLOAD_IDS=sha256

Each round starts a fresh 3-replica cluster of every tree in turn (A B, then
B A, ...), creates one `--mb` MB float32 tensor (sgd), sends `--pushes`
gradients of that size to its shard leader one after the other, and reads
utime + stime of the three replica processes from /proc before and after.
CPU-s per pushed GB (summed over replicas) is what a cheaper hash on the
data path changes; it holds on a shared machine where MB/s does not.
Ports 22000-22999, away from `python -m bench`'s and bench.cpu_ab's.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from . import systems
from .cpu_ab import alternate, trees_and_envs

MB = 1 << 20


PORTS = (22000, 22100)  # HTTP, Raft: apart from `make bench`'s clusters


def measure(tree: Path, env: dict[str, str], mb: int, pushes: int) -> dict[str, float]:
    old_root, old_path = systems.PS_ROOT, systems.PS_PATH
    systems.PS_ROOT, systems.PS_PATH = tree, str(tree)
    work = Path(tempfile.mkdtemp(prefix="paramstore-pushcpu-"))
    ps = systems.Paramstore(work, env=env, ports=PORTS)
    try:
        ps.start()
        arr = np.random.default_rng(0).standard_normal(mb * MB // 4).astype(np.float32)
        grad = (arr * 1e-3).astype(np.float32)
        shard = int(ps.put(ps.nodes[0], "w", arr, {"type": "sgd", "lr": 0.1}).get("shard", 0))
        lead = ps.leader_of(shard) or ps.nodes[0]
        conn = ps.conn(lead)
        st, body = ps.push(conn, "w", grad)  # warm up: connection, buffers
        if st != 200:
            raise RuntimeError(f"push: {st} {body!r}")
        pids = ps.pids()
        cpu0, t0 = systems.cpu_seconds(pids), time.perf_counter()
        for _ in range(pushes):
            st, body = ps.push(conn, "w", grad)
            if st != 200:
                raise RuntimeError(f"push: {st} {body!r}")
        wall, cpu = time.perf_counter() - t0, systems.cpu_seconds(pids) - cpu0
        conn.close()
        gb = pushes * mb / 1024
        return {"mb_s": pushes * mb / wall, "cpu_s_per_gb": cpu / gb, "cpu_s_per_push": cpu / pushes}
    finally:
        ps.stop()
        shutil.rmtree(work, ignore_errors=True)
        systems.PS_ROOT, systems.PS_PATH = old_root, old_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", required=True, help="LABEL=PATH")
    ap.add_argument("--env", action="append", default=[], help="LABEL:NAME=VALUE, for that tree's replicas")
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--pushes", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    trees, envs = trees_and_envs(a.tree, a.env)
    alternate(
        trees,
        a.rounds,
        lambda label: measure(Path(trees[label]).resolve(), envs[label], a.mb, a.pushes),
        lambda r: f"{r['mb_s']:6.0f} MB/s  {r['cpu_s_per_push']:.3f} CPU-s/push ({r['cpu_s_per_gb']:.2f} CPU-s/GB)",
        [("cpu_s_per_push", f"CPU-s per {a.mb} MB push", "{:.3f}"), ("mb_s", "MB/s", "{:.0f}")],
    )


if __name__ == "__main__":
    main()
