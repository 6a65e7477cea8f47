"""Start, drive and tear down every system the harness compares, on 127.0.0.1
ports 11000-19999:

    paramstore  http 11000-11002, raft/data 11100-11117
    paramstore-nofsync (the variant, up at the same time) http 11500-11502, raft/data 11600-11617
    etcd        client 12000-12002, peer 12100-12102   (data dir on the disk paramstore writes to)
    etcd-tmpfs  client 12500-12502, peer 12600-12602   (data on /dev/shm: fsync is free)
    redis       13000 (primary), 13001-13002 (replicas)
    pysyncobj   raft 14000-14002, control 14100-14102
    tables      http 15000-15003, raft/data 15100-15123 (bench/tables.py)
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from .load import BlockingHTTP, BlockingRESP, Job, http_request, resp_command

ROOT = Path(__file__).resolve().parents[1]
# A/B runs of a patched copy: BENCH_PARAMSTORE_ROOT=/tmp/copy BENCH_EXTRA_PATH=/tmp/extra-site
PS_ROOT = Path(os.environ.get("BENCH_PARAMSTORE_ROOT", ROOT))
PS_PATH = os.pathsep.join(p for p in (str(PS_ROOT), os.environ.get("BENCH_EXTRA_PATH", "")) if p)
HOST = "127.0.0.1"


def cpu_seconds(pids) -> float:
    """utime + stime (every thread) of the processes `pids`, summed, in seconds."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def rss_peak_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set since it started."""
    return proc_status_mb(pid, "VmHWM")


def rss_mb(pid: int) -> float:
    """VmRSS: the process's resident set now."""
    return proc_status_mb(pid, "VmRSS")


def proc_status_mb(pid: int, field: str) -> float:
    """A kB field of /proc/<pid>/status, in MB (NaN if absent)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


def _kill(p: subprocess.Popen | None, sig=signal.SIGTERM, wait: float = 15) -> None:
    if p is None or p.poll() is not None:
        return
    p.send_signal(sig)
    try:
        p.wait(wait)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def raw_headers(arr: np.ndarray) -> dict:
    return {
        "Content-Type": "application/octet-stream",
        "X-Dtype": str(arr.dtype),
        "X-Shape": ",".join(map(str, arr.shape)),
    }


# =================================================================== paramstore


class Paramstore:
    name = "paramstore"
    HTTP, RAFT = 11000, 11100

    def __init__(
        self,
        workdir: Path,
        replicas: int = 3,
        shards: int = 4,
        name: str = "paramstore",
        env: dict | None = None,
        ports: tuple[int, int] | None = None,
    ):
        """`name`, `env`: a variant of the defaults (e.g. "paramstore-nofsync"
        with PARAMSTORE_RAFT__FSYNC=false); `ports`: (first HTTP, first Raft) port
        instead of the class's, so that a variant can run beside the defaults."""
        from api.devcluster import dev_config
        from store.config import config_from_mapping, render_toml

        if ports:
            self.HTTP, self.RAFT = ports
        self.name = name
        self.env = env or {}
        self.dir = workdir / name
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.cfg = config_from_mapping(dev_config(replicas, self.HTTP, self.RAFT, shards, 3))
        self.config_path = self.dir / "cluster.toml"
        self.config_path.write_text(render_toml(self.cfg))
        self.nodes = [n.id for n in self.cfg.nodes]
        self.urls = {n.id: (n.http.host, n.http.port) for n in self.cfg.nodes}
        self.procs: dict[str, subprocess.Popen] = {}

    # -- processes
    def start_node(
        self,
        node: str,
        config: Path | None = None,
        extra: tuple[str, ...] = (),
        log_level: str = "warning",
        fresh_log: bool = False,
    ) -> float:
        env = dict(os.environ, PYTHONPATH=PS_PATH, **self.env)
        with open(self.dir / f"{node}.log", "wb" if fresh_log else "ab") as log:
            self.procs[node] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "api.cli",
                    "serve",
                    "--config",
                    str(config or self.config_path),
                    "--node",
                    node,
                    "--data-dir",
                    str(self.dir / node),
                    "--log-level",
                    log_level,
                    *extra,
                ],
                cwd=PS_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return time.monotonic()

    def start(self) -> None:
        for n in self.nodes:
            self.start_node(n)
        self.wait_ready(self.nodes)

    def wait_ready(self, nodes, timeout: float = 300) -> float:
        deadline = time.monotonic() + timeout
        pending = list(nodes)
        while pending:
            if time.monotonic() > deadline:
                raise RuntimeError(f"paramstore {pending} not ready after {timeout}s (logs in {self.dir})")
            for n in list(pending):
                if self.procs[n].poll() is not None:
                    raise RuntimeError(f"paramstore {n} exited {self.procs[n].returncode}; see {self.dir}/{n}.log")
                try:
                    c = BlockingHTTP(*self.urls[n], timeout=2)
                    st, _ = c.request("GET", "/readyz")
                    c.close()
                    if st == 200:
                        pending.remove(n)
                except OSError:
                    pass
            if pending:
                time.sleep(0.05)
        return time.monotonic()

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            _kill(p)

    def kill(self, node: str) -> None:
        _kill(self.procs[node], signal.SIGKILL)

    def pid(self, node: str) -> int:
        return self.procs[node].pid

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    # -- operations
    def conn(self, node: str | None = None) -> BlockingHTTP:
        return BlockingHTTP(*self.urls[node or self.nodes[0]])

    def status(self, node: str) -> dict:
        c = BlockingHTTP(*self.urls[node], timeout=5)
        try:
            _, body = c.request("GET", "/v1/cluster")
            return json.loads(bytes(body))
        finally:
            c.close()

    def terms(self) -> int:
        """Sum over shards of the highest term any live replica reports."""
        best: dict[int, int] = {}
        for n in self.nodes:
            if self.procs[n].poll() is not None:
                continue
            try:
                for s in self.status(n)["shards"]:
                    best[s["shard"]] = max(best.get(s["shard"], 0), s.get("term") or 0)
            except (OSError, ValueError):
                pass
        return sum(best.values())

    def leader_of(self, shard: int) -> str | None:
        for n in self.nodes:
            if self.procs[n].poll() is None:
                try:
                    leader = self.status(n)["shards"][shard].get("leader")
                    if leader:
                        return leader
                except (OSError, ValueError):
                    pass
        return None

    def put(self, node: str, name: str, arr: np.ndarray, optimizer: dict, conn=None) -> dict:
        c = conn or self.conn(node)
        st, body = c.request(
            "PUT", f"/v1/tensors/{name}", {**raw_headers(arr), "X-Optimizer": json.dumps(optimizer)}, arr
        )
        if st not in (200, 201):
            raise RuntimeError(f"PUT {name}: {st} {bytes(body)[:300]!r}")
        return json.loads(bytes(body))

    def push(self, conn: BlockingHTTP, name: str, arr: np.ndarray) -> tuple[int, bytes]:
        st, body = conn.request("POST", f"/v1/tensors/{name}/grad", raw_headers(arr), arr)
        return st, bytes(body[:300])

    def get(self, conn: BlockingHTTP, name: str, min_version: int | None = None) -> memoryview:
        q = f"?min_version={min_version}" if min_version else ""
        st, body = conn.request("GET", f"/v1/tensors/{name}{q}")
        if st != 200:
            raise RuntimeError(f"GET {name}: {st} {bytes(body)[:300]!r}")
        return body

    def small_job(self, nbytes: int = 1024) -> Job:
        g = np.ones(nbytes // 4, np.float32)
        self.put(self.nodes[0], "small", g, {"type": "sgd", "lr": 0.001})
        hdr = raw_headers(g)
        targets = [self.urls[n] for n in self.nodes]
        reqs = [http_request("POST", "/v1/tensors/small/grad", f"{h}:{p}", hdr, g.tobytes()) for h, p in targets]
        return Job("http", targets, reqs)


# ========================================================================= etcd


class Etcd:
    name = "etcd"
    CLIENT, PEER = 12000, 12100

    def __init__(
        self,
        workdir: Path,
        max_request_bytes: int | None = None,
        members: int = 3,
        on_disk: bool = True,
        name: str = "etcd",
        ports: tuple[int, int] | None = None,
    ):
        """`on_disk`: the data dir under `workdir`, the disk paramstore's replicas
        write to, so that etcd's fsync per commit costs what paramstore's does;
        otherwise on /dev/shm (tmpfs: fsync is free). `ports`: (client, peer)."""
        if ports:
            self.CLIENT, self.PEER = ports
        self.name = name
        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else workdir
        self.dir = (workdir if on_disk else shm) / f"paramstore-bench-{name}-{os.getpid()}"
        self.logdir = workdir / name
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.max_request_bytes = max_request_bytes
        self.members = [f"m{i}" for i in range(members)]
        self.procs: dict[str, subprocess.Popen] = {}
        self.ids: dict[str, str] = {}

    def client(self, m: str) -> tuple[str, int]:
        return HOST, self.CLIENT + self.members.index(m)

    def start_node(self, m: str, new: bool) -> None:
        i = self.members.index(m)
        cluster = ",".join(f"{x}=http://{HOST}:{self.PEER + j}" for j, x in enumerate(self.members))
        cmd = [
            "etcd",
            "--name",
            m,
            "--data-dir",
            str(self.dir / m),
            "--listen-client-urls",
            f"http://{HOST}:{self.CLIENT + i}",
            "--advertise-client-urls",
            f"http://{HOST}:{self.CLIENT + i}",
            "--listen-peer-urls",
            f"http://{HOST}:{self.PEER + i}",
            "--initial-advertise-peer-urls",
            f"http://{HOST}:{self.PEER + i}",
            "--initial-cluster",
            cluster,
            "--initial-cluster-token",
            "paramstore-bench",
            "--initial-cluster-state",
            "new" if new else "existing",
            "--quota-backend-bytes",
            str(8 << 30),
            "--logger",
            "zap",
            "--log-level",
            "warn",
        ]
        if self.max_request_bytes:
            cmd += ["--max-request-bytes", str(self.max_request_bytes)]
        with open(self.logdir / f"{m}.log", "ab") as log:
            self.procs[m] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        for m in self.members:
            self.start_node(m, new=True)
        self.wait_healthy(self.members)
        for m in self.members:
            self.ids[m] = self.status(m)["header"]["member_id"]

    def wait_healthy(self, members, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        pending = list(members)
        while pending:
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd {pending} not healthy after {timeout}s (logs in {self.logdir})")
            for m in list(pending):
                try:
                    c = BlockingHTTP(*self.client(m), timeout=2)
                    st, body = c.request("GET", "/health")
                    c.close()
                    if st == 200 and b'"true"' in bytes(body):
                        pending.remove(m)
                except OSError:
                    pass
            if pending:
                time.sleep(0.05)
        return time.monotonic()

    def stop(self) -> None:
        for p in self.procs.values():
            _kill(p)
        shutil.rmtree(self.dir, ignore_errors=True)

    def kill(self, m: str) -> None:
        _kill(self.procs[m], signal.SIGKILL)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    def call(self, conn: BlockingHTTP, path: str, obj: dict) -> tuple[int, dict | bytes]:
        st, body = conn.request("POST", path, {"Content-Type": "application/json"}, json.dumps(obj).encode())
        try:
            return st, json.loads(bytes(body))
        except ValueError:
            return st, bytes(body[:300])

    def status(self, m: str) -> dict:
        c = BlockingHTTP(*self.client(m), timeout=5)
        try:
            return self.call(c, "/v3/maintenance/status", {})[1]
        finally:
            c.close()

    def terms(self) -> int:
        best = 0
        for m in self.members:
            if self.procs[m].poll() is None:
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    best = max(best, int(self.status(m).get("raftTerm", 0)))
        return best

    def leader(self) -> str | None:
        for m in self.members:
            if self.procs[m].poll() is None:
                try:
                    lid = self.status(m).get("leader")
                    for x, i in self.ids.items():
                        if i == lid:
                            return x
                except (OSError, ValueError, AttributeError):
                    pass
        return None

    def follower(self) -> str:
        lead = self.leader()
        return next(m for m in self.members if m != lead)

    @staticmethod
    def put_body(key: str, value) -> bytes:
        return json.dumps(
            {"key": base64.b64encode(key.encode()).decode(), "value": base64.b64encode(value).decode()}
        ).encode()

    def put(self, conn: BlockingHTTP, key: str, value) -> tuple[int, bytes]:
        st, body = conn.request("POST", "/v3/kv/put", {"Content-Type": "application/json"}, self.put_body(key, value))
        return st, bytes(body[:300])

    def get(self, conn: BlockingHTTP, key: str) -> memoryview:
        """Serializable range from this member (local read, like paramstore's default GET)."""
        q = json.dumps({"key": base64.b64encode(key.encode()).decode(), "serializable": True}).encode()
        st, body = conn.request("POST", "/v3/kv/range", {"Content-Type": "application/json"}, q)
        if st != 200:
            raise RuntimeError(f"etcd range {key}: {st} {bytes(body[:300])!r}")
        return body

    def small_job(self, nbytes: int = 1024) -> Job:
        body = self.put_body("small", np.ones(nbytes // 4, np.float32).tobytes())
        targets = [self.client(m) for m in self.members]
        reqs = [
            http_request("POST", "/v3/kv/put", f"{h}:{p}", {"Content-Type": "application/json"}, body)
            for h, p in targets
        ]
        return Job("http", targets, reqs)


# ======================================================================== redis


class Redis:
    name = "redis"
    PORTS = (13000, 13001, 13002)

    def __init__(self, workdir: Path):
        self.dir = workdir / "redis"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.procs: dict[int, subprocess.Popen] = {}

    def start_node(self, port: int) -> None:
        d = self.dir / str(port)
        d.mkdir(exist_ok=True)
        cmd = [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            HOST,
            "--dir",
            str(d),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--client-output-buffer-limit",
            "replica 0 0 0",
            "--repl-diskless-sync",
            "yes",
            "--repl-diskless-sync-delay",
            "0",
            "--repl-diskless-load",
            "on-empty-db",
            "--logfile",
            str(self.dir / f"{port}.log"),
        ]
        if port != self.PORTS[0]:
            cmd += ["--replicaof", HOST, str(self.PORTS[0])]
        self.procs[port] = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
        _wait_port(port)

    def start(self) -> None:
        for p in self.PORTS:
            self.start_node(p)
        for p in self.PORTS[1:]:
            self.wait_synced(p)

    def info(self, port: int) -> dict:
        c = BlockingRESP(HOST, port, timeout=5)
        try:
            text = bytes(c.call("INFO", "replication")).decode()
        finally:
            c.close()
        return dict(ln.split(":", 1) for ln in text.splitlines() if ":" in ln)

    def wait_synced(self, port: int, timeout: float = 300) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.info(port).get("master_link_status") == "up":
                    return time.monotonic()
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"redis replica {port} not in sync after {timeout}s")

    def stop(self) -> None:
        for p in self.procs.values():
            _kill(p)

    def kill(self, port: int) -> None:
        _kill(self.procs[port], signal.SIGKILL)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    def conn(self, port: int | None = None) -> BlockingRESP:
        return BlockingRESP(HOST, port or self.PORTS[0])

    def small_job(self, nbytes: int = 1024, wait: bool = True) -> Job:
        v = np.ones(nbytes // 4, np.float32).tobytes()
        req = resp_command("SET", "small", v)
        if wait:
            req += resp_command("WAIT", "2", "0")
        return Job("resp", [(HOST, self.PORTS[0])], [req], replies=2 if wait else 1, check=b"2" if wait else None)


# ================================================================ raw pysyncobj


class RawSyncObj:
    name = "pysyncobj"
    RAFT, CTL = 14000, 14100

    def __init__(self, workdir: Path, members: int = 3):
        self.dir = workdir / "pysyncobj"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.n = members
        self.procs: dict[int, subprocess.Popen] = {}

    def start_node(self, i: int) -> None:
        me = f"{HOST}:{self.RAFT + i}"
        peers = ",".join(f"{HOST}:{self.RAFT + j}" for j in range(self.n) if j != i)
        d = self.dir / str(i)
        d.mkdir(exist_ok=True)
        with open(self.dir / f"{i}.log", "ab") as log:
            self.procs[i] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.rawpeer",
                    "--self",
                    me,
                    "--peers",
                    peers,
                    "--ctl",
                    str(self.CTL + i),
                    "--dir",
                    str(d),
                    *(["--pipeline-fix"] if os.environ.get("BENCH_RAW_PIPELINE_FIX") else []),
                ],
                cwd=ROOT,
                env=dict(os.environ, PYTHONPATH=str(ROOT)),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start(self) -> None:
        for i in range(self.n):
            self.start_node(i)
        self.wait_ready(range(self.n))

    def wait_ready(self, members, timeout: float = 300) -> float:
        deadline = time.monotonic() + timeout
        for i in members:
            _wait_port(self.CTL + i, timeout)
            while not self.ctl(i, {"op": "status"}).get("ready"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pysyncobj member {i} not ready")
                time.sleep(0.05)
        return time.monotonic()

    def ctl(self, i: int, req: dict, timeout: float = 600) -> dict:
        with socket.create_connection((HOST, self.CTL + i), timeout=timeout) as s:
            s.sendall((json.dumps(req) + "\n").encode())
            f = s.makefile("rb")
            return json.loads(f.readline())

    def stop(self) -> None:
        for p in self.procs.values():
            _kill(p, wait=5)

    def kill(self, i: int) -> None:
        _kill(self.procs[i], signal.SIGKILL)

    def live(self):
        return [i for i in range(self.n) if self.procs[i].poll() is None]

    def leader(self) -> int | None:
        for i in self.live():
            try:
                if self.ctl(i, {"op": "status"}, 5).get("is_leader"):
                    return i
            except OSError:
                pass
        return None

    def terms(self) -> int:
        best = 0
        for i in self.live():
            with contextlib.suppress(OSError):
                best = max(best, self.ctl(i, {"op": "status"}, 5)["term"])
        return best


def rid() -> str:
    return uuid.uuid4().hex
