"""The comparison sections of `make bench` (failover, small, pull, push) with
every system up at once and their repetitions interleaved: repetition r runs
each system once, in an order rotated by r (A B C, B C A, ...), so that a
change in the machine's load between repetitions hits every system alike.

Systems (bench/systems.py, each on its own ports): paramstore (fsync on, the
default) and paramstore-nofsync; etcd with its data dir on the disk the
replicas write to (the durable peer of paramstore) and etcd-tmpfs (the peer of
paramstore-nofsync); Redis (a primary + 2 replicas, no persistence); raw
pysyncobj; loopback TCP (pulls). The systems not being measured sit idle
beside the one that is: every system pays the others' idle upkeep alike.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .load import BlockingHTTP, closed_loop, loopback_mb_s
from .systems import Etcd, Paramstore, RawSyncObj, Redis, cpu_seconds, raw_headers, rid

MB = 1 << 20

# label -> (constructor extras); ports apart so that both run at once
PARAMSTORES = {
    "paramstore": {},
    "paramstore-nofsync": {"env": {"PARAMSTORE_RAFT__FSYNC": "false"}, "ports": (11500, 11600)},
}
ETCDS = {"etcd": {"on_disk": True}, "etcd-tmpfs": {"on_disk": False, "ports": (12500, 12600)}}


def summary(values: list[Any]) -> dict[str, Any]:
    v = [x for x in values if x is not None and x == x]
    if not v:
        return {"median": None, "min": None, "max": None, "runs": values}
    return {"median": float(np.median(v)), "min": float(min(v)), "max": float(max(v)), "runs": values}


def rotated(labels: list[str], r: int) -> list[str]:
    k = r % len(labels) if labels else 0
    return labels[k:] + labels[:k]


class Systems:
    """Every compared system, started once for all the interleaved sections."""

    def __init__(self, args: Any, work: Path, log: Callable[[str], None]) -> None:
        self.args, self.work, self.log = args, work, log
        self.ps: dict[str, Paramstore] = {}
        self.etcd: dict[str, Etcd] = {}
        self.redis: Redis | None = None
        self.raw: RawSyncObj | None = None
        self.elections: dict[str, dict[str, int]] = {}

    def start(self) -> None:
        a = self.args
        for label, kw in PARAMSTORES.items():
            if label in a.systems:
                self.log(f"{label}: starting 3 replicas {kw.get('env') or ''}")
                self.ps[label] = Paramstore(self.work, name=label, **kw)
                self.ps[label].start()
        for label, kw in ETCDS.items():
            if label in a.systems:
                self.log(f"{label}: starting 3 members (--max-request-bytes {a.etcd_max_request})")
                self.etcd[label] = Etcd(self.work, max_request_bytes=a.etcd_max_request, name=label, **kw)
                self.etcd[label].start()
        if "redis" in a.systems:
            self.log("redis: starting a primary and two replicas")
            self.redis = Redis(self.work)
            self.redis.start()
        if "pysyncobj" in a.systems:
            self.log("pysyncobj: starting 3 raw members")
            self.raw = RawSyncObj(self.work)
            self.raw.start()

    def stop(self) -> None:
        for s in [*self.ps.values(), *self.etcd.values(), self.redis, self.raw]:
            if s is not None:
                s.stop()
        self.log("interleaved systems: stopped")

    def raft_systems(self) -> list[Any]:
        return [*self.ps.values(), *self.etcd.values(), *([self.raw] if self.raw else [])]

    def section(self, workload: str, fn: Callable[[], None]) -> None:
        """Run `fn`; term changes of every Raft system across it are its elections."""
        before = {s.name: s.terms() for s in self.raft_systems()}
        try:
            fn()
        finally:
            for s in self.raft_systems():
                n = s.terms() - before[s.name]
                self.elections.setdefault(s.name, {})[workload] = n
                if n:
                    self.log(f"  !! {s.name}: {n} term change(s) during {workload}")


# ================================================================ failover ==


def first_commit_after(t0: float, attempt: Callable[[int], bool], interval: float = 0.05, limit: float = 30.0):
    """Start a fresh write attempt every `interval` s (each on its own thread and
    connection, alternating survivors) until one commits; return the time from
    t0 (the SIGKILL) to the first committed reply. Several attempts are in
    flight, so a request that the server holds until its own timeout (etcd
    answers 'request timed out' after ~7 s) does not hide a faster commit."""
    import threading

    done = threading.Event()
    first: list[float] = []
    lock = threading.Lock()

    def run(i: int) -> None:
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


def _kill_paramstore(ps: Paramstore, shard: int, g: np.ndarray) -> float | None:
    lead = ps.leader_of(shard)
    survivors = [n for n in ps.nodes if n != lead]

    def attempt(i: int) -> bool:
        c = BlockingHTTP(*ps.urls[survivors[i % 2]], timeout=15)
        try:
            st, _ = c.request("POST", "/v1/tensors/failover/grad", {**raw_headers(g), "X-Request-Id": rid()}, g)
            return st == 200
        finally:
            c.close()

    ps.kill(lead)
    dt = first_commit_after(time.perf_counter(), attempt)
    ps.start_node(lead)
    ps.wait_ready(ps.nodes)
    return dt


def _kill_etcd(et: Etcd) -> float | None:
    v = np.ones(256, np.float32).tobytes()
    lead = et.leader()
    survivors = [m for m in et.members if m != lead]

    def attempt(i: int) -> bool:
        c = BlockingHTTP(*et.client(survivors[i % 2]), timeout=15)
        try:
            st, body = et.put(c, "failover", v)
            return st == 200 and b'"error"' not in body
        finally:
            c.close()

    et.kill(lead)
    dt = first_commit_after(time.perf_counter(), attempt)
    et.start_node(lead, new=False)
    et.wait_healthy(et.members, timeout=180)
    return dt


def _kill_raw(raw: RawSyncObj) -> float | None:
    lead = raw.leader()
    survivors = [i for i in range(raw.n) if i != lead]
    raw.kill(lead)
    dt = first_commit_after(
        time.perf_counter(),
        lambda i: raw.ctl(survivors[i % 2], {"op": "write", "nbytes": 1024, "timeout": 10}, 15).get("ok", False),
    )
    raw.start_node(lead)
    raw.wait_ready(range(raw.n))
    return dt


def failover(sy: Systems, res: dict[str, Any]) -> None:
    """Kills interleaved: round k kills paramstore's shard leader, then (for the
    first --peer-failovers rounds) etcd's leader and raw pysyncobj's. Run first,
    on short logs. Only the durable etcd (on disk) is killed."""
    a, log = sy.args, sy.log
    ps = sy.ps.get("paramstore")
    shard, g = None, np.ones(256, np.float32)
    if ps:
        shard = ps.put(ps.nodes[0], "failover", g, {"type": "sgd", "lr": 0.001})["shard"]
    kills: dict[str, tuple[int, Callable[[], float | None]]] = {}
    if ps and shard is not None:
        kills["paramstore"] = (a.failovers, partial(_kill_paramstore, ps, shard, g))
    if "etcd" in sy.etcd:
        kills["etcd"] = (a.peer_failovers, partial(_kill_etcd, sy.etcd["etcd"]))
    if sy.raw:
        kills["pysyncobj"] = (a.peer_failovers, partial(_kill_raw, sy.raw))
    times: dict[str, list[float | None]] = {k: [] for k in kills}
    for k in range(max((n for n, _ in kills.values()), default=0)):
        for name in rotated(list(kills), k):
            n, kill = kills[name]
            if k >= n:
                continue
            dt = kill()
            times[name].append(dt)
            log(f"  {name} failover {k + 1}: first commit after {dt if dt is not None else float('nan'):.2f} s")
        time.sleep(1.0)  # let the restarted members settle before the next round's kill
    for name, t in times.items():
        res["failover"][name] = summary(t)


# =================================================================== small ==


def small(sy: Systems, res: dict[str, Any]) -> None:
    """1 KB writes, closed loop: for each client count, `reps` rounds of one
    window per system. CPU per committed write: all replicas' /proc CPU."""
    a, log = sy.args, sy.log
    windows: dict[str, Callable[[int], dict[str, Any]]] = {}

    def http(system: Any, job: Any) -> Callable[[int], dict[str, Any]]:
        pids = system.pids()
        return lambda c: closed_loop(job, c, a.seconds, probe=partial(cpu_seconds, pids))

    for label, ps in sy.ps.items():
        windows[label] = http(ps, ps.small_job())
    for label, et in sy.etcd.items():
        windows[label] = http(et, et.small_job())
    if sy.redis:
        windows["redis WAIT 2"] = http(sy.redis, sy.redis.small_job(wait=True))
        if a.redis_plain:
            windows["redis plain"] = http(sy.redis, sy.redis.small_job(wait=False))
    if sy.raw:
        raw = sy.raw

        def raw_window(c: int) -> dict[str, Any]:
            lead = raw.leader()
            return raw.ctl(lead if lead is not None else 0, {"op": "load", "clients": c, "seconds": a.seconds})

        windows["pysyncobj"] = raw_window
    out = res["small"]
    for c in a.clients:
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in windows}
        for r in range(a.reps):
            for label in rotated(list(windows), r):
                runs[label].append(windows[label](c))
        for label, rs in runs.items():
            errs = sum(x["errors"] for x in rs)
            d = out.setdefault(label, {})[str(c)] = {
                "ops_s": summary([x["ops_s"] for x in rs]),
                "p50_ms": summary([x["p50_ms"] for x in rs]),
                "p99_ms": summary([x["p99_ms"] for x in rs]),
                "errors": errs,
                "error_samples": [s for x in rs for s in x.get("error_samples", [])][:3],
            }
            if "probed" in rs[0]:
                d["cpu_us"] = summary([x["probed"] / x["ops"] * 1e6 if x["ops"] else None for x in rs])
            cpu = (d.get("cpu_us") or {}).get("median")
            log(
                f"  {label:18s} {c:3d} clients: {d['ops_s']['median'] or 0:8.0f} ops/s "
                f"p50 {d['p50_ms']['median'] or 0:.1f} ms p99 {d['p99_ms']['median'] or 0:.1f} ms"
                + (f" CPU {cpu:.0f} us/write" if cpu is not None else "")
                + (f"  errors {errs} {d['error_samples']}" if errs else "")
            )


# ==================================================================== pull ==


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def pull(sy: Systems, res: dict[str, Any]) -> None:
    """GET of a 1/16/64 MB value from a follower / replica; pulls do not sync, so
    only the default paramstore and the on-disk etcd are measured."""
    for mb in sy.args.sizes:
        _pull_size(sy, res, mb)


def _pull_size(sy: Systems, res: dict[str, Any], mb: int) -> None:
    a, log = sy.args, sy.log
    v = np.random.default_rng(mb).standard_normal(mb * MB // 4).astype(np.float32)
    name = f"pull{mb}"
    once: dict[str, Callable[[], float]] = {}
    closers: list[Any] = []
    ps = sy.ps.get("paramstore")
    if ps:
        put = ps.put(ps.nodes[0], name, v, {"type": "assign"})
        lead = ps.leader_of(put["shard"])
        live = LiveConn(ps, next(n for n in ps.nodes if n != lead))
        ps.get(live.conn, name, min_version=put["version"])
        once["paramstore"] = lambda ps=ps, live=live: mb / _timed(partial(ps.get, live.alive(name), name))
        closers.append(live)
    et = sy.etcd.get("etcd")
    if et:
        c = BlockingHTTP(*et.client(et.leader()))
        st, body = et.put(c, name, v)
        c.close()
        if st != 200 or b"error" in body:
            res["pull"].setdefault("etcd", {})[str(mb)] = {"median": None, "error": f"{st} {body[:120]!r}"}
        else:
            c = BlockingHTTP(*et.client(et.follower()))
            deadline = time.monotonic() + 10  # the follower has applied it once the value is all there
            while len(et.get(c, name)) < mb * MB * 4 // 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            once["etcd"] = lambda et=et, c=c: mb / _timed(partial(et.get, c, name))
            closers.append(c)
    if sy.redis:
        rc, rep = sy.redis.conn(), sy.redis.conn(sy.redis.PORTS[1])
        rc.call("SET", name, body=v)
        rc.call("WAIT", "2", "0")
        rep.call("GET", name)
        once["redis"] = lambda rep=rep: mb / _timed(partial(rep.call, "GET", name))
        closers += [rc, rep]
    if "loopback" in a.systems:
        once["loopback TCP"] = lambda: loopback_mb_s(mb * MB, 1)[0]
    runs: dict[str, list[float]] = {k: [] for k in once}
    for r in range(a.reps):
        for label in rotated(list(once), r):
            runs[label].append(once[label]())
    for c in closers:
        c.close()
    for label, rs in runs.items():
        res["pull"].setdefault(label, {})[str(mb)] = summary(rs)
        log(f"  {label:14s} pull {mb:3d} MB: {np.median(rs):7.0f} MB/s")


class LiveConn:
    """A keep-alive connection to a replica, reopened if the replica closed it
    while other systems ran (uvicorn closes connections idle for 5 s)."""

    def __init__(self, ps: Paramstore, node: str) -> None:
        self.ps, self.node = ps, node
        self.conn = ps.conn(node)

    def alive(self, name: str) -> BlockingHTTP:
        """The connection, checked with a HEAD of `name` (untimed)."""
        try:
            st, _ = self.conn.request("HEAD", f"/v1/tensors/{name}")
            if st == 200:
                return self.conn
        except OSError:
            pass
        self.conn.close()
        self.conn = self.ps.conn(self.node)
        return self.conn

    def close(self) -> None:
        self.conn.close()


# ==================================================================== push ==


def _paramstore_push(
    ps: Paramstore, name: str, v: np.ndarray, mb: int, closers: list[Any]
) -> Callable[[], dict[str, float]]:
    """One push to the shard leader, timed to its 200 (majority ack) and until
    the version is applied on all 3 replicas (HEAD ?min_version on each); its
    connections go to `closers`."""
    put = ps.put(ps.nodes[0], name, v, {"type": "sgd", "lr": 0.01})
    lead = LiveConn(ps, ps.leader_of(put["shard"]))
    others = {n: LiveConn(ps, n) for n in ps.nodes}
    closers.extend([lead, *others.values()])

    def once() -> dict[str, float]:
        c = lead.alive(name)
        for oc in others.values():
            oc.alive(name)
        t = time.perf_counter()
        st, body = ps.push(c, name, v)
        t_ack = time.perf_counter() - t
        if st != 200:
            raise RuntimeError(f"push {name}: {st} {body!r}")
        ver = json.loads(body)["version"]
        for n, oc in others.items():
            s2, _ = oc.conn.request("HEAD", f"/v1/tensors/{name}?min_version={ver}&timeout=60")
            if s2 != 200:
                raise RuntimeError(f"HEAD {name} on {n}: {s2}")
        return {"all": mb / (time.perf_counter() - t), "ack": mb / t_ack}

    return once


def _etcd_push(et: Etcd, name: str, v: np.ndarray, mb: int) -> Callable[[], float]:
    def once() -> float:
        c = BlockingHTTP(*et.client(et.leader()))
        try:
            t = time.perf_counter()
            st, body = et.put(c, name, v)
            dt = time.perf_counter() - t
        finally:
            c.close()
        if st != 200 or b'"error"' in body or b'"code"' in body:
            raise RuntimeError(f"HTTP {st}: {body[:160].decode(errors='replace')}")
        return mb / dt

    return once


def push(sy: Systems, res: dict[str, Any]) -> None:
    """1/16/64 MB gradient pushes committed on 3 replicas. A system that fails a
    size is not tried again at that size (its error is its result)."""
    for mb in sy.args.sizes:
        _push_size(sy, res, mb)
    if sy.etcd and sy.args.etcd_default_limit:
        etcd_default_limit(sy, res)


def _push_size(sy: Systems, res: dict[str, Any], mb: int) -> None:
    a, log = sy.args, sy.log
    out = res["push"]
    v = np.random.default_rng(mb).standard_normal(mb * MB // 4).astype(np.float32) * 1e-3
    name = f"push{mb}"
    once: dict[str, Callable[[], Any]] = {}
    closers: list[Any] = []
    for label, ps in sy.ps.items():
        once[label] = _paramstore_push(ps, name, v, mb, closers)
    for label, et in sy.etcd.items():
        if label == "etcd" or a.push_etcd_tmpfs:
            once[f"{label} (limit raised)"] = _etcd_push(et, name, v, mb)
    if sy.redis:
        rc = sy.redis.conn()

        def redis_once(rc: Any = rc) -> dict[str, float]:
            t = time.perf_counter()
            rc.call("SET", name, body=v)
            t1 = time.perf_counter()
            n = rc.call("WAIT", "2", "0")
            if n != 2:
                raise RuntimeError(f"WAIT 2 answered {n}")
            return {"all": mb / (time.perf_counter() - t), "ack": mb / (t1 - t)}

        once["redis"] = redis_once
    if sy.raw and mb <= a.raw_push_max_mb:
        raw = sy.raw

        def raw_once() -> float:
            r = raw.ctl(raw.leader() or 0, {"op": "write", "nbytes": mb * MB, "timeout": a.raw_big_timeout})
            if not r["ok"]:
                raise RuntimeError(f"no commit within {a.raw_big_timeout:.0f} s")
            return mb / r["seconds"]

        once["pysyncobj"] = raw_once
    runs: dict[str, list[Any]] = {k: [] for k in once}
    errors: dict[str, str] = {}
    try:
        for r in range(a.reps):
            for label in rotated(list(once), r):
                if label in errors:
                    continue
                try:
                    runs[label].append(once[label]())
                except (RuntimeError, OSError) as e:
                    errors[label] = str(e)
                    log(f"  {label} push {mb} MB: {e}")
    finally:
        for c in closers:
            c.close()
        if sy.redis:
            rc.close()
    for label, rs in runs.items():
        if label in errors and not rs:
            out.setdefault("redis WAIT 2" if label == "redis" else label, {})[str(mb)] = {
                "median": None,
                "error": errors[label],
            }
            continue
        if label in sy.ps:
            out.setdefault(label, {})[str(mb)] = summary([x["all"] for x in rs])
            out.setdefault(f"{label} (majority ack)", {})[str(mb)] = summary([x["ack"] for x in rs])
        elif label == "redis":
            out.setdefault("redis WAIT 2", {})[str(mb)] = summary([x["all"] for x in rs])
            out.setdefault("redis plain", {})[str(mb)] = summary([x["ack"] for x in rs])
        else:
            out.setdefault(label, {})[str(mb)] = summary(rs)
    for label in runs:
        key = {"redis": "redis WAIT 2"}.get(label, label)
        m = (out.get(key) or {}).get(str(mb), {}).get("median")
        if m is not None:
            log(f"  {key:26s} push {mb:3d} MB: {m:6.1f} MB/s")


def etcd_default_limit(sy: Systems, res: dict[str, Any]) -> None:
    """etcd as shipped refuses requests over 1.5 MiB: one attempt per size on a
    fresh tmpfs cluster with the default limit; the refusal is its result."""
    et = Etcd(sy.work, max_request_bytes=None, on_disk=False, name="etcd-default", ports=(12800, 12900))
    sy.log("etcd: 3 members with the default request limit (1.5 MiB), one push per size")
    et.start()
    try:
        for mb in sy.args.sizes:
            v = np.random.default_rng(mb).standard_normal(mb * MB // 4).astype(np.float32)
            try:
                r = summary([_etcd_push(et, f"push{mb}", v, mb)()])
            except RuntimeError as e:
                r = {"median": None, "error": str(e)}
            res["push"].setdefault("etcd (default limit)", {})[str(mb)] = r
    finally:
        et.stop()


def run(sy: Systems, res: dict[str, Any]) -> None:
    """The sections in `args.only`, failover first (short logs)."""
    only = sy.args.only
    for name, fn in (("failover", failover), ("small", small), ("pull", pull), ("push", push)):
        if name not in only:
            continue
        t = time.monotonic()
        if name == "failover":
            fn(sy, res)
        else:
            sy.section(name, partial(fn, sy, res))
        res["section_seconds"][name] = time.monotonic() - t
        sy.log(f"section {name}: {res['section_seconds'][name]:.0f} s")
