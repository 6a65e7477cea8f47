"""A real 3-replica cluster (`paramstore dev`) on loopback, for the client tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.ports import free_range
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
SHARDS = 2


class DevCluster:
    """`python -m api.cli dev` as a subprocess; it starts and stops the replicas."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        http = free_range(3)
        raft = free_range(3 * (SHARDS + 2))
        while raft <= http + 2 and http <= raft + 3 * (SHARDS + 2):
            raft = free_range(3 * (SHARDS + 2))
        self.urls = [f"http://127.0.0.1:{http + i}" for i in range(3)]
        with open(tmp / "dev.log", "wb") as log:  # the dev process keeps its own descriptor
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "api.cli",
                    "dev",
                    "--replicas",
                    "3",
                    "--shards",
                    str(SHARDS),
                    "--http-port",
                    str(http),
                    "--raft-port",
                    str(raft),
                    "--data-dir",
                    str(tmp / "data"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=dict(os.environ, PYTHONPATH=str(ROOT)),
            )

    def wait_ready(self, timeout: float = 60.0) -> None:
        with httpx.Client(timeout=1.0) as http:
            for url in self.urls:

                def ready(url: str = url) -> bool:
                    assert self.proc.poll() is None, f"dev cluster exited:\n{self.log_text()}"
                    return http.get(url + "/readyz").status_code == 200

                wait_until(ready, timeout, f"{url}/readyz")

    def replica_pids(self) -> list[int]:
        """The replicas are children of the dev process in their own sessions."""
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def close(self) -> None:
        replicas = self.replica_pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the dev runner stops its replicas
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pid in replicas:  # only if the runner could not stop them itself
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def log_text(self) -> str:
        return (self.tmp / "dev.log").read_text(errors="replace")
