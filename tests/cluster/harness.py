"""Real replica processes on loopback, and the damage tests do to them."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from store.config import config_from_mapping, render_toml
from tests.ports import free_range
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]


class Cluster:
    def __init__(
        self,
        tmp: Path,
        replicas: int = 3,
        shards: int = 2,
        raft: dict | None = None,
        limits: dict | None = None,
        hosts: list[str] | None = None,
        launcher: list[str] | None = None,
        http: Any = None,
        base_port: int = 7000,
        env: dict[str, str] | None = None,
        spare_hosts: list[str] | None = None,
        replication: int | None = None,
    ) -> None:
        """`hosts`: one loopback address per node (all share ports from
        `base_port` then); `launcher`: a command prefix (e.g. `ip netns exec
        NS`); `http`: an httpx.Client-like object that can reach the nodes;
        `env`: extra environment for the replica processes; `spare_hosts`:
        addresses of extra nodes (n4, ...) outside the bootstrap membership,
        started with `start_joining`; `replication`: replicas per shard
        (default: every node)."""
        self.tmp = tmp
        self.launcher = launcher or []
        self.env = env or {}
        per_node = shards + 2
        nodes = []
        if hosts:
            b = base_port
            for i, host in enumerate(hosts):
                nodes.append(
                    {
                        "id": f"n{i + 1}",
                        "http": f"{host}:{b}",
                        "raft": f"{host}:{b + 1}",
                        "data": f"{host}:{b + 1 + shards}",
                    }
                )
        else:
            base = free_range(replicas * per_node)
            for i in range(replicas):
                b = base + i * per_node
                nodes.append(
                    {
                        "id": f"n{i + 1}",
                        "http": f"127.0.0.1:{b}",
                        "raft": f"127.0.0.1:{b + 1}",
                        "data": f"127.0.0.1:{b + 1 + shards}",
                    }
                )
        raw: dict[str, Any] = {
            "cluster": {"shards": shards, "replication": replication or len(nodes)},
            "nodes": nodes,
            "auth": {"insecure_no_auth": True},
            "raft": {"password": secrets.token_hex(16), **(raft or {})},  # one secret per cluster
        }
        if limits:
            raw["limits"] = limits
        self.cfg = config_from_mapping(raw)
        self.config_path = tmp / "cluster.toml"
        self.config_path.write_text(render_toml(self.cfg))
        self.ids = [n.id for n in self.cfg.nodes]  # the current members: tests update it
        spares = [
            {
                "id": f"n{len(nodes) + i + 1}",
                "http": f"{h}:{b}",
                "raft": f"{h}:{b + 1}",
                "data": f"{h}:{b + 1 + shards}",
            }
            for i, h in enumerate(spare_hosts or [])
        ]
        self.join_config_path = tmp / "cluster-join.toml"
        self.join_config_path.write_text(render_toml(config_from_mapping(dict(raw, nodes=nodes + spares))))
        self.urls = {n["id"]: f"http://{n['http']}" for n in nodes + spares}
        self.procs: dict[str, subprocess.Popen] = {}
        self.http = http if http is not None else httpx.Client(timeout=10.0)

    # ---- processes ---------------------------------------------------------------
    def start(self, node_id: str | None = None, join: str | None = None) -> None:
        for nid in [node_id] if node_id else self.ids:
            bootstrap = {n.id for n in self.cfg.nodes}
            config = self.join_config_path if join or nid not in bootstrap else self.config_path
            with open(self.tmp / f"{nid}.log", "ab") as log:  # the replica writes to its own copy
                self.procs[nid] = subprocess.Popen(
                    self.launcher
                    + [
                        sys.executable,
                        "-m",
                        "api.cli",
                        "serve",
                        "--config",
                        str(config),
                        "--node",
                        nid,
                        "--data-dir",
                        str(self.tmp / nid),
                    ]
                    + (["--join", join] if join else []),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                    env=dict(os.environ, PYTHONPATH=str(ROOT), **self.env),
                )

    def start_joining(self, nid: str, seed: str) -> None:
        """Start a node outside the membership that joins through `seed`'s URL."""
        self.start(nid, join=self.urls[seed])

    def wait_ready(self, node_ids: list[str] | None = None, timeout: float = 30.0) -> None:
        for nid in node_ids or self.ids:
            wait_until(
                lambda nid=nid: self.http.get(self.urls[nid] + "/readyz", timeout=1).status_code == 200,
                timeout,
                f"{nid} ready (log: {self.tmp / (nid + '.log')})",
            )

    def kill(self, nid: str) -> None:
        p = self.procs.pop(nid)
        p.send_signal(signal.SIGKILL)
        p.wait(10)

    def pause(self, nid: str) -> None:
        self.procs[nid].send_signal(signal.SIGSTOP)

    def resume(self, nid: str) -> None:
        self.procs[nid].send_signal(signal.SIGCONT)

    def restart(self, nid: str, timeout: float = 30.0) -> None:
        self.start(nid)
        self.wait_ready([nid], timeout)

    @contextmanager
    def running(self, timeout: float = 30.0) -> Iterator[Cluster]:
        """Started, and ready within `timeout`, for the `with` block; closed
        after it, whatever happens (a fixture's whole life)."""
        self.start()
        try:
            self.wait_ready(timeout=timeout)
            yield self
        finally:
            self.close()

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        self.http.close()

    def log_tail(self, nid: str, lines: int = 30) -> str:
        path = self.tmp / f"{nid}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    # ---- observing -----------------------------------------------------------------
    def status(self, nid: str) -> dict:
        return self.http.get(self.urls[nid] + "/v1/cluster", timeout=2).json()

    def leader_of(self, shard: int, timeout: float = 15.0, among: list[str] | None = None) -> str:
        """The leader all live (or `among`) replicas agree on, itself one of them."""
        voters = among or list(self.procs)

        def agreed():
            leaders = {self.status(n)["shards"][shard]["leader"] for n in voters}
            leader = leaders.pop() if len(leaders) == 1 else None
            return leader if leader in voters else None

        return wait_until(agreed, timeout, f"one leader for shard {shard}")

    def terms(self, nid: str) -> list[int]:
        return [s["term"] for s in self.status(nid)["shards"]]

    def shard_of(self, name: str) -> int:
        from store.placement import shard_for

        return shard_for(name, self.cfg.shards)

    # ---- tensors -------------------------------------------------------------------
    def put(self, nid: str, name: str, arr: np.ndarray, headers: dict | None = None) -> httpx.Response:
        hdrs = {
            "Content-Type": "application/octet-stream",
            "X-Dtype": str(arr.dtype),
            "X-Shape": ",".join(map(str, arr.shape)),
            **(headers or {}),
        }
        return self.http.put(f"{self.urls[nid]}/v1/tensors/{name}", content=arr.tobytes(), headers=hdrs)

    def grad(self, nid: str, name: str, arr: np.ndarray, headers: dict | None = None) -> httpx.Response:
        hdrs = {
            "Content-Type": "application/octet-stream",
            "X-Dtype": str(arr.dtype),
            "X-Shape": ",".join(map(str, arr.shape)),
            **(headers or {}),
        }
        return self.http.post(f"{self.urls[nid]}/v1/tensors/{name}/grad", content=arr.tobytes(), headers=hdrs)

    def get(self, nid: str, name: str, **params) -> tuple[np.ndarray, int]:
        r = self.http.get(f"{self.urls[nid]}/v1/tensors/{name}", params=params)
        assert r.status_code == 200, (r.status_code, r.text)
        shape = tuple(int(d) for d in r.headers["X-Shape"].split(",") if d)
        return np.frombuffer(r.content, dtype=r.headers["X-Dtype"]).reshape(shape), int(r.headers["X-Version"])

    def digest(self, nid: str, name: str, **params) -> tuple[str, int]:
        r = self.http.head(f"{self.urls[nid]}/v1/tensors/{name}", params={"digest": 1, **params})
        assert r.status_code == 200, r.status_code
        return r.headers["X-Digest"], int(r.headers["X-Version"])


def wait_version_everywhere(cluster: Cluster, name: str, version: int, timeout: float = 20.0) -> None:
    for nid in cluster.procs:
        wait_until(lambda nid=nid: cluster.get(nid, name)[1] >= version, timeout, f"{nid} applied {name} v{version}")
