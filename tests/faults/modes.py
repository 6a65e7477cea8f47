"""Which fault injection the suite uses, and the test side of the fallback.

- "netns": replicas in a private network namespace, links cut with nftables
  (tests/faults/netns.py). Needs root with CAP_SYS_ADMIN and CAP_NET_ADMIN;
  CI runs it (and sets PARAMSTORE_FAULTS=netns so that it cannot fall back).
- "transport": where namespaces are not allowed, replicas use a pysyncobj
  transport that drops Raft messages on cut links (tests/faults/droptransport.py).

PARAMSTORE_FAULTS=netns|transport forces one; unset (or "auto") picks netns
when it can.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

from tests.faults import netns
from tests.faults.droptransport import ENV

CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21
TRANSPORT = "tests.faults.droptransport:DropTransport"


@functools.cache
def choose() -> tuple[str, str]:
    """(mode, why), for the report header, the fixtures and the test ids."""
    forced = os.environ.get("PARAMSTORE_FAULTS", "auto").strip().lower()
    if forced == "transport":
        return "transport", "forced by PARAMSTORE_FAULTS=transport"
    why_not = namespaces_unavailable()
    if forced == "netns":
        return "netns", f"forced by PARAMSTORE_FAULTS=netns{' but ' + why_not if why_not else ''}"
    if forced != "auto":
        raise ValueError(f"PARAMSTORE_FAULTS={forced!r}: expected netns, transport or auto")
    if why_not:
        return "transport", f"fallback: {why_not}"
    return "netns", "auto: root with CAP_SYS_ADMIN and CAP_NET_ADMIN"


def namespaces_unavailable() -> str | None:
    """None if this process may make network namespaces and nftables rules."""
    why = netns.available()
    if why:
        return why
    try:
        with open("/proc/self/status") as f:
            caps = int(next(line.split()[1] for line in f if line.startswith("CapEff:")), 16)
    except (OSError, StopIteration, ValueError):
        return "cannot read this process's capabilities"
    for bit, name in ((CAP_SYS_ADMIN, "CAP_SYS_ADMIN"), (CAP_NET_ADMIN, "CAP_NET_ADMIN")):
        if not caps >> bit & 1:
            return f"root without {name} (a container?)"
    return None


class LinkFile:
    """Test side of DropTransport: cut and heal Raft links by rewriting the file
    the replicas watch. Same interface as netns.Netns."""

    mode = "transport"
    launcher: ClassVar[list[str]] = []  # replicas run in this namespace

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rules: list[tuple[str, str]] = []
        self._write()
        self._pool = ThreadPoolExecutor(16, thread_name_prefix="faults")

    @property
    def env(self) -> dict[str, str]:
        return {ENV: str(self.path)}

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(f"{a} {b}\n" for a, b in self.rules))
        os.replace(tmp, self.path)

    def cut(self, a: str, b: str) -> None:
        self.rules += [(a, b), (b, a)]
        self._write()

    def isolate(self, a: str, others: list[str]) -> None:
        for b in others:
            self.rules += [(a, b), (b, a)]
        self._write()

    def heal(self) -> None:
        self.rules.clear()
        self._write()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any):
        return self._pool.submit(fn, *args, **kwargs)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
