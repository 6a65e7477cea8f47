"""Replica CPU per committed 1 KB push, A/B between paramstore trees, interleaved.

    python -m bench.cpu_ab --tree A=/path/to/checkout --tree B=/other [--env B:PARAMSTORE_RAFT__FSYNC=false]
                           [--clients 64] [--seconds 4] [--rounds 3]

Each round starts a fresh 3-replica cluster of every tree in turn (A B, then
B A, ...: drift in the machine's load hits both alike), drives `--clients` closed-loop
1 KB gradient pushes, and reads utime + stime of the three replica processes
from /proc/<pid>/stat before and after the window. CPU-µs per committed write
(summed over replicas) is stable on a shared machine where ops/s is not, as
long as the writes are CPU-bound (it includes idle upkeep, which dominates
when something else, e.g. a slow fdatasync, holds throughput down).
Ports 21000-21999, away from `python -m bench`'s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

from . import systems
from .load import closed_loop


class Cluster(systems.Paramstore):
    HTTP, RAFT = 21000, 21100


def measure(tree: Path, env: dict[str, str], clients: int, seconds: float) -> dict[str, float]:
    old_root, old_path, old_env = systems.PS_ROOT, systems.PS_PATH, dict(os.environ)
    systems.PS_ROOT, systems.PS_PATH = tree, str(tree)
    os.environ.update(env)
    work = Path(tempfile.mkdtemp(prefix="paramstore-cpu-"))
    ps = Cluster(work)
    try:
        ps.start()
        job = ps.small_job()
        closed_loop(job, clients, 1.0)  # warm up: connections, caches, group commit in steady state
        pids = ps.pids()
        r = closed_loop(job, clients, seconds, probe=lambda: systems.cpu_seconds(pids))
        cpu = r["probed"]
        return {"ops_s": r["ops_s"], "cpu_us_per_write": cpu / max(1, r["ops"]) * 1e6, "errors": r["errors"]}
    finally:
        ps.stop()
        shutil.rmtree(work, ignore_errors=True)
        systems.PS_ROOT, systems.PS_PATH = old_root, old_path
        os.environ.clear()
        os.environ.update(old_env)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", action="append", required=True, help="LABEL=PATH")
    ap.add_argument("--env", action="append", default=[], help="LABEL:NAME=VALUE")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    trees, envs = trees_and_envs(a.tree, a.env)
    alternate(
        trees,
        a.rounds,
        lambda label: measure(Path(trees[label]), envs[label], a.clients, a.seconds),
        lambda r: f"{r['ops_s']:7.0f} ops/s  {r['cpu_us_per_write']:6.0f} CPU-us/write  errors {r['errors']}",
        [("cpu_us_per_write", "CPU-us/write", "{:.0f}"), ("ops_s", "ops/s", "{:.0f}")],
    )


def trees_and_envs(tree_args: list[str], env_args: list[str]) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """`LABEL=PATH` and `LABEL:NAME=VALUE` options: each tree's path and its replicas' environment."""
    trees = dict(t.split("=", 1) for t in tree_args)
    envs: dict[str, dict[str, str]] = {label: {} for label in trees}
    for e in env_args:
        label, _, kv = e.partition(":")
        k, _, v = kv.partition("=")
        envs[label][k] = v
    return trees, envs


def alternate(
    trees: dict[str, str],
    rounds: int,
    run: Callable[[str], dict[str, float]],
    show: Callable[[dict[str, float]], str],
    summary: list[tuple[str, str, str]],
) -> dict[str, list[dict[str, float]]]:
    """Run every tree once per round, the order reversed every other round
    (A B, B A, ...), print each result and the medians of the `summary`
    fields (key, label, format)."""
    results: dict[str, list[dict[str, float]]] = {label: [] for label in trees}
    for rnd in range(rounds):
        for label in list(trees) if rnd % 2 == 0 else list(reversed(trees)):
            r = run(label)
            results[label].append(r)
            print(f"round {rnd + 1} {label}: {show(r)}  load {os.getloadavg()[0]:.1f}", flush=True)
    for label, rs in results.items():
        parts = []
        for key, name, fmt in summary:
            vals = [r[key] for r in rs]
            med, lo, hi = (fmt.format(x) for x in (statistics.median(vals), min(vals), max(vals)))
            parts.append(f"{name} median {med} ({lo}-{hi})")
        print(f"{label}: " + ", ".join(parts))
    return results


if __name__ == "__main__":
    main()
