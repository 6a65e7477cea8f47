"""Embedding tables (issue 12) side by side with Redis and an in-process numpy
gather, in one run: `python -m bench --only tables` (part of `make bench`).

One 3-replica paramstore cluster and one Redis primary + 2 replicas holding
the same rows, one key per row. The measured repetitions of the two systems
alternate, so a load change on the machine hits both alike. Two phases:

1. In RAM, as Redis: the replicas' table memory cap (limits.table_cache_bytes)
   holds the table (`--table-fit-cap-mb`, by default sized from the rows).
   - lookup of 4,096 distinct IDs x dim 64 float32 on a replica (local reads;
     the node leads the fewest shards) vs Redis pipelined MGET on a replica
     vs numpy fancy indexing of the same rows (the limit);
   - push of 4,096-row gradients with rowwise_adagrad, until applied on all
     3 replicas, vs Redis pipelined SET of the same bytes + WAIT 2.
2. Larger than the cap: the replicas restart with `--table-cap-mb` (the
   table about 2x that) and the lookups and pushes run again; peak RSS of
   every replica since the restart against the cap (goal: cap + 300 MB).

Then a fourth replica joins: the tables reach it over the data path (s/GB,
extra RSS on the sources while they send, elections).
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from paramstore._wire import safetensors_body

from .join import JoiningParamstore
from .load import BlockingHTTP, BlockingRESP, resp_command
from .systems import Redis, rss_mb, rss_peak_mb

MB = 1 << 20
DIM = 64
BATCH = 4096
FILL_CHUNK = 65536


def read_rows(body: memoryview) -> np.ndarray:
    n = int.from_bytes(body[:8], "little")
    meta = json.loads(bytes(body[8 : 8 + n]))["rows"]
    a, b = meta["data_offsets"]
    return np.frombuffer(body[8 + n + a : 8 + n + b], np.float32).reshape(meta["shape"])


def mget_rows(conn: BlockingRESP, command: bytes) -> np.ndarray:
    """Redis's best case on the client side: every value is one row of
    DIM float32, so the MGET reply has a fixed size and is cut with numpy
    (no per-value parsing in Python)."""
    conn.send(command)
    head = b"*%d\r\n" % BATCH
    item = len(b"$%d\r\n" % (DIM * 4)) + DIM * 4 + 2
    body = np.frombuffer(conn.readinto(len(head) + BATCH * item), np.uint8)[len(head) :].reshape(BATCH, item)
    if bytes(body[0, : item - DIM * 4 - 2]) != b"$%d\r\n" % (DIM * 4):
        raise RuntimeError("redis MGET: a value is missing or not one row")
    start = item - DIM * 4 - 2
    return body[:, start : start + DIM * 4].copy().view(np.float32)


def set_replies(conn: BlockingRESP) -> int:
    """BATCH '+OK' replies then WAIT's integer, read in one go."""
    oks = bytes(conn.readinto(5 * BATCH))
    if oks != b"+OK\r\n" * BATCH:
        raise RuntimeError(f"redis SET: {oks[:80]!r}")
    return int(conn.reply())


def fit_cap_mb(rows: int) -> int:
    """A table memory cap that holds a table of `rows` in its row caches
    (90% of the cap; ~400 bytes a 264-byte record takes there, growth
    slack included) with room for the push table and the block cache."""
    return int(rows * 560 / MB) + 64


class TableCluster(JoiningParamstore):
    """3 replicas (+ n4 to join later) with a table cache of `cap_mb`."""

    PORTS = 15000  # HTTP 15000-15003, Raft/data 15100-15123: apart from the other benches' clusters

    def __init__(self, workdir: Path, cap_mb: int) -> None:
        super().__init__(workdir, spares=1, ports=self.PORTS)
        self.set_cap(cap_mb)

    def set_cap(self, cap_mb: int) -> None:
        """The table memory cap of the replicas started from now on."""
        from api.devcluster import dev_config
        from store.config import config_from_mapping, render_toml

        limits = {"table_cache_bytes": cap_mb * MB, "max_body_bytes": 1 << 30}
        for n, path in ((3, self.config_path), (4, self.join_config)):
            m = dev_config(n, self.HTTP, self.RAFT, 4, 3, self.cfg.raft.password)
            m["limits"] = limits
            path.write_text(render_toml(config_from_mapping(m)))

    def restart(self) -> None:
        self.stop()
        self.procs.clear()
        self.start()

    def table_request(self, conn: BlockingHTTP, name: str, op: str, body: bytes) -> memoryview:
        st, out = conn.request(
            "POST",
            f"/v1/tables/{name}:{op}",
            {"Content-Type": "application/x-safetensors", "Accept": "application/x-safetensors"},
            body,
        )
        if st != 200:
            raise RuntimeError(f"{op} {name}: {st} {bytes(out)[:300]!r}")
        return out

    def create(self, name: str, optimizer: dict) -> None:
        c = self.conn(self.nodes[0])
        spec = {"dim": DIM, "optimizer": optimizer}  # zeros: sgd with lr 1 on -rows stores rows exactly
        st, body = c.request(
            "PUT", f"/v1/tables/{name}", {"Content-Type": "application/json"}, json.dumps(spec).encode()
        )
        c.close()
        if st not in (200, 201):
            raise RuntimeError(f"create {name}: {st} {bytes(body)[:300]!r}")

    def wait_applied(self, conns: list[BlockingHTTP], name: str, want: dict[int, int]) -> None:
        """Every replica has applied each shard part's version in `want`: a
        one-ID lookup with min_version, which the replica holds until then."""
        query = ",".join(f"{s}:{v}" for s, v in sorted(want.items()))
        one = safetensors_body({"ids": np.zeros(1, np.int64)})
        for c in conns:
            st, body = c.request(
                "POST",
                f"/v1/tables/{name}:lookup?min_version={query}&timeout=60",
                {"Content-Type": "application/x-safetensors"},
                one,
            )
            if st != 200:
                raise RuntimeError(f"lookup {name} min_version={query}: {st} {bytes(body)[:300]!r}")


def lookup_rates(ps: TableCluster, rd: Redis, rows: np.ndarray, n: int, reps: int, log) -> dict:
    st = ps.status(ps.nodes[0])
    leads = [s.get("leader") for s in st["shards"]]
    node = min(ps.nodes, key=lambda x: leads.count(x))
    conn = ps.conn(node)
    rep = rd.conn(rd.PORTS[1])
    rng = np.random.default_rng(7)
    out: dict[str, list[float]] = {"paramstore": [], "redis": [], "numpy": []}
    for i in range(reps + 1):  # the first round warms connections and caches up and is not counted
        ids = rng.choice(n, BATCH, replace=False).astype(np.int64)
        body = safetensors_body({"ids": ids})
        t = time.perf_counter()
        got = read_rows(ps.table_request(conn, "emb", "lookup", body))
        t_ps = time.perf_counter() - t
        mget = resp_command("MGET", *[b"e:%d" % k for k in ids])
        t = time.perf_counter()
        vals = mget_rows(rep, mget)
        t_rd = time.perf_counter() - t
        t = time.perf_counter()
        ref = rows[ids]
        t_np = time.perf_counter() - t
        if i == 0:
            if not (np.array_equal(got, ref) and np.array_equal(vals, ref)):
                raise RuntimeError("lookup: rows differ from what was stored")
            continue
        out["paramstore"].append(BATCH / t_ps)
        out["redis"].append(BATCH / t_rd)
        out["numpy"].append(BATCH / t_np)
    conn.close()
    rep.close()
    med = {k: float(np.median(v)) for k, v in out.items()}
    log(
        f"  lookup 4096 x {DIM} from {n:,} rows on {node}: paramstore {med['paramstore']:,.0f} rows/s, "
        f"redis MGET {med['redis']:,.0f}, numpy gather {med['numpy']:,.0f}"
    )
    return {"node": node, "rows_s": {k: {"median": med[k], "runs": v} for k, v in out.items()}}


def push_rates(ps: TableCluster, rd: Redis, n: int, reps: int, log) -> dict:
    c = ps.conn(ps.nodes[0])
    listed = json.loads(bytes(c.request("GET", "/v1/tables")[1]))
    c.close()
    if "emb_ra" not in {t["name"] for t in listed}:  # the second phase pushes to the same table
        ps.create("emb_ra", {"type": "rowwise_adagrad", "lr": 0.01})
    lead = ps.conn(ps.nodes[0])
    others = [ps.conn(n) for n in ps.nodes]
    rc = rd.conn()
    rng = np.random.default_rng(11)
    out: dict[str, list[float]] = {"paramstore": [], "paramstore (majority ack)": [], "redis": []}
    for i in range(reps + 1):
        ids = rng.choice(n, BATCH, replace=False).astype(np.int64)
        grads = rng.standard_normal((BATCH, DIM), dtype=np.float32)
        body = safetensors_body({"ids": ids, "grads": grads})
        t = time.perf_counter()
        res = json.loads(bytes(ps.table_request(lead, "emb_ra", "push", body)))
        t_ack = time.perf_counter() - t
        want = {int(s): int(r["version"]) for s, r in res["shards"].items()}
        ps.wait_applied(others, "emb_ra", want)  # applied on all 3 replicas
        t_all = time.perf_counter() - t
        pipe = b"".join(resp_command("SET", b"g:%d" % k, grads[j].tobytes()) for j, k in enumerate(ids))
        pipe += resp_command("WAIT", "2", "0")
        t = time.perf_counter()
        rc.send(pipe)
        acked = set_replies(rc)
        t_rd = time.perf_counter() - t
        if acked != 2:
            raise RuntimeError(f"redis WAIT 2 answered {acked}")
        if i == 0:
            continue
        out["paramstore"].append(BATCH / t_all)
        out["paramstore (majority ack)"].append(BATCH / t_ack)
        out["redis"].append(BATCH / t_rd)
    for c in [lead, *others]:
        c.close()
    rc.close()
    med = {k: float(np.median(v)) for k, v in out.items()}
    log(
        f"  push 4096 x {DIM} rowwise_adagrad: paramstore {med['paramstore']:,.0f} rows/s on 3 replicas "
        f"({med['paramstore (majority ack)']:,.0f} acked), redis SET+WAIT 2 {med['redis']:,.0f}"
    )
    return {"rows_s": {k: {"median": med[k], "runs": v} for k, v in out.items()}}


def join_snapshot(ps: TableCluster, log) -> dict:
    """n4 joins: every shard's tables reach it over the data path."""
    sources = {n: ps.pid(n) for n in ps.nodes}
    before = {n: rss_mb(p) for n, p in sources.items()}
    peak = dict(before)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for n, p in sources.items():
                peak[n] = max(peak[n], rss_mb(p))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    terms = ps.terms()
    t0 = ps.start_joining("n4", seed="n2")
    t1 = ps.wait_ready(["n4"], timeout=1800)
    stop.set()
    sampler.join()
    elections = ps.terms() - terms
    text = (ps.dir / "n4.log").read_text()
    table_bytes = sum(int(b) for b in re.findall(r"tables from n\d+, (\d+) bytes", text))
    stamps = [json.loads(ln) for ln in text.splitlines() if ln.startswith("{")]
    snaps = [d["ts"] for d in stamps if "snapshots downloaded" in d.get("msg", "")]
    tabs = [d["ts"] for d in stamps if "tables from" in d.get("msg", "")]
    transfer_s = max(tabs) - snaps[-1] if snaps and tabs else None
    gb = table_bytes / (1 << 30)
    extra = max(peak[n] - before[n] for n in sources)
    joiner = rss_peak_mb(ps.pid("n4"))
    r = {
        "table_gb": gb,
        "ready_s": t1 - t0,
        "tables_transfer_s": transfer_s,
        "s_per_gb": transfer_s / gb if gb and transfer_s is not None else None,
        "source_extra_rss_mb": extra,
        "extra_ratio": extra / (table_bytes / MB) if table_bytes else None,
        "joiner_peak_rss_mb": joiner,
        "elections": elections,
    }
    log(
        f"  join: {gb:.2f} GB of tables in {transfer_s or 0:.1f} s ({r['s_per_gb'] or 0:.1f} s/GB), ready "
        f"{t1 - t0:.1f} s after start, "
        f"sources' RSS +{extra:.0f} MB at most, joiner peak {joiner:.0f} MB, {elections} election(s)"
    )
    return r


def run_tables(args, res: dict, el, work: Path, log) -> None:
    n, cap = args.table_rows, args.table_cap_mb
    fit = getattr(args, "table_fit_cap_mb", 0) or fit_cap_mb(n)
    ps = TableCluster(work, fit)
    rd = Redis(work)
    log(f"tables: 3 paramstore replicas (table memory cap {fit} MB: holds the table) + redis primary and 2 replicas")
    ps.start()
    rd.start()
    out: dict[str, Any] = {"rows": n, "dim": DIM, "cap_mb": cap, "fit_cap_mb": fit}
    res["tables"] = out
    try:
        ps.create("emb", {"type": "sgd", "lr": 1.0})
        rows = np.random.default_rng(5).uniform(-1, 1, (n, DIM)).astype(np.float32)
        conn = ps.conn(ps.nodes[0])
        t = time.perf_counter()
        for s in range(0, n, FILL_CHUNK):
            ids = np.arange(s, min(n, s + FILL_CHUNK), dtype=np.int64)
            ps.table_request(conn, "emb", "push", safetensors_body({"ids": ids, "grads": -rows[ids]}))
        out["fill_s"] = time.perf_counter() - t
        conn.close()
        log(f"  paramstore filled {n:,} rows in {out['fill_s']:.1f} s ({n / out['fill_s']:,.0f} rows/s)")
        rc = rd.conn()
        t = time.perf_counter()
        for s in range(0, n, FILL_CHUNK):
            pipe = b"".join(
                resp_command("SET", b"e:%d" % k, rows[k].tobytes()) for k in range(s, min(n, s + FILL_CHUNK))
            )
            rc.send(pipe)
            k = min(n, s + FILL_CHUNK) - s
            if bytes(rc.readinto(5 * k)) != b"+OK\r\n" * k:
                raise RuntimeError("redis fill: a SET failed")
        rc.call("WAIT", "2", "0")
        rc.close()
        out["redis_fill_s"] = time.perf_counter() - t
        log(f"  redis filled {n:,} rows in {out['redis_fill_s']:.1f} s")
        out["lookup"] = el.run(ps, "tables lookup", lambda: lookup_rates(ps, rd, rows, n, args.reps * 5, log))
        out["push"] = el.run(ps, "tables push", lambda: push_rates(ps, rd, n, args.reps * 5, log))
        info = json.loads(bytes(ps.conn(ps.nodes[0]).request("GET", "/v1/tables/emb")[1]))
        out["bytes_on_disk"] = info.get("bytes_on_disk")
        out["bytes_in_memory"] = info.get("bytes_in_memory")
        out["peak_rss_mb"] = {node: rss_peak_mb(ps.pid(node)) for node in ps.nodes}
        log(
            f"  table on disk {(out['bytes_on_disk'] or 0) / MB:.0f} MB, in memory "
            f"{(out['bytes_in_memory'] or 0) / MB:.0f} MB per replica (all shards), cap {fit} MB; "
            f"peak RSS {out['peak_rss_mb']} (cap + 300 = {fit + 300} MB)"
        )
        ps.set_cap(cap)
        ps.restart()
        log(f"  replicas restarted with a table memory cap of {cap} MB")
        small: dict[str, Any] = {"cap_mb": cap}
        out["over_cap"] = small
        small["lookup"] = el.run(
            ps, "tables lookup over cap", lambda: lookup_rates(ps, rd, rows, n, args.reps * 5, log)
        )
        small["push"] = el.run(ps, "tables push over cap", lambda: push_rates(ps, rd, n, args.reps * 5, log))
        small["peak_rss_mb"] = {node: rss_peak_mb(ps.pid(node)) for node in ps.nodes}
        log(f"  over the cap: peak RSS since the restart {small['peak_rss_mb']} (goal <= {cap + 300} MB)")
        rd.stop()
        if not args.table_no_join:
            out["join"] = join_snapshot(ps, log)
    finally:
        rd.stop()
        ps.stop()
        log("tables: stopped")
