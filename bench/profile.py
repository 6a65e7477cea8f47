"""Profile paramstore replicas under a bench workload with py-spy.

    python -m bench.profile [--workload small|pull|push] [--mb 64] [--clients 64] [--seconds 8]

Starts a 3-replica cluster, drives 1 KB pushes with the bench load generator
(or one client pulling/pushing a large tensor), records the shard leader and
one follower with `py-spy record --format raw` (collapsed stacks, in
bench/results/profile-*.txt; by default only samples holding the GIL), then
prints the top frames. Needs py-spy (pip) and ptrace permission.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .load import closed_loop
from .systems import ROOT, Paramstore


def top(path: Path, n: int = 25) -> list[tuple[str, float]]:
    own = collections.Counter()
    incl = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        c = int(count)
        total += c
        frames = stack.split(";")
        own[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
    return [(f, 100 * c / total) for f, c in own.most_common(n)], [(f, 100 * c / total) for f, c in incl.most_common(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", choices=["small", "pull", "push"], default="small")
    ap.add_argument("--mb", type=int, default=64, help="tensor size for pull/push")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--no-gil", action="store_true", help="sample every active thread, not only the GIL holder")
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ps = Paramstore(Path(tempfile.mkdtemp(prefix="paramstore-prof-")))
    ps.start()
    try:
        result = {}
        if a.workload == "small":
            job = ps.small_job()
            shard = ps.put(ps.nodes[0], "small", np.ones(256, "float32"), {"type": "sgd", "lr": 0.001})["shard"]
            lead = ps.leader_of(shard)
            fol = next(n for n in ps.nodes if n != lead)
            t = threading.Thread(target=lambda: result.update(closed_loop(job, a.clients, a.seconds)))
        else:
            arr = np.random.default_rng(0).standard_normal(a.mb * (1 << 18)).astype(np.float32)
            shard = ps.put(ps.nodes[0], "big", arr, {"type": "sgd", "lr": 0.001})["shard"]
            lead = ps.leader_of(shard)
            fol = next(n for n in ps.nodes if n != lead)

            def loop():
                c = ps.conn(fol if a.workload == "pull" else lead)
                ps.get(ps.conn(fol), "big", min_version=1)
                end, n, t0 = time.monotonic() + a.seconds, 0, time.perf_counter()
                while time.monotonic() < end:
                    if a.workload == "pull":
                        ps.get(c, "big")
                    else:
                        ps.push(c, "big", arr)
                    n += 1
                dt = time.perf_counter() - t0
                result.update(ops_s=n / dt, p50_ms=dt / max(n, 1) * 1e3, mb_s=n * a.mb / dt)

            t = threading.Thread(target=loop)
        t.start()
        procs = []
        for role, node in (("leader", lead), ("follower", fol)):
            f = out / f"profile-{a.workload}-{role}.txt"
            procs.append(
                (
                    role,
                    f,
                    subprocess.Popen(
                        [
                            "py-spy",
                            "record",
                            "--pid",
                            str(ps.pid(node)),
                            "--duration",
                            str(int(a.seconds - 1)),
                            "--rate",
                            "200",
                            "--format",
                            "raw",
                            *([] if a.no_gil else ["--gil"]),
                            "--output",
                            str(f),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    ),
                )
            )
        for _, _, p in procs:
            p.wait()
        t.join()
        print(f"{a.workload}: {result}")
        for role, f, _ in procs:
            if not f.exists():
                print(f"{role}: py-spy produced nothing (ptrace not permitted?)")
                continue
            own, incl = top(f)
            print(f"\n== {role} ({f}): % of samples holding the GIL, self time")
            for fr, pct in own:
                print(f"{pct:5.1f}%  {fr[:150]}")
            print(f"-- {role}: inclusive")
            for fr, pct in incl:
                print(f"{pct:5.1f}%  {fr[:150]}")
    finally:
        ps.stop()


if __name__ == "__main__":
    main()
