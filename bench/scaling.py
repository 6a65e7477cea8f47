"""How paramstore's cost grows with the work (issue 15 item 6): curves, not points.

    python -m bench.scaling            # default: <= 5 min on 2 cores (fewer points, smaller sizes)
    python -m bench.scaling --full     # every point of the issue (1-16 shards, 3/5 replicas,
                                       # 64 KB-1 GB, 100 K tensors, 1/2/4 GB held)
    python -m bench --only scaling     # the same, as a section of the harness

Every figure sits next to the servers' CPU per operation (utime + stime of all
replicas, /proc), which hardly moves with the load of a shared machine, unlike
ops/s and MB/s. Writes bench/results/scaling.json and docs/scaling.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from .join import JoiningParamstore
from .load import Job, closed_loop, http_request
from .systems import HOST, ROOT, Paramstore, cpu_seconds, raw_headers, rss_mb

KB, MB = 1 << 10, 1 << 20
T0 = time.monotonic()
DEFAULT = {
    "shards": [1, 4, 16],
    "replicas": [3, 5],
    "sizes_kb": [64, 256, 1024, 4096, 16384],
    "counts": [100, 1000, 10000],
    "held_mb": [128, 256, 512],
}
FULL = {
    "shards": [1, 2, 4, 8, 16],
    "replicas": [3, 5],
    "sizes_kb": [64 * 4**i for i in range(8)],  # 64 KB ... 1 GB
    "counts": [100, 10_000, 100_000],
    "held_mb": [1024, 2048, 4096],
}
IDLE_WINDOW = 2.0
PORT = int(os.environ.get("BENCH_SCALING_PORT", "21000"))
SNAPSHOT_LINE = re.compile(r"shard (\d+): snapshot at index \d+, (\d+) bytes in ([\d.]+)s")


def log(msg: str) -> None:
    print(f"[scaling {time.monotonic() - T0:5.0f}s] {msg}", flush=True)


class FullyReplicated(Paramstore):
    """Every replica hosts every shard (Raft groups of `replicas` members; the
    harness's default is replication 3, whatever the replica count)."""

    def __init__(self, workdir: Path, replicas: int, shards: int, name: str, port: int) -> None:
        self.HTTP, self.RAFT = port, port + 100
        super().__init__(workdir, replicas=replicas, shards=shards, name=name)
        from api.devcluster import dev_config
        from store.config import config_from_mapping, render_toml

        mapping = dev_config(replicas, self.HTTP, self.RAFT, shards, replicas, self.cfg.raft.password)
        self.cfg = config_from_mapping(mapping)
        self.config_path.write_text(render_toml(self.cfg))


def start(ps: Paramstore, log_level: str = "warning") -> None:
    for n in ps.nodes:
        ps.start_node(n, log_level=log_level)
    ps.wait_ready(ps.nodes)


def one_per_shard(ps: Paramstore, shards: int, nbytes: int = 1024) -> list[str]:
    """Names of small SGD tensors, one led by each shard (names hash to shards)."""
    g = np.ones(nbytes // 4, np.float32)
    by_shard: dict[int, str] = {}
    i = 0
    while len(by_shard) < shards:
        r = ps.put(ps.nodes[0], f"w{i}", g, {"type": "sgd", "lr": 0.001})
        by_shard.setdefault(r["shard"], f"w{i}")
        i += 1
    return [by_shard[s] for s in sorted(by_shard)]


def small_writes(work: Path, replicas: int, shards: int, clients: int, seconds: float, port: int) -> dict:
    """`clients` closed-loop clients pushing 1 KB gradients, client i to tensor
    i % shards through replica i % replicas: the load spreads over every shard."""
    ps = FullyReplicated(work, replicas, shards, f"small-{replicas}r{shards}s", port)
    start(ps)
    try:
        names = one_per_shard(ps, shards)
        g = np.ones(256, np.float32)
        targets, reqs = [], []
        for i in range(clients):
            host, hport = ps.urls[ps.nodes[i % replicas]]
            targets.append((host, hport))
            reqs.append(
                http_request(
                    "POST", f"/v1/tensors/{names[i % shards]}/grad", f"{host}:{hport}", raw_headers(g), g.tobytes()
                )
            )
        pids = ps.pids()
        c0 = cpu_seconds(pids)
        time.sleep(IDLE_WINDOW)  # a measurement window: what the idle shards cost (Raft ticks, heartbeats)
        idle = (cpu_seconds(pids) - c0) / IDLE_WINDOW
        terms = ps.terms()
        r = closed_loop(Job("http", targets, reqs), clients, seconds, probe=partial(cpu_seconds, ps.pids()))
        return {
            "ops_s": r["ops_s"],
            "cpu_us": r["probed"] / r["ops"] * 1e6 if r["ops"] else None,
            "idle_cpu_per_s": idle,  # CPU-s per s of all replicas with no requests
            "cpu_us_marginal": (r["probed"] - idle * seconds) / r["ops"] * 1e6 if r["ops"] else None,
            "p50_ms": r["p50_ms"],
            "p99_ms": r["p99_ms"],
            "errors": r["errors"],
            "elections": ps.terms() - terms,
        }
    finally:
        ps.stop()
        shutil.rmtree(ps.dir, ignore_errors=True)


def transfers(ps: Paramstore, sizes_kb: list[int], reps: int) -> dict:
    """Pull from a follower and push (SGD, acked by a majority) through the
    leader, per tensor size: MB/s and the servers' CPU-µs per MB."""
    out: dict[str, dict] = {}
    pids = ps.pids()
    for kb in sizes_kb:
        arr = np.random.default_rng(kb).standard_normal(kb * KB // 4).astype(np.float32) * 1e-3
        name = f"t{kb}"
        r = ps.put(ps.nodes[0], name, arr, {"type": "sgd", "lr": 0.01})
        lead = ps.leader_of(r["shard"])
        fol = next(n for n in ps.nodes if n != lead)
        pull_c, push_c = ps.conn(fol), ps.conn(lead)
        ps.get(pull_c, name, min_version=r["version"])
        # >= 16 MB per figure up to 1 MB tensors: /proc counts CPU in 10 ms ticks
        n = max(reps, min(256, (32 * MB) // (kb * KB)))
        row: dict[str, float] = {}
        for kind in ("pull", "push"):
            cpu0, t0 = cpu_seconds(pids), time.perf_counter()
            for _ in range(n):
                if kind == "pull":
                    ps.get(pull_c, name)
                else:
                    st, body = ps.push(push_c, name, arr)
                    if st != 200:
                        raise RuntimeError(f"push {name}: {st} {body!r}")
            dt, cpu = time.perf_counter() - t0, cpu_seconds(pids) - cpu0
            mb = n * kb / 1024
            row[f"{kind}_mb_s"] = mb / dt
            row[f"{kind}_cpu_ms_per_mb"] = cpu / mb * 1e3
        pull_c.close()
        push_c.close()
        out[str(kb)] = row
        log(
            f"  {kb:7d} KB x{n:3d}: pull {row['pull_mb_s']:6.0f} MB/s ({row['pull_cpu_ms_per_mb']:5.1f} CPU-ms/MB), "
            f"push {row['push_mb_s']:6.0f} MB/s ({row['push_cpu_ms_per_mb']:5.1f} CPU-ms/MB)"
        )
    return out


def many_tensors(ps: Paramstore, counts: list[int], reps: int) -> dict:
    """Create 1 KB tensors up to each count (16 writers); RSS delta per tensor on
    every replica and `GET /v1/tensors` latency on one."""
    out: dict[str, dict] = {}
    g = np.ones(256, np.float32)
    base = {n: rss_mb(ps.pid(n)) for n in ps.nodes}
    have = 0

    def create(lo: int, hi: int, k: int) -> None:
        node = ps.nodes[k % len(ps.nodes)]
        c = ps.conn(node)
        for i in range(lo + k, hi, 16):
            ps.put(node, f"m{i}", g, {"type": "sgd", "lr": 0.001}, conn=c)
        c.close()

    for count in counts:
        t = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(partial(create, have, count), range(16)))
        create_s = time.perf_counter() - t
        created, have = count - have, count
        c = ps.conn(ps.nodes[0])
        lat = []
        for _ in range(reps):
            t = time.perf_counter()
            st, body = c.request("GET", "/v1/tensors")
            lat.append(time.perf_counter() - t)
            if st != 200:
                raise RuntimeError(f"GET /v1/tensors: {st}")
        listed = len(json.loads(bytes(body)))
        c.close()
        per = [(rss_mb(ps.pid(n)) - base[n]) * MB / count for n in ps.nodes]
        out[str(count)] = {
            "rss_bytes_per_tensor": float(np.median(per)),
            "list_ms": float(np.median(lat)) * 1e3,
            "list_us_per_tensor": float(np.median(lat)) * 1e6 / max(1, listed),
            "listed": listed,
            "creates_s": created / create_s,
        }
        log(
            f"  {count:6d} tensors: RSS +{out[str(count)]['rss_bytes_per_tensor']:6.0f} B/tensor, "
            f"GET /v1/tensors {out[str(count)]['list_ms']:7.1f} ms ({listed} listed), "
            f"creating {out[str(count)]['creates_s']:.0f}/s"
        )
    return out


def held(work: Path, mb: int, port: int) -> dict:
    """3 replicas holding `mb` MB (64 MB tensors, assign): a 4th replica joins
    (its start-to-ready is the catch-up time; the join makes the leaders
    snapshot, whose durations come from their logs), then a replica restarts."""
    ps = JoiningParamstore(work / f"held{mb}", ports=port)
    start(ps, log_level="info")
    try:
        tensor = min(64, mb)
        rng = np.random.default_rng(0)
        arr = rng.standard_normal(tensor * MB // 4, dtype=np.float32)
        t = time.perf_counter()
        for i in range(mb // tensor):
            ps.put(ps.nodes[i % 3], f"h{i}", arr, {"type": "assign"})
        load_s = time.perf_counter() - t
        t0 = ps.start_joining("n4", seed="n2")
        catch_up = ps.wait_ready(["n4"], timeout=900) - t0
        snaps: dict[int, tuple[int, float]] = {}
        for n in ("n1", "n2", "n3"):
            for m in SNAPSHOT_LINE.finditer((ps.dir / f"{n}.log").read_text()):
                snaps[int(m[1])] = (int(m[2]), float(m[3]))  # the latest per shard
        # restart: SIGKILL the replica leading fewest shards, time start -> ready
        leads = [s.get("leader") for s in ps.status("n1")["shards"]]
        victim = min(("n1", "n2", "n3"), key=leads.count)
        ps.kill(victim)
        t0 = ps.start_node(victim, log_level="info")
        restart = ps.wait_ready([victim], timeout=900) - t0
        row = {
            "load_s": load_s,
            "catch_up_s": catch_up,
            "restart_s": restart,
            "snapshot_s_max": max((s for _, s in snaps.values()), default=None),
            "snapshot_s_sum": sum(s for _, s in snaps.values()) if snaps else None,
            "snapshot_mb": sum(b for b, _ in snaps.values()) / MB if snaps else None,
            "snapshots": len(snaps),
        }
        log(
            f"  {mb:5d} MB held: snapshot {row['snapshot_mb'] or 0:.0f} MB "
            f"in {row['snapshot_s_max'] or float('nan'):.2f}s "
            f"(slowest shard; {row['snapshots']} shards, sum {row['snapshot_s_sum'] or float('nan'):.2f}s), "
            f"restart-to-ready {restart:.2f}s, new replica ready {catch_up:.2f}s (loading took {load_s:.1f}s)"
        )
        return row
    except RuntimeError:
        for n in ps.procs:  # why a replica gave up: the end of its log
            tail = (ps.dir / f"{n}.log").read_text(errors="replace").splitlines()[-5:]
            log(f"  {n} log tail:\n    " + "\n    ".join(tail))
        raise
    finally:
        ps.stop()
        shutil.rmtree(ps.dir, ignore_errors=True)


def measure(
    work: Path, full: bool = False, seconds: float = 3.0, clients: int = 16, reps: int = 3, port: int = PORT
) -> dict:
    """`port`: the first HTTP port (Raft from +100); not the harness's 11000, so
    that a `python -m bench` running meanwhile is not measured instead."""
    with socket.socket() as probe:
        if probe.connect_ex((HOST, port)) == 0:
            raise RuntimeError(f"something already listens on {HOST}:{port}: pick another --port")
    p = FULL if full else DEFAULT
    res: dict = {"config": {**p, "seconds": seconds, "clients": clients, "full": full}, "small": {}}
    free_gb = shutil.disk_usage(work).free / 2**30
    res["held_mb_skipped"] = [mb for mb in p["held_mb"] if mb * 5 / 1024 > free_gb - 10]  # 4 copies + snapshots
    for r in p["replicas"]:
        for s in p["shards"]:
            row = small_writes(work, r, s, clients, seconds, port)
            res["small"].setdefault(str(r), {})[str(s)] = row
            log(
                f"  small writes {r} replicas {s:2d} shards: {row['ops_s']:6.0f} ops/s, "
                f"{row['cpu_us'] or float('nan'):5.0f} CPU-us/write "
                f"({row['cpu_us_marginal'] or float('nan'):5.0f} above idle {row['idle_cpu_per_s']:.2f} CPU-s/s), "
                f"p50 {row['p50_ms']:.1f} ms, "
                f"{row['errors']} errors, {row['elections']} elections"
            )
    ps = FullyReplicated(work, 3, 4, "scaling", port)
    start(ps)
    try:
        res["transfer"] = transfers(ps, p["sizes_kb"], reps)
        res["tensors"] = many_tensors(ps, p["counts"], reps)
    finally:
        ps.stop()
        shutil.rmtree(ps.dir, ignore_errors=True)
    res["held"] = {}
    for mb in p["held_mb"]:
        if mb not in res["held_mb_skipped"]:
            try:
                res["held"][str(mb)] = held(work, mb, port)
            except RuntimeError as e:  # one size failing must not lose the other figures
                res.setdefault("failures", []).append(f"held {mb} MB: {e}")
                log(f"  {mb} MB held FAILED: {e}")
    return res


def markdown(res: dict) -> str:
    """The tables of docs/benchmarks.md's scaling section (verdicts are written by hand)."""

    def f(v: float | None, fmt: str = "{:.0f}") -> str:
        return "-" if v is None else fmt.format(v)

    out = ["| replicas | shards | ops/s | CPU-µs/write | above idle | idle CPU-s/s | p50 ms | elections |"]
    out.append("|---|---|---|---|---|---|---|---|")
    for r, rows in res["small"].items():
        for s, v in rows.items():
            out.append(
                f"| {r} | {s} | {f(v['ops_s'])} | {f(v['cpu_us'])} | {f(v['cpu_us_marginal'])} | "
                f"{f(v['idle_cpu_per_s'], '{:.2f}')} | {f(v['p50_ms'], '{:.1f}')} | {v['elections']} |"
            )
    out += ["", "| tensor | pull MB/s | pull CPU-ms/MB | push MB/s | push CPU-ms/MB |", "|---|---|---|---|---|"]
    for kb, v in res.get("transfer", {}).items():
        size = f"{int(kb) // 1024} MB" if int(kb) >= 1024 else f"{kb} KB"
        out.append(
            f"| {size} | {f(v['pull_mb_s'])} | {f(v['pull_cpu_ms_per_mb'], '{:.1f}')} | "
            f"{f(v['push_mb_s'])} | {f(v['push_cpu_ms_per_mb'], '{:.1f}')} |"
        )
    out += ["", "| tensors (1 KB) | RSS per tensor | GET /v1/tensors | per listed tensor |", "|---|---|---|---|"]
    for n, v in res.get("tensors", {}).items():
        out.append(
            f"| {int(n):,} | {f(v['rss_bytes_per_tensor'] / 1024, '{:.1f}')} KB | {f(v['list_ms'], '{:.1f}')} ms | "
            f"{f(v['list_us_per_tensor'], '{:.1f}')} µs |"
        )
    out += ["", "| held | snapshot (slowest shard) | snapshots, all shards | restart to ready | new replica ready |"]
    out.append("|---|---|---|---|---|")
    for mb, v in res.get("held", {}).items():
        out.append(
            f"| {mb} MB | {f(v['snapshot_s_max'], '{:.2f}')} s | {f(v['snapshot_mb'])} MB in "
            f"{f(v['snapshot_s_sum'], '{:.2f}')} s | {f(v['restart_s'], '{:.2f}')} s | "
            f"{f(v['catch_up_s'], '{:.2f}')} s |"
        )
    return "\n".join(out)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(16, 9))
    for r, rows in res["small"].items():
        xs = [int(s) for s in rows]
        ax[0, 0].plot(xs, [v["ops_s"] for v in rows.values()], "o-", label=f"{r} replicas")
        ax[1, 0].plot(xs, [v["cpu_us"] for v in rows.values()], "o-", label=f"{r} replicas, all")
        ax[1, 0].plot(xs, [v["cpu_us_marginal"] for v in rows.values()], "x--", label=f"{r} replicas, above idle")
    for a, t in ((ax[0, 0], "small writes: ops/s"), (ax[1, 0], "small writes: server CPU-µs per write")):
        a.set_xscale("log", base=2)
        a.set_xlabel("shards")
        a.set_title(t, fontsize=10)
        a.legend(fontsize=8)
    tr = res.get("transfer", {})
    xs = [int(k) for k in tr]
    for kind in ("pull", "push"):
        ax[0, 1].plot(xs, [v[f"{kind}_mb_s"] for v in tr.values()], "o-", label=kind)
        ax[1, 1].plot(xs, [v[f"{kind}_cpu_ms_per_mb"] for v in tr.values()], "o-", label=kind)
    for a, t in ((ax[0, 1], "tensor transfer: MB/s"), (ax[1, 1], "tensor transfer: server CPU-ms per MB")):
        a.set_xscale("log", base=4)
        a.set_xlabel("tensor size (KB)")
        a.set_title(t, fontsize=10)
        a.legend(fontsize=8)
    tn = res.get("tensors", {})
    xs = [int(k) for k in tn]
    ax[0, 2].plot(xs, [v["list_ms"] for v in tn.values()], "o-", label="GET /v1/tensors (ms)")
    ax[0, 2].plot(xs, [v["rss_bytes_per_tensor"] / 1024 for v in tn.values()], "s-", label="RSS per tensor (KB)")
    ax[0, 2].set_xscale("log")
    ax[0, 2].set_yscale("log")
    ax[0, 2].set_xlabel("tensors held (1 KB each)")
    ax[0, 2].set_title("many tensors", fontsize=10)
    ax[0, 2].legend(fontsize=8)
    hd = res.get("held", {})
    xs = [int(k) for k in hd]
    for key, label in (
        ("snapshot_s_max", "snapshot (slowest shard)"),
        ("restart_s", "restart to ready"),
        ("catch_up_s", "new replica ready"),
    ):
        ax[1, 2].plot(xs, [v[key] for v in hd.values()], "o-", label=label)
    ax[1, 2].set_xlabel("MB held")
    ax[1, 2].set_ylabel("s")
    ax[1, 2].set_title("state size", fontsize=10)
    ax[1, 2].legend(fontsize=8)
    fig.suptitle("paramstore: how cost grows with the work (python -m bench.scaling)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.scaling", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--full", action="store_true", help="every point of issue 15 item 6 (tens of minutes)")
    ap.add_argument("--seconds", type=float, default=3.0, help="measurement window per small-write point")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--port", type=int, default=PORT, help="first HTTP port, Raft from +100 (env BENCH_SCALING_PORT)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scaling.json"))
    ap.add_argument("--png", default=str(ROOT / "docs" / "scaling.png"))
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="psbench-scaling-"))
    try:
        res = measure(work, args.full, args.seconds, args.clients, args.reps, args.port)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["seconds"] = time.monotonic() - T0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    plot(res, Path(args.png))
    print(markdown(res))
    log(f"done in {res['seconds']:.0f}s; wrote {args.out} and {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
