"""paramstore side by side with etcd, Redis, raw pysyncobj and loopback TCP.

    python -m bench                 # everything (make bench); ~10-15 min on 2 cores
    python -m bench --quick         # smaller sizes, 1 rep: a smoke run
    python -m bench --only small,pull --systems paramstore,redis
    python -m bench --only ctr --systems paramstore   # CTR training throughput (bench/ctr.py)
    python -m bench --only tables   # embedding tables vs Redis and numpy (bench/tables.py)
    python -m bench --only gloo --systems paramstore  # issue 14: DDP over gloo vs the store (bench/gloo.py)
    python -m bench --only scaling [--full]           # how cost grows with the work (bench/scaling.py)

Starts every system itself on 127.0.0.1 (ports 11000-19999), runs the
workloads, tears everything down, prints the table, writes
bench/results/<timestamp>.json, bench/results/latest.{json,md},
bench/results/throughput.png and refreshes the results section of
docs/benchmarks.md.
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
from functools import partial
from pathlib import Path

import numpy as np

from . import ctr, gloo, limits, report, scaling
from .load import BlockingHTTP, closed_loop, loopback_mb_s
from .systems import ROOT, Etcd, Paramstore, RawSyncObj, Redis, cpu_seconds, raw_headers, rid, rss_peak_mb
from .tables import run_tables

MB = 1 << 20
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.0f}s] {msg}", flush=True)


def summary(values: list[float]) -> dict:
    v = [x for x in values if x is not None and x == x]
    if not v:
        return {"median": None, "min": None, "max": None, "runs": values}
    return {"median": float(np.median(v)), "min": float(min(v)), "max": float(max(v)), "runs": values}


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


# ============================================================== workloads ==


def small_http(system, job, args, out: dict, label: str) -> None:
    """`system.pids()` (all replicas/members): their CPU per committed write is
    recorded too; unlike ops/s it hardly moves with the machine's load."""
    pids = system.pids()
    for c in args.clients:
        runs = [closed_loop(job, c, args.seconds, probe=partial(cpu_seconds, pids)) for _ in range(args.reps)]
        errs = sum(r["errors"] for r in runs)
        out.setdefault(label, {})[str(c)] = {
            "ops_s": summary([r["ops_s"] for r in runs]),
            "cpu_us": summary([r["probed"] / r["ops"] * 1e6 if r["ops"] else None for r in runs]),
            "p50_ms": summary([r["p50_ms"] for r in runs]),
            "p99_ms": summary([r["p99_ms"] for r in runs]),
            "errors": errs,
            "error_samples": [s for r in runs for s in r["error_samples"]][:3],
        }
        cpu = out[label][str(c)]["cpu_us"]["median"]
        log(
            f"  {label:14s} {c:3d} clients: {out[label][str(c)]['ops_s']['median']:8.0f} ops/s "
            f"p50 {out[label][str(c)]['p50_ms']['median']:.1f} ms p99 {out[label][str(c)]['p99_ms']['median']:.1f} ms "
            f"CPU {cpu if cpu is not None else float('nan'):.0f} us/write"
            + (f"  errors {errs} {runs[0]['error_samples']}" if errs else "")
        )


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# Variants of the defaults, run on the writes their setting changes (pulls do not sync)
VARIANTS = {"paramstore-nofsync": {"PARAMSTORE_RAFT__FSYNC": "false"}}


def run_paramstore(args, res, el: Elections, work: Path, label: str = "paramstore") -> None:
    variant = label in VARIANTS
    ps = Paramstore(work, name=label, env=VARIANTS.get(label))
    log(f"{label}: starting 3 replicas" + (f" with {VARIANTS[label]}" if variant else ""))
    ps.start()
    try:
        if "failover" in args.only and not variant:  # first, on a short log, as for every system
            res["failover"]["paramstore"] = failover_paramstore(ps, args)
        if "small" in args.only:
            job = ps.small_job()
            el.run(ps, "small", lambda: small_http(ps, job, args, res["small"], label))
        shard_leader = {}

        def follower_of(name):
            shard = shard_leader[name]
            lead = ps.leader_of(shard)
            return lead, next(n for n in ps.nodes if n != lead)

        if "pull" in args.only and not variant:

            def pulls():
                for mb in args.sizes:
                    arr = np.random.default_rng(mb).standard_normal(mb * MB // 4).astype(np.float32)
                    name = f"pull{mb}"
                    r = ps.put(ps.nodes[0], name, arr, {"type": "assign"})
                    shard_leader[name] = r["shard"]
                    _, fol = follower_of(name)
                    c = ps.conn(fol)
                    ps.get(c, name, min_version=r["version"])
                    runs = [mb / timed(partial(ps.get, c, name)) for _ in range(args.reps)]
                    c.close()
                    res["pull"].setdefault("paramstore", {})[str(mb)] = summary(runs)
                    log(f"  paramstore pull {mb:3d} MB from follower: {np.median(runs):7.0f} MB/s")

            el.run(ps, "pull", pulls)
        if "push" in args.only:

            def pushes():
                for mb in args.sizes:
                    arr = np.random.default_rng(mb).standard_normal(mb * MB // 4).astype(np.float32) * 1e-3
                    name = f"push{mb}"
                    r = ps.put(ps.nodes[0], name, arr, {"type": "sgd", "lr": 0.01})
                    shard_leader[name] = r["shard"]
                    lead, _ = follower_of(name)
                    c = ps.conn(lead)
                    others = {n: ps.conn(n) for n in ps.nodes}
                    ack, full = [], []
                    for _ in range(args.reps):
                        t = time.perf_counter()
                        st, body = ps.push(c, name, arr)
                        t_ack = time.perf_counter() - t
                        if st != 200:
                            raise RuntimeError(f"push {name}: {st} {body!r}")
                        v = json.loads(body)["version"]
                        for n, oc in others.items():  # applied on all 3 replicas
                            s2, _ = oc.request("HEAD", f"/v1/tensors/{name}?min_version={v}&timeout=60")
                            if s2 != 200:
                                raise RuntimeError(f"HEAD {name} on {n}: {s2}")
                        t_all = time.perf_counter() - t
                        ack.append(mb / t_ack)
                        full.append(mb / t_all)
                    for oc in [c, *others.values()]:
                        oc.close()
                    res["push"].setdefault(label, {})[str(mb)] = summary(full)
                    res["push"].setdefault(f"{label} (majority ack)", {})[str(mb)] = summary(ack)
                    log(
                        f"  {label} push {mb:3d} MB: {np.median(full):6.0f} MB/s on 3 replicas, "
                        f"{np.median(ack):6.0f} MB/s acked"
                    )

            el.run(ps, "push", pushes)
        res["elections"][label] = el.by_system.get(label, {})
    finally:
        ps.stop()
        log(f"{label}: stopped")


def first_commit_after(t0: float, attempt, interval: float = 0.05, limit: float = 30.0) -> float | None:
    """Start a fresh write attempt every `interval` s (each on its own thread and
    connection, alternating survivors) until one commits; return the time from
    t0 (the SIGKILL) to the first committed reply. Several attempts are in
    flight, so a request that the server holds until its own timeout (etcd
    answers 'request timed out' after ~7 s) does not hide a faster commit."""
    import threading

    done = threading.Event()
    first: list[float] = []
    lock = threading.Lock()

    def run(i):
        try:
            ok = attempt(i)
        except Exception:  # refused / reset while leaderless: just a failed attempt
            ok = False
        if ok:
            with lock:
                if not first:
                    first.append(time.perf_counter())
            done.set()

    i = 0
    while not done.is_set() and time.perf_counter() - t0 < limit:
        threading.Thread(target=run, args=(i,), daemon=True).start()
        i += 1
        done.wait(interval)
    return first[0] - t0 if first else None


def failover_paramstore(ps: Paramstore, args) -> dict:
    g = np.ones(256, np.float32)
    r = ps.put(ps.nodes[0], "failover", g, {"type": "sgd", "lr": 0.001})
    shard = r["shard"]
    times = []
    for k in range(args.failovers):
        lead = ps.leader_of(shard)
        survivors = [n for n in ps.nodes if n != lead]

        def attempt(i, survivors=survivors):
            c = BlockingHTTP(*ps.urls[survivors[i % 2]], timeout=15)
            try:
                st, _ = c.request("POST", "/v1/tensors/failover/grad", {**raw_headers(g), "X-Request-Id": rid()}, g)
                return st == 200
            finally:
                c.close()

        ps.kill(lead)
        dt = first_commit_after(time.perf_counter(), attempt)
        times.append(dt)
        log(
            f"  paramstore failover {k + 1}: killed {lead} (shard {shard} leader), "
            f"first commit after {dt if dt is not None else float('nan'):.2f} s"
        )
        ps.start_node(lead)
        ps.wait_ready(ps.nodes)
        time.sleep(1.5)
    return summary(times)


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

        def fill_and_push():
            for i in range(count):
                ps.put(ps.nodes[i % 3], f"p{i}", arr, {"type": "adam", "lr": 1e-3}, conn=conns[ps.nodes[i % 3]])
            log(f"  loaded {count} x {tsize} MB; pushing {tsize} MB gradients for {args.mem_seconds:.0f} s")
            t_end = time.monotonic() + args.mem_seconds
            pushes = 0
            while time.monotonic() < t_end:
                n = ps.nodes[pushes % 3]
                st, body = ps.push(conns[n], f"p{pushes % count}", grad)
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
        res["elections"].setdefault("paramstore", {})["memory"] = el.by_system["paramstore"].get("memory")
    finally:
        ps.stop()
        log("paramstore memory cluster: stopped")


def run_etcd(args, res, el: Elections, work: Path) -> None:
    et = Etcd(work, max_request_bytes=args.etcd_max_request)
    log(f"etcd: starting 3 members (--max-request-bytes {args.etcd_max_request})")
    et.start()
    try:
        if "failover" in args.only:
            res["failover"]["etcd"] = failover_etcd(et, args)
        if "small" in args.only:
            job = et.small_job()
            el.run(et, "small", lambda: small_http(et, job, args, res["small"], "etcd"))
        if "pull" in args.only:

            def pulls():
                for mb in args.sizes:
                    v = np.random.default_rng(mb).standard_normal(mb * MB // 4).astype(np.float32)
                    c = BlockingHTTPFor(et, et.leader())
                    st, body = et.put(c, f"pull{mb}", v)
                    c.close()
                    if st != 200 or b"error" in body:
                        res["pull"].setdefault("etcd", {})[str(mb)] = {"median": None, "error": f"{st} {body[:120]!r}"}
                        log(f"  etcd pull {mb} MB: put failed {st} {body[:120]!r}")
                        continue
                    c = BlockingHTTPFor(et, et.follower())
                    time.sleep(0.2)
                    et.get(c, f"pull{mb}")
                    runs = [mb / timed(partial(et.get, c, f"pull{mb}")) for _ in range(args.reps)]
                    c.close()
                    res["pull"].setdefault("etcd", {})[str(mb)] = summary(runs)
                    log(f"  etcd pull {mb:3d} MB from follower: {np.median(runs):7.0f} MB/s")

            el.run(et, "pull", pulls)
        if "push" in args.only:
            el.run(et, "push", lambda: etcd_pushes(et, args, res, "etcd (limit raised)"))
        res["elections"]["etcd"] = el.by_system.get("etcd", {})
    finally:
        et.stop()
        log("etcd: stopped")
    if "push" in args.only:
        et = Etcd(work, max_request_bytes=None)
        log("etcd: starting 3 members with the default request limit (1.5 MiB)")
        et.start()
        try:
            etcd_pushes(et, args, res, "etcd")
        finally:
            et.stop()


def BlockingHTTPFor(et: Etcd, m: str):
    from .load import BlockingHTTP

    return BlockingHTTP(*et.client(m))


def etcd_pushes(et: Etcd, args, res, label: str) -> None:
    for mb in args.sizes:
        v = np.random.default_rng(mb).standard_normal(mb * MB // 4).astype(np.float32)
        c = BlockingHTTPFor(et, et.leader())
        runs, err = [], None
        for _ in range(args.reps):
            t = time.perf_counter()
            st, body = et.put(c, f"push{mb}", v)
            dt = time.perf_counter() - t
            if st != 200 or b'"error"' in body or b'"code"' in body:
                err = f"HTTP {st}: {body[:160].decode(errors='replace')}"
                break
            runs.append(mb / dt)
        c.close()
        if err:
            res["push"].setdefault(label, {})[str(mb)] = {"median": None, "error": err}
            log(f"  {label} push {mb:3d} MB: refused: {err}")
        else:
            res["push"].setdefault(label, {})[str(mb)] = summary(runs)
            log(f"  {label} push {mb:3d} MB: {np.median(runs):6.0f} MB/s")


def failover_etcd(et: Etcd, args) -> dict:
    from .load import BlockingHTTP

    times = []
    v = np.ones(256, np.float32).tobytes()
    for k in range(args.peer_failovers):
        lead = et.leader()
        survivors = [m for m in et.members if m != lead]

        def attempt(i, survivors=survivors):
            c = BlockingHTTP(*et.client(survivors[i % 2]), timeout=15)
            try:
                st, body = et.put(c, "failover", v)
                return st == 200 and b'"error"' not in body
            finally:
                c.close()

        et.kill(lead)
        dt = first_commit_after(time.perf_counter(), attempt)
        times.append(dt)
        log(
            f"  etcd failover {k + 1}: killed leader {lead}, "
            f"first commit after {dt if dt is not None else float('nan'):.2f} s"
        )
        et.start_node(lead, new=False)
        et.wait_healthy(et.members, timeout=180)
        time.sleep(1.5)
    return summary(times)


def run_redis(args, res, el: Elections, work: Path) -> None:
    rd = Redis(work)
    log("redis: starting a primary and two replicas")
    rd.start()
    try:
        if "small" in args.only:
            small_http(rd, rd.small_job(wait=True), args, res["small"], "redis WAIT 2")
            small_http(rd, rd.small_job(wait=False), args, res["small"], "redis plain")
        c = rd.conn()
        rep = rd.conn(rd.PORTS[1])
        if "pull" in args.only:
            for mb in args.sizes:
                v = np.random.default_rng(mb).standard_normal(mb * MB // 4).astype(np.float32)
                c.call("SET", f"pull{mb}", body=v)
                c.call("WAIT", "2", "0")
                rep.call("GET", f"pull{mb}")
                runs = [mb / timed(partial(rep.call, "GET", f"pull{mb}")) for _ in range(args.reps)]
                res["pull"].setdefault("redis", {})[str(mb)] = summary(runs)
                log(f"  redis GET {mb:3d} MB from replica: {np.median(runs):7.0f} MB/s")
        if "push" in args.only:
            for mb in args.sizes:
                v = np.random.default_rng(mb).standard_normal(mb * MB // 4).astype(np.float32)
                w, p = [], []
                for _ in range(args.reps):
                    t = time.perf_counter()
                    c.call("SET", f"push{mb}", body=v)
                    t1 = time.perf_counter()
                    n = c.call("WAIT", "2", "0")
                    t2 = time.perf_counter()
                    assert n == 2, n
                    p.append(mb / (t1 - t))
                    w.append(mb / (t2 - t))
                res["push"].setdefault("redis WAIT 2", {})[str(mb)] = summary(w)
                res["push"].setdefault("redis plain", {})[str(mb)] = summary(p)
                log(f"  redis SET {mb:3d} MB: {np.median(w):6.0f} MB/s with WAIT 2, {np.median(p):6.0f} plain")
        c.close()
        rep.close()
    finally:
        rd.stop()
        log("redis: stopped")
    if "memory" in args.only:
        run_memory_redis(args, res, work)


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


def run_raw(args, res, el: Elections, work: Path) -> None:
    raw = RawSyncObj(work)
    log("pysyncobj: starting 3 raw members")
    raw.start()
    try:
        if "failover" in args.only:  # first: a restarted member replaying a long journal
            times = []
            for k in range(args.peer_failovers):
                lead = raw.leader()
                survivors = [i for i in range(raw.n) if i != lead]
                raw.kill(lead)
                dt = first_commit_after(
                    time.perf_counter(),
                    lambda i, sv=survivors: raw.ctl(sv[i % 2], {"op": "write", "nbytes": 1024, "timeout": 10}, 15).get(
                        "ok", False
                    ),
                )
                times.append(dt)
                log(f"  pysyncobj failover {k + 1}: first commit after {dt if dt is not None else float('nan'):.2f} s")
                raw.start_node(lead)
                raw.wait_ready(range(raw.n))
                time.sleep(1.5)
            res["failover"]["pysyncobj"] = summary(times)
        if "small" in args.only:

            def small():
                for c in args.clients:
                    lead = raw.leader()
                    runs = [
                        raw.ctl(lead, {"op": "load", "clients": c, "seconds": args.seconds}) for _ in range(args.reps)
                    ]
                    res["small"].setdefault("pysyncobj", {})[str(c)] = {
                        "ops_s": summary([r["ops_s"] for r in runs]),
                        "p50_ms": summary([r["p50_ms"] for r in runs]),
                        "p99_ms": summary([r["p99_ms"] for r in runs]),
                        "errors": sum(r["errors"] for r in runs),
                    }
                    log(
                        f"  pysyncobj      {c:3d} clients: {np.median([r['ops_s'] for r in runs]):8.0f} ops/s "
                        f"p50 {np.median([r['p50_ms'] for r in runs]):.1f} ms"
                    )

            el.run(raw, "small", small)
        if "push" in args.only:

            def pushes():
                failed = False
                for mb in args.sizes:
                    if failed:
                        res["push"].setdefault("pysyncobj", {})[str(mb)] = {
                            "median": None,
                            "error": "not attempted: a smaller command already failed",
                        }
                        continue
                    lead = raw.leader()
                    runs = []
                    for _ in range(args.reps if mb <= 1 else 1):
                        r = raw.ctl(lead, {"op": "write", "nbytes": mb * MB, "timeout": args.raw_big_timeout})
                        if not r["ok"]:
                            failed = True
                            res["push"].setdefault("pysyncobj", {})[str(mb)] = {
                                "median": None,
                                "error": f"no commit within {args.raw_big_timeout:.0f} s",
                            }
                            log(f"  pysyncobj push {mb} MB: no commit within {args.raw_big_timeout:.0f} s")
                            break
                        runs.append(mb / r["seconds"])
                    if not failed:
                        res["push"].setdefault("pysyncobj", {})[str(mb)] = summary(runs)
                        log(f"  pysyncobj push {mb:3d} MB: {np.median(runs):6.1f} MB/s")

            el.run(raw, "push", pushes)
        res["elections"]["pysyncobj"] = el.by_system.get("pysyncobj", {})
    finally:
        raw.stop()
        log("pysyncobj: stopped")


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


def mem_available_mb() -> int:
    return int(next(ln.split()[1] for ln in open("/proc/meminfo") if ln.startswith("MemAvailable"))) // 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 rep: a smoke run")
    ap.add_argument("--only", default="limits,small,pull,push,memory,failover,recovery,ctr,tables,gloo")
    ap.add_argument("--systems", default="paramstore,paramstore-nofsync,etcd,redis,pysyncobj,loopback")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0, help="measurement window per small-update run")
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
    ap.add_argument("--table-rows", type=int, default=1_000_000, help="rows of the dim-64 table (tables)")
    ap.add_argument("--table-cap-mb", type=int, default=128, help="the replicas' table cache (memory cap), MB")
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
            args.systems = [s for s in args.systems if not tool.startswith(s)]
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
    if "loopback" in args.systems and "pull" in args.only:

        def loop():
            for mb in args.sizes:
                res["pull"].setdefault("loopback TCP", {})[str(mb)] = summary(loopback_mb_s(mb * MB, args.reps))
                log(f"  loopback TCP {mb:3d} MB: {res['pull']['loopback TCP'][str(mb)]['median']:7.0f} MB/s")

        steps.append(("loopback", loop))
    basic = args.only & {"small", "pull", "push", "failover", "memory", "recovery"}
    if "paramstore" in args.systems and basic:
        steps.append(("paramstore", lambda: run_paramstore(args, res, el, work)))
    for variant in VARIANTS:  # right after the defaults, so that the load of the machine is alike
        if variant in args.systems and args.only & {"small", "push"}:
            steps.append((variant, partial(run_paramstore, args, res, el, work, variant)))
    if "paramstore" in args.systems and args.only & {"memory", "recovery"}:
        steps.append(("paramstore memory", lambda: run_memory_paramstore(args, res, el, work)))
    if "paramstore" in args.systems and "ctr" in args.only:
        steps.append(("ctr", lambda: res.__setitem__("ctr", ctr.measure(work / "ctr", args.ctr_steps, log))))
    if "tables" in args.only and {"paramstore", "redis"} <= set(args.systems):
        steps.append(("tables", lambda: run_tables(args, res, el, work, log)))
    if "paramstore" in args.systems and "gloo" in args.only:
        gloo_cfg = gloo.Config(steps=args.gloo_steps, **({"hidden": 1024} if args.quick else {}))
        steps.append(("gloo", lambda: res.__setitem__("gloo", gloo.run(gloo_cfg, work / "gloo", log))))
    if "scaling" in args.only:  # not in the default --only: its own 5 min (python -m bench.scaling)

        def scale():
            res["scaling"] = scaling.measure(work / "scaling", args.full, args.seconds, 16, args.reps)
            scaling.plot(res["scaling"], ROOT / "docs" / "scaling.png")

        steps.append(("scaling", scale))
    if "redis" in args.systems and basic:
        steps.append(("redis", lambda: run_redis(args, res, el, work)))
    if "etcd" in args.systems:
        steps.append(("etcd", lambda: run_etcd(args, res, el, work)))
    if "pysyncobj" in args.systems:
        steps.append(("pysyncobj", lambda: run_raw(args, res, el, work)))
    for name, fn in steps:
        try:
            fn()
        except Exception as e:  # one broken peer must not lose the others' figures
            traceback.print_exc()
            res["failures"].append(f"{name}: {e!r}")
            log(f"{name} FAILED: {e!r}")
    res["seconds"] = time.monotonic() - T0
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
    log(f"done in {res['seconds']:.0f} s; results in {out}")
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
