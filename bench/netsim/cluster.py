"""A paramstore cluster whose replicas run on SimNet hosts: one replica per
host, every address one the harness created, a Raft password and an API
token as any cluster off loopback needs."""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from paramstore import Client
from store.config import config_from_mapping, render_toml

from .net import SimNet

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
HTTP_PORT = 8700
RAFT_PORT = 9700


class SimCluster:
    def __init__(
        self,
        net: SimNet,
        hosts: list[str],
        workdir: Path,
        shards: int = 2,
        replication: int | None = None,
        raft: dict[str, Any] | None = None,
        limits: dict[str, Any] | None = None,
    ) -> None:
        self.net = net
        self.hosts = list(hosts)
        self.workdir = workdir
        self.token = secrets.token_hex(16)
        nodes = [
            {
                "id": h,
                "http": f"{net.addr(h)}:{HTTP_PORT}",
                "raft": f"{net.addr(h)}:{RAFT_PORT}",  # shard k: RAFT_PORT + k
                "data": f"{net.addr(h)}:{RAFT_PORT + shards}",
            }
            for h in self.hosts
        ]
        raw: dict[str, Any] = {
            "cluster": {"shards": shards, "replication": replication or len(nodes)},
            "nodes": nodes,
            "auth": {"write_tokens": [self.token]},
        }
        if limits:
            raw["limits"] = limits
        raw["raft"] = {**(raft or {}), "password": secrets.token_hex(16)}
        self.cfg = config_from_mapping(raw)
        self.config_path = workdir / "cluster.toml"
        self.config_path.touch(0o600)  # it holds the Raft password and the token
        self.config_path.write_text(render_toml(self.cfg))
        self.urls = {h: f"http://{net.addr(h)}:{HTTP_PORT}" for h in self.hosts}

    def start(self) -> None:
        for h in self.hosts:
            log = open(self.workdir / f"{h}.log", "ab")  # noqa: SIM115 (the replica writes to it until stopped)
            self.net.popen(
                h,
                [
                    sys.executable,
                    "-m",
                    "api.cli",
                    "serve",
                    "--config",
                    str(self.config_path),
                    "--node",
                    h,
                    "--data-dir",
                    str(self.workdir / h),
                ],
                stdout=log,
                stderr=log,
                cwd=ROOT,
                env=dict(os.environ, PYTHONPATH=str(ROOT)),
            )
            log.close()

    def wait_ready(self, from_host: str, timeout: float = 60.0) -> None:
        """Every replica answers /readyz 200, asked from `from_host`."""

        def ready() -> None:
            deadline = time.monotonic() + timeout
            with httpx.Client(timeout=2.0) as http:
                for h, url in self.urls.items():
                    while True:
                        try:
                            if http.get(url + "/readyz").status_code == 200:
                                break
                        except httpx.TransportError:
                            pass
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"{h} not ready after {timeout}s: {self.log_tail(h)}")
                        time.sleep(0.1)

        self.net.call(from_host, ready)

    def client(self, first: str | None = None, **kw: Any) -> Client:
        """A client for every replica, `first` (a replica host) tried first; use
        it only inside a host's thread (`with_client`)."""
        urls = sorted(self.urls.values(), key=lambda u: u != self.urls.get(first or ""))
        return Client(urls, token=self.token, **kw)

    def with_client(self, host: str, fn: Callable[[Client], T], first: str | None = None, **kw: Any) -> T:
        """fn(client) in a thread on `host`: its connections leave from that host."""

        def go() -> T:
            with self.client(first, **kw) as c:
                return fn(c)

        return self.net.call(host, go)

    def log_tail(self, host: str, lines: int = 20) -> str:
        path = self.workdir / f"{host}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""
