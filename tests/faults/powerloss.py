"""Mount tests/faults/powerloss_fs.py over each replica's data dir and cut power."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]


def fuse_unavailable() -> str | None:
    """Why a FUSE mount cannot work here, or None. Where the fault suite is
    forced to run for real (PARAMSTORE_FAULTS=netns, as CI does), a reason is
    a failure, not a skip."""
    why = _why_no_fuse()
    if why and os.environ.get("PARAMSTORE_FAULTS") == "netns":
        raise AssertionError(f"PARAMSTORE_FAULTS=netns, but the power-loss tests cannot mount FUSE: {why}")
    return why


def _why_no_fuse() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    try:
        import fuse  # noqa: F401  (fusepy loads libfuse2 at import)
    except (ImportError, OSError) as e:
        return f"fusepy unusable: {e} (apt-get install libfuse2 fuse)"
    return None


class PowerLossMount:
    """One power-loss file system mounted at `mountpoint` (an empty dir)."""

    def __init__(self, mountpoint: Path, backing: Path) -> None:
        self.mountpoint = mountpoint
        self.control = str(backing) + ".sock"
        mountpoint.mkdir(parents=True, exist_ok=True)
        backing.mkdir(parents=True, exist_ok=True)
        with open(str(backing) + ".log", "ab") as log:  # the file system writes to its own copy
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.faults.powerloss_fs", str(backing), str(mountpoint), self.control],
                cwd=ROOT,
                env=dict(os.environ, PYTHONPATH=str(ROOT)),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(
            lambda: os.path.ismount(mountpoint) and os.path.exists(self.control),
            20,
            f"power-loss file system mounted at {mountpoint}",
        )

    def _ask(self, command: str) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(60)
            s.connect(self.control)
            s.sendall(command.encode() + b"\n")
            reply = json.loads(s.makefile("rb").readline())
        assert "error" not in reply, reply
        return reply

    def cut(self) -> dict:
        """Power cut: whatever was not fsynced is gone. Stop its users first."""
        return self._ask("cut")

    def stats(self) -> dict:
        return self._ask("stats")

    def close(self) -> None:
        subprocess.run(["fusermount", "-u", "-z", str(self.mountpoint)], check=False, capture_output=True)
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
