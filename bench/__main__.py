"""paramstore side by side with etcd, Redis, raw pysyncobj and loopback TCP.

    python -m bench                 # make bench: every issue-15 target row + tables; <= 10 min on 2 cores
    python -m bench --only all      # make bench-all: + memory, recovery, CTR, gloo (~30 min)
    python -m bench --quick         # smaller sizes, 1 rep: a smoke run
    python -m bench --only small,pull --systems paramstore,redis
    python -m bench --only ctr --systems paramstore   # CTR training throughput (bench/ctr.py)
    python -m bench --only tables   # embedding tables vs Redis and numpy (bench/tables.py)
    python -m bench --only gloo --systems paramstore  # issue 14: DDP over gloo vs the store (bench/gloo.py)
    python -m bench --only scaling [--full]           # how cost grows with the work (bench/scaling.py)

Starts every system itself on 127.0.0.1 (ports 11000-19999), runs the
workloads (failover, small, pull and push with every system up and the
repetitions interleaved: bench/interleaved.py), tears everything down, prints
the table and each section's seconds, writes bench/results/<timestamp>.json,
bench/results/latest.{json,md}, bench/results/throughput.png and refreshes the
results section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from . import ctr, gloo, interleaved, limits, report, scaling
from .interleaved import summary
from .systems import ROOT, Paramstore, Redis, rss_peak_mb
from .tables import run_tables

# make bench: the sections that carry an issue-15 target row, and issue 12's tables
DEFAULT_ONLY = "limits,small,pull,push,failover,tables"
# make bench-all (--only all): + sections that serve no target at their full size
ALL_ONLY = DEFAULT_ONLY + ",memory,recovery,ctr,gloo"

MB = 1 << 20
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.0f}s] {msg}", flush=True)


class Elections:
    """Term changes per system during every workload except failover."""

    def __init__(self):
        self.by_system: dict[str, dict[str, int]] = {}

    def run(self, system, workload: str, fn):
        before = system.terms()
        try:
            return fn()
        finally:
            after = system.terms()
            self.by_system.setdefault(system.name, {})[workload] = after - before
            if after != before:
                log(f"  !! {system.name}: {after - before} term change(s) during {workload}")


# ======================================== memory and recovery (opt-in) ==


def run_memory_paramstore(args, res, el: Elections, work: Path) -> None:
    ps = Paramstore(work)
    log(f"paramstore memory: fresh cluster, {args.mem_mb} MB of parameters with Adam")
    ps.start()
    try:
        tsize = min(64, args.mem_mb)
        count = max(1, args.mem_mb // tsize)
        arr = np.random.default_rng(0).standard_normal(tsize * MB // 4).astype(np.float32)
        grad = (arr * 1e-3).astype(np.float32)
        conns = {n: ps.conn(n) for n in ps.nodes}

        def push(n: str, name: str):
            try:
                return ps.push(conns[n], name, grad)
            except OSError:  # uvicorn closes a connection left idle for 5 s (slow 64 MB pushes to the others)
                conns[n].close()
                conns[n] = ps.conn(n)
                return ps.push(conns[n], name, grad)

        def fill_and_push():
            for i in range(count):
                ps.put(ps.nodes[i % 3], f"p{i}", arr, {"type": "adam", "lr": 1e-3})
            log(f"  loaded {count} x {tsize} MB; pushing {tsize} MB gradients for {args.mem_seconds:.0f} s")
            t_end = time.monotonic() + args.mem_seconds
            pushes = 0
            while time.monotonic() < t_end:
                n = ps.nodes[pushes % 3]
                st, body = push(n, f"p{pushes % count}")
                if st != 200:
                    raise RuntimeError(f"memory push: {st} {body!r}")
                pushes += 1
            return pushes

        pushes = el.run(ps, "memory", fill_and_push)
        held = 3 * count * tsize  # parameters + Adam exp_avg + exp_avg_sq
        peaks = {n: rss_peak_mb(ps.pid(n)) for n in ps.nodes}
        res["memory"]["paramstore"] = {
            "held_mb": held,
            "peak_rss_mb": peaks,
            "pushes": pushes,
            "ratio": summary([p / held for p in peaks.values()]),
            "target_mb": 2.5 * held + 200,
        }
        log(
            f"  paramstore peak RSS {', '.join(f'{n} {p:.0f} MB' for n, p in peaks.items())} "
            f"holding {held} MB ({pushes} pushes); target <= {2.5 * held + 200:.0f} MB"
        )
        for c in conns.values():
            c.close()
        if "recovery" in args.only:
            times = []
            for k in range(args.recovery_reps):
                st = ps.status(ps.nodes[0])
                leads = [s.get("leader") for s in st["shards"]]
                node = min(ps.nodes, key=lambda n: leads.count(n))
                ps.kill(node)
                time.sleep(0.5)
                t0 = ps.start_node(node)
                t1 = ps.wait_ready([node])
                times.append(t1 - t0)
                log(f"  paramstore recovery {k + 1}: {node} holding {held} MB ready after {t1 - t0:.1f} s")
            res["recovery"]["paramstore"] = {**summary(times), "held_mb": held}
    finally:
        ps.stop()
        log("paramstore memory cluster: stopped")


def run_memory_redis(args, res, work: Path) -> None:
    rd = Redis(work)
    log(f"redis memory: fresh primary + 2 replicas, {3 * args.mem_mb} MB of values")
    rd.start()
    try:
        tsize = min(64, args.mem_mb)
        count = max(1, args.mem_mb // tsize)
        v = np.random.default_rng(0).standard_normal(tsize * MB // 4).astype(np.float32)
        c = rd.conn()
        for i in range(count):
            for kind in ("p", "m", "v"):  # parameters + the two Adam moments, as plain values
                c.call("SET", f"{kind}{i}", body=v)
        c.call("WAIT", "2", "0")
        t_end = time.monotonic() + args.mem_seconds
        pushes = 0
        while time.monotonic() < t_end:
            c.call("SET", f"p{pushes % count}", body=v)
            c.call("WAIT", "2", "0")
            pushes += 1
        c.close()
        held = 3 * count * tsize
        peaks = {str(p): rss_peak_mb(rd.procs[p].pid) for p in rd.PORTS}
        res["memory"]["redis"] = {
            "held_mb": held,
            "peak_rss_mb": peaks,
            "pushes": pushes,
            "ratio": summary([p / held for p in peaks.values()]),
        }
        log(f"  redis peak RSS {peaks} holding {held} MB ({pushes} SET+WAIT)")
        if "recovery" in args.only:
            times = []
            port = rd.PORTS[2]
            for k in range(args.recovery_reps):
                rd.kill(port)
                t0 = time.monotonic()
                rd.start_node(port)
                t1 = rd.wait_synced(port)
                times.append(t1 - t0)
                log(f"  redis recovery {k + 1}: replica resynced {held} MB in {t1 - t0:.1f} s")
            res["recovery"]["redis"] = {**summary(times), "held_mb": held}
    finally:
        rd.stop()


# ================================================================== main ==


def machine() -> dict:
    cpu = "?"
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    with open("/proc/meminfo") as f:
        mem = int(next(ln.split()[1] for ln in f if ln.startswith("MemTotal"))) // 1024

    def version(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "missing"

    import pysyncobj

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_mb": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pysyncobj": getattr(pysyncobj, "__version__", "0.3.17"),
        "etcd": version(["etcd", "--version"]),
        "redis": version(["redis-server", "--version"]),
        "load_avg_at_start": os.getloadavg(),
    }


def free_ports(ports: list[int]) -> None:
    """Raise if another process listens on one of `ports`: its cluster would
    answer in place of ours (another session's bench, run at the same time)."""
    import socket

    busy = []
    for p in ports:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", p)) == 0:
                busy.append(p)
    if busy:
        raise RuntimeError(f"ports {busy} are in use by another process")


def mem_available_mb() -> int:
    return int(next(ln.split()[1] for ln in open("/proc/meminfo") if ln.startswith("MemAvailable"))) // 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 rep: a smoke run")
    ap.add_argument(
        "--only", default=DEFAULT_ONLY, help=f"sections (default {DEFAULT_ONLY}); 'all' adds memory,recovery,ctr,gloo"
    )
    ap.add_argument("--systems", default="paramstore,paramstore-nofsync,etcd,etcd-tmpfs,redis,pysyncobj,loopback")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0, help="measurement window per small-update run")
    ap.add_argument("--clients", default="1,16,64")
    ap.add_argument("--sizes", default="1,16,64", help="MB, pulls and large pushes")
    ap.add_argument("--mem-mb", type=int, default=1024, help="parameter bytes for memory/recovery (MB)")
    ap.add_argument("--mem-seconds", type=float, default=60.0)
    ap.add_argument("--failovers", type=int, default=20, help="paramstore leader kills (median and p99 over them)")
    ap.add_argument("--peer-failovers", type=int, default=5, help="leader kills of etcd and raw pysyncobj")
    ap.add_argument("--ctr-steps", type=int, default=150, help="CTR training steps per worker (bench/ctr.py)")
    ap.add_argument("--gloo-steps", type=int, default=gloo.Config.steps, help="steps per worker (bench/gloo.py)")
    ap.add_argument("--recovery-reps", type=int, default=3)
    ap.add_argument("--etcd-max-request", type=int, default=200 * MB, help="the raised etcd --max-request-bytes")
    ap.add_argument("--raw-big-timeout", type=float, default=15.0)
    ap.add_argument(
        "--raw-push-max-mb", type=int, default=1, help="largest raw pysyncobj push (16 MB commands never commit)"
    )
    ap.add_argument("--redis-plain", action="store_true", help="small: Redis SET without WAIT too (on with --only all)")
    ap.add_argument(
        "--push-etcd-tmpfs", action="store_true", help="push: etcd on tmpfs too (~25 s; on with --only all)"
    )
    ap.add_argument(
        "--etcd-default-limit",
        action="store_true",
        help="push: one attempt per size on etcd with its default 1.5 MiB limit (on with --only all)",
    )
    ap.add_argument("--table-rows", type=int, default=1_000_000, help="rows of the dim-64 table (tables)")
    ap.add_argument("--table-cap-mb", type=int, default=128, help="the replicas' table cache (memory cap), MB")
    ap.add_argument("--table-fit-cap-mb", type=int, default=0, help="the cap that holds the table (0: from the rows)")
    ap.add_argument("--table-no-join", action="store_true", help="skip the joining replica (table snapshot)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--full", action="store_true", help="scaling: every point of issue 15 item 6, not the 5-min subset")
    ap.add_argument("--no-docs", action="store_true", help="do not refresh docs/benchmarks.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.seconds, args.mem_mb, args.mem_seconds = 1, 2.0, 128, 10.0
        args.failovers, args.peer_failovers, args.recovery_reps, args.raw_big_timeout = 2, 2, 1, 5.0
        args.ctr_steps = 40
        args.table_rows, args.table_cap_mb = 200_000, 32
        args.gloo_steps = min(args.gloo_steps, 3)
    if args.only == "all":
        args.only, args.redis_plain, args.push_etcd_tmpfs, args.etcd_default_limit = ALL_ONLY, True, True, True
    args.only = set(args.only.split(","))
    if args.only == {"scaling"}:  # its own results and plot; the comparison table is not touched
        return scaling.main(["--seconds", str(args.seconds), "--reps", str(args.reps), *(["--full"] * args.full)])
    args.systems = args.systems.split(",")
    args.clients = [int(x) for x in args.clients.split(",")]
    args.sizes = [int(x) for x in args.sizes.split(",")]
    notes = []
    # memory guard: three replicas each holding params + 2 Adam moments, plus working copies
    need = 3 * 3 * args.mem_mb * 2.0 + 2048
    if "memory" in args.only and mem_available_mb() < need:
        scaled = args.mem_mb
        while scaled > 64 and mem_available_mb() < 3 * 3 * scaled * 2.0 + 2048:
            scaled //= 2
        notes.append(
            f"memory/recovery scaled down from {args.mem_mb} MB to {scaled} MB of parameters: "
            f"only {mem_available_mb()} MB RAM available"
        )
        log(notes[-1])
        args.mem_mb = scaled
    for tool in ("etcd", "redis-server"):
        if shutil.which(tool) is None:
            log(f"{tool} is not installed (apt-get install etcd-server redis-server); skipping it")
            args.systems = [s for s in args.systems if s.split("-")[0] != tool.split("-")[0]]
    res = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "notes": notes,
        "config": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()},
        "small": {},
        "pull": {},
        "push": {},
        "memory": {},
        "failover": {},
        "recovery": {},
        "elections": {},
        "limits": {},
        "section_seconds": {},
        "failures": [],
    }
    el = Elections()
    work = Path(tempfile.mkdtemp(prefix="paramstore-bench-"))
    log(
        f"work dir {work}; machine {res['machine']['cpu']}, {res['machine']['cores']} cores, "
        f"load {res['machine']['load_avg_at_start']}"
    )
    steps = []
    if "limits" in args.only:
        steps.append(("limits", lambda: res["limits"].update(limits.measure(work / "limits", log))))
    if args.only & {"small", "pull", "push", "failover"}:

        def compared():
            free_ports([11000, 11500, 12000, 12500, *Redis.PORTS, 14100])
            sy = interleaved.Systems(args, work, log)
            try:
                t = time.monotonic()
                sy.start()
                res["section_seconds"]["start-up"] = time.monotonic() - t
                interleaved.run(sy, res)
            finally:
                sy.stop()
                for name, d in sy.elections.items():
                    res["elections"].setdefault(name, {}).update(d)

        steps.append(("compared", compared))
    if "tables" in args.only and {"paramstore", "redis"} <= set(args.systems):

        def tables():
            from .tables import TableCluster

            free_ports([TableCluster.PORTS + i for i in range(4)] + list(Redis.PORTS))
            run_tables(args, res, el, work, log)

        steps.append(("tables", tables))
    if "paramstore" in args.systems and args.only & {"memory", "recovery"}:
        steps.append(("memory", lambda: free_ports([11000]) or run_memory_paramstore(args, res, el, work)))
    if "redis" in args.systems and args.only & {"memory", "recovery"}:
        steps.append(("redis memory", lambda: free_ports(list(Redis.PORTS)) or run_memory_redis(args, res, work)))
    if "paramstore" in args.systems and "ctr" in args.only:
        steps.append(("ctr", lambda: res.__setitem__("ctr", ctr.measure(work / "ctr", args.ctr_steps, log))))
    if "paramstore" in args.systems and "gloo" in args.only:
        gloo_cfg = gloo.Config(steps=args.gloo_steps, **({"hidden": 1024} if args.quick else {}))
        steps.append(("gloo", lambda: res.__setitem__("gloo", gloo.run(gloo_cfg, work / "gloo", log))))
    if "scaling" in args.only:  # not in --only all either: its own 5 min (python -m bench.scaling)

        def scale():
            res["scaling"] = scaling.measure(work / "scaling", args.full, args.seconds, 16, args.reps)
            scaling.plot(res["scaling"], ROOT / "docs" / "scaling.png")

        steps.append(("scaling", scale))
    for name, fn in steps:
        t = time.monotonic()
        try:
            fn()
        except Exception as e:  # one broken peer must not lose the others' figures
            traceback.print_exc()
            res["failures"].append(f"{name}: {e!r}")
            log(f"{name} FAILED: {e!r}")
        if name != "compared":  # that one times its own sections
            res["section_seconds"][name] = time.monotonic() - t
    for name, d in el.by_system.items():  # tables and memory count theirs through `el`
        for workload, n in d.items():
            res["elections"].setdefault(name, {})[workload] = n
    res["seconds"] = time.monotonic() - T0
    res["load_avg_at_end"] = os.getloadavg()
    if res["failures"]:
        log(f"kept {work} (logs) because something failed")
    else:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = json.dumps(res, indent=1, default=str)
    (out / f"{stamp}.json").write_text(text)
    (out / "latest.json").write_text(text)
    md = report.markdown(res)
    (out / "latest.md").write_text(md)
    try:
        report.plot(res, out / "throughput.png")
    except Exception as e:  # matplotlib missing must not lose the figures
        log(f"plot failed: {e!r}")
    if not args.no_docs:
        report.update_docs(ROOT / "docs" / "benchmarks.md", md)
    print()
    print(md)
    for name, sec in res["section_seconds"].items():
        log(f"  section {name:12s} {sec:6.0f} s")
    log(f"done in {res['seconds']:.0f} s; results in {out}")
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
