"""Hosts in their own network namespaces, joined by a bridge, each host link
shaped with tc.

Layout, all of it in namespaces this module creates (nothing in the caller's):

    <prefix>sw      a bridge br0 and one veth end hN per host (egress: shaped toward the host)
    <prefix><host>  the other end, eth0, with the host's 10.x address (egress: shaped from the host)

Every name starts with `psim-<pid>-<n>-`, so two runs never collide and
cleanup is exact: closing a SimNet (also at interpreter exit) stops the
processes it started and deletes its namespaces, which takes the veths and
qdiscs with them; `remove_stale()` deletes what a killed run left.

Shaping: htb on both ends of each host link (rate in each direction), with
netem as the class's leaf for delay and loss. Some kernels lack sch_netem
(this machine's has htb, tbf and pfifo only): `capabilities()` says so and
a SimNet asked for delay or loss refuses to start unless told to go on
without them (`Shape.required=False`), recording that it did.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import shutil
import signal
import subprocess
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
PREFIX = "psim-"
_seq = itertools.count(1)


class NetsimUnavailable(RuntimeError):
    """This machine cannot build the simulated network (the message says why)."""


def unavailable() -> str | None:
    """None if namespaces, veths, a bridge and htb can be used here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces and tc need root (run as root, as CI does)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2)"
    caps = capabilities()
    missing = [q for q in ("bridge", "veth", "htb") if not caps.get(q)]
    return f"the kernel lacks {', '.join(missing)}" if missing else None


@cache
def capabilities() -> dict[str, bool]:
    """What this kernel offers, probed once in a throwaway namespace."""
    ns = f"{PREFIX}{os.getpid()}-probe"
    caps = {"bridge": False, "veth": False, "htb": False, "tbf": False, "netem": False}
    if os.geteuid() != 0 or subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode != 0:
        return caps
    try:

        def ok(*cmd: str) -> bool:
            return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True).returncode == 0

        caps["bridge"] = ok("ip", "link", "add", "b0", "type", "bridge")
        caps["veth"] = ok("ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        for kind, args in (
            ("htb", ["htb"]),
            ("tbf", ["tbf", "rate", "1gbit", "burst", "64k", "latency", "10ms"]),
            ("netem", ["netem", "delay", "1ms"]),
        ):
            caps[kind] = caps["veth"] and ok("tc", "qdisc", "replace", "dev", "v0", "root", *args)
            ok("tc", "qdisc", "del", "dev", "v0", "root")
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    return caps


@dataclass(frozen=True)
class Shape:
    """One host link, each direction: `rate_mbit` (None: unshaped), one-way
    `delay_ms` and `loss_pct` (netem). `required=False`: if the kernel has no
    netem, build the network without delay and loss instead of refusing."""

    rate_mbit: float | None = 1000.0
    delay_ms: float = 0.0
    loss_pct: float = 0.0
    required: bool = True

    def describe(self) -> str:
        parts = [f"{self.rate_mbit:g} Mbit/s" if self.rate_mbit else "unshaped"]
        if self.delay_ms:
            parts.append(f"{self.delay_ms:g} ms")
        if self.loss_pct:
            parts.append(f"{self.loss_pct:g}% loss")
        return " ".join(parts)


@dataclass(frozen=True)
class Host:
    name: str
    ns: str
    addr: str
    index: int


def _run(*cmd: str) -> None:
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if r.returncode != 0:
        raise NetsimUnavailable(f"{' '.join(cmd)} failed: {r.stderr.strip() or r.stdout.strip()}")


def remove_stale() -> list[str]:
    """Delete what a run that no longer exists left behind (it was killed):
    the processes still inside its namespaces, then the namespaces."""
    removed = []
    for ns in namespaces(PREFIX):
        pid = ns[len(PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            orphans = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for orphan in orphans:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(orphan), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            removed.append(ns)
    return removed


def namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def leftovers(prefix: str) -> list[str]:
    """Anything named with `prefix` that still exists: namespaces, and links or
    qdiscs in the caller's namespace (the harness never creates any there)."""
    found = [f"netns {n}" for n in namespaces(prefix)]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found += [f"link {line.split(':')[1].strip()}" for line in links.splitlines() if prefix in line]
    qdiscs = subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True).stdout
    found += [f"qdisc {line}" for line in qdiscs.splitlines() if prefix in line]
    return found


def _enter(ns: str) -> None:
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
    finally:
        os.close(fd)


class SimNet:
    """Hosts on one shaped bridge. A context manager; `close()` is idempotent
    and also runs at interpreter exit."""

    def __init__(self, hosts: Sequence[str], shape: Shape, subnet: str = "10.77.0") -> None:
        why = unavailable()
        if why:
            raise NetsimUnavailable(why)
        caps = capabilities()
        wants_netem = bool(shape.delay_ms or shape.loss_pct)
        if wants_netem and not caps["netem"] and shape.required:
            raise NetsimUnavailable(
                f"delay/loss need sch_netem, which this kernel lacks ({os.uname().release}); "
                "pass Shape(required=False) to shape bandwidth only"
            )
        self.netem = wants_netem and caps["netem"]
        self.shape = shape
        self.applied = shape if self.netem or not wants_netem else Shape(shape.rate_mbit, 0.0, 0.0, False)
        self.prefix = f"{PREFIX}{os.getpid()}-{next(_seq)}-"
        self.switch = self.prefix + "sw"
        self.hosts: dict[str, Host] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._lock = threading.Lock()
        self._closed = False
        # Runs on close(), when the SimNet is collected, or at interpreter exit, whichever comes first.
        self._finalizer = weakref.finalize(self, SimNet._teardown, self.prefix, self.procs, self._pools)
        try:
            self._build(list(hosts), subnet)
        except BaseException:
            self.close()
            raise

    # ---- building ---------------------------------------------------------------------
    def _build(self, names: list[str], subnet: str) -> None:
        if len(set(names)) != len(names) or len(names) > 250:
            raise ValueError(f"host names must be distinct, at most 250: {names}")
        _run("ip", "netns", "add", self.switch)
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")
        for i, name in enumerate(names):
            host = Host(name, self.prefix + name, f"{subnet}.{i + 1}", i)
            _run("ip", "netns", "add", host.ns)
            port = f"h{i}"
            _run("ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
            _run("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
            _run("ip", "-n", host.ns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
            _run("ip", "-n", host.ns, "link", "set", "eth0", "up")
            _run("ip", "-n", host.ns, "link", "set", "lo", "up")
            self._shape(host.ns, "eth0")  # host -> switch
            self._shape(self.switch, port)  # switch -> host
            self.hosts[name] = host

    def _shape(self, ns: str, dev: str) -> None:
        s = self.applied
        tc = ["ip", "netns", "exec", ns, "tc"]
        leaf: list[str] = []
        if self.netem:
            leaf = ["netem", "limit", "100000"]
            if s.delay_ms:
                leaf += ["delay", f"{s.delay_ms}ms"]
            if s.loss_pct:
                leaf += ["loss", f"{s.loss_pct}%"]
        if s.rate_mbit is None:
            if leaf:
                _run(*tc, "qdisc", "add", "dev", dev, "root", "handle", "10:", *leaf)
            return
        rate_bytes = s.rate_mbit * 1e6 / 8
        # Burst: 2 ms of traffic at the rate, at least a 64 KB GSO segment, so the
        # timer's granularity does not eat into the rate.
        burst = str(max(65536 + 1514, int(rate_bytes * 0.002)))
        rate = f"{s.rate_mbit}mbit"
        _run(*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10")
        htb = ["htb", "rate", rate, "ceil", rate, "burst", burst, "cburst", burst, "quantum", "65536"]
        _run(*tc, "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", *htb)
        if leaf:
            _run(*tc, "qdisc", "add", "dev", dev, "parent", "1:10", "handle", "10:", *leaf)

    # ---- using ------------------------------------------------------------------------
    def addr(self, host: str) -> str:
        return self.hosts[host].addr

    def launcher(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[host].ns]

    def popen(self, host: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        """Start a process on `host`; `close()` stops it."""
        p = subprocess.Popen([*self.launcher(host), *argv], **kw)
        with self._lock:
            self.procs.append(p)
        return p

    def run(self, host: str, *argv: str) -> str:
        r = subprocess.run([*self.launcher(host), *argv], capture_output=True, text=True, check=True)
        return r.stdout

    def submit(self, host: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """Run fn in a thread that lives in `host`'s namespace (its sockets are the host's)."""
        with self._lock:
            pool = self._pools.get(host)
            if pool is None:
                ns = self.hosts[host].ns
                pool = self._pools[host] = ThreadPoolExecutor(8, f"{ns}-", initializer=_enter, initargs=(ns,))
        return pool.submit(fn, *args, **kwargs)

    def call(self, host: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.submit(host, fn, *args, **kwargs).result()

    def qdiscs(self, host: str) -> str:
        """tc's view of the host's link, both ends (for reports and tests)."""
        i = self.hosts[host].index
        return (
            self.run(host, "tc", "qdisc", "show", "dev", "eth0")
            + subprocess.run(
                ["ip", "netns", "exec", self.switch, "tc", "qdisc", "show", "dev", f"h{i}"],
                capture_output=True,
                text=True,
            ).stdout
        )

    # ---- teardown ---------------------------------------------------------------------
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._finalizer()

    @staticmethod
    def _teardown(prefix: str, procs: list[subprocess.Popen[bytes]], pools: dict[str, ThreadPoolExecutor]) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for pool in pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        # Hosts first, then the switch; a namespace goes with its veth ends and qdiscs.
        for ns in sorted(namespaces(prefix), key=lambda n: n.endswith("-sw")):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def __enter__(self) -> SimNet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
