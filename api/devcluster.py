"""`paramstore dev`: a whole local cluster in the foreground, on loopback."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from store.config import Config, config_from_mapping, render_toml


def dev_config(
    replicas: int, http_port: int, raft_port: int, shards: int, replication: int, secret: str | None = None
) -> dict[str, Any]:
    """A loopback cluster's config mapping; `secret` (the cluster secret, raft.password) is
    generated unless given (nodes that join a running cluster need its secret)."""
    nodes = []
    for i in range(replicas):
        raft_base = raft_port + i * (shards + 2)
        nodes.append(
            {
                "id": f"n{i + 1}",
                "http": f"127.0.0.1:{http_port + i}",
                "raft": f"127.0.0.1:{raft_base}",
                "data": f"127.0.0.1:{raft_base + shards}",
            }
        )
    # Loopback development only: API tokens off (the replicas log a warning). The
    # internal ports are authenticated all the same, by a secret of this cluster's own.
    return {
        "cluster": {"shards": shards, "replication": min(replication, replicas)},
        "nodes": nodes,
        "auth": {"insecure_no_auth": True},
        "raft": {"password": secret or secrets.token_hex(24)},
    }


def run_dev(
    replicas: int,
    http_port: int,
    raft_port: int,
    shards: int,
    replication: int,
    data_dir: Path,
    then: str | None,
    exit_after: bool,
    ready_timeout: float = 60.0,
) -> int:
    cfg = config_from_mapping(dev_config(replicas, http_port, raft_port, shards, replication))
    config_path = _write_config(cfg, data_dir)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    def is_stopping() -> bool:
        return stopping

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    procs = _start_replicas(cfg, config_path, data_dir)
    urls = [n.url for n in cfg.nodes]
    _print_cluster(cfg, replicas, data_dir)
    code = 0
    try:
        if not _wait_ready(urls, procs, ready_timeout, is_stopping):
            print("paramstore dev: cluster did not become ready; see the logs above", file=sys.stderr)
            return 1
        print(f"paramstore dev: ready. Try: curl {urls[0]}/v1/cluster")
        if then:
            code = _run_then(then, urls, is_stopping)
            if exit_after:
                return code
        print("paramstore dev: serving; Ctrl-C stops every replica")
        return code if _serve_until_stopped(procs, is_stopping) else 1
    finally:
        _stop_replicas(procs)


def _write_config(cfg: Config, data_dir: Path) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    config_path = data_dir / "cluster.toml"
    config_path.touch(mode=0o600)  # it holds the cluster secret
    config_path.chmod(0o600)
    config_path.write_text(render_toml(cfg))
    return config_path


def _start_replicas(cfg: Config, config_path: Path, data_dir: Path) -> dict[str, subprocess.Popen[bytes]]:
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for n in cfg.nodes:
        with open(data_dir / f"{n.id}.log", "ab") as log_file:  # the replica keeps its own descriptor
            procs[n.id] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "api.cli",
                    "serve",
                    "--config",
                    str(config_path),
                    "--node",
                    n.id,
                    "--data-dir",
                    str(data_dir / n.id),
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    return procs


def _print_cluster(cfg: Config, replicas: int, data_dir: Path) -> None:
    print(f"paramstore dev: {replicas} replicas, {cfg.shards} shards, replication {cfg.replication}")
    print("paramstore dev: WARNING: API authentication is off (loopback development only)")
    for n in cfg.nodes:
        print(f"  {n.id}  {n.url}   (log: {data_dir / (n.id + '.log')})")


def _run_then(then: str, urls: list[str], stopping: Callable[[], bool]) -> int:
    """Run the --then shell command against the cluster; its exit status."""
    env = dict(os.environ, PARAMSTORE_URLS=",".join(urls))
    print(f"paramstore dev: running {then!r}")
    child = subprocess.Popen(then, shell=True, env=env)
    while child.poll() is None and not stopping():
        time.sleep(0.2)
    if child.poll() is None:
        child.terminate()
    return child.wait()


def _serve_until_stopped(procs: dict[str, subprocess.Popen[bytes]], stopping: Callable[[], bool]) -> bool:
    """False as soon as a replica exits on its own."""
    while not stopping():
        for node_id, p in procs.items():
            if p.poll() is not None:
                print(f"paramstore dev: replica {node_id} exited with {p.returncode}", file=sys.stderr)
                return False
        time.sleep(0.2)
    return True


def _stop_replicas(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    print("paramstore dev: stopping replicas")
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for p in procs.values():
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    print("paramstore dev: stopped")


def _wait_ready(
    urls: list[str], procs: dict[str, subprocess.Popen[bytes]], timeout: float, stopping: Callable[[], bool]
) -> bool:
    deadline = time.monotonic() + timeout
    pending = set(urls)
    with httpx.Client(timeout=1.0) as client:
        while pending and time.monotonic() < deadline and not stopping():
            for p in procs.values():
                if p.poll() is not None:
                    return False
            for url in list(pending):
                try:
                    if client.get(url + "/readyz").status_code == 200:
                        pending.discard(url)
                        print(f"  ready: {url}")
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
    return not pending
