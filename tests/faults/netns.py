"""A private network namespace for fault tests: replicas on 127.0.0.1/2/3
inside it, links cut with nftables rules that exist only there, and test
threads that enter it to talk to the replicas."""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import httpx

CLONE_NEWNET = 0x40000000
TABLE = "psfaults"
CLIENT_ADDRESS = "127.0.0.100"  # test clients: never one of the replicas' addresses


def client(timeout: float = 10.0) -> httpx.Client:
    return httpx.Client(timeout=timeout, transport=httpx.HTTPTransport(local_address=CLIENT_ADDRESS))


def available() -> str | None:
    """None if namespaces and nftables can be used here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root here"
    for tool in ("ip", "nft"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            return f"{tool} is not installed (apt-get install iproute2 nftables)"
    return None


class Netns:
    mode = "netns"
    env: ClassVar[dict[str, str]] = {}  # the namespace, not the environment, cuts links

    def __init__(self) -> None:
        self.name = f"ps-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.exec("ip", "link", "set", "lo", "up")
        self.exec("nft", "add", "table", "inet", TABLE)
        self.exec(
            "nft", "add", "chain", "inet", TABLE, "input", "{ type filter hook input priority 0 ; policy accept ; }"
        )
        self.rules: list[tuple[str, str]] = []
        self._pool = ThreadPoolExecutor(16, thread_name_prefix=f"netns-{self.name}", initializer=self._enter)
        self._local = threading.local()
        self._clients: list[httpx.Client] = []  # one per pool thread, closed with the namespace

    @property
    def launcher(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def exec(self, *cmd: str) -> None:
        subprocess.run(self.launcher + list(cmd), check=True, capture_output=True)

    # ---- links ------------------------------------------------------------------------
    def cut(self, a: str, b: str) -> None:
        """Drop every packet between addresses a and b, both ways."""
        for src, dst in ((a, b), (b, a)):
            self.exec("nft", "add", "rule", "inet", TABLE, "input", "ip", "saddr", src, "ip", "daddr", dst, "drop")
            self.rules.append((src, dst))

    def isolate(self, a: str, others: list[str]) -> None:
        for b in others:
            self.cut(a, b)

    def heal(self) -> None:
        self.exec("nft", "flush", "chain", "inet", TABLE, "input")
        self.rules.clear()

    # ---- test threads inside the namespace --------------------------------------------
    def _enter(self) -> None:
        fd = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY)
        try:
            if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
        finally:
            os.close(fd)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run fn in a thread that lives in the namespace."""
        return self._pool.submit(fn, *args, **kwargs).result()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any):
        return self._pool.submit(fn, *args, **kwargs)

    def http(self) -> httpx.Client:
        """This (namespace) thread's own HTTP client."""
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = client()
            self._clients.append(c)
        return c

    def client(self) -> NetnsHttp:
        return NetnsHttp(self)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for c in self._clients:
            c.close()
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


class NetnsHttp:
    """An httpx.Client look-alike whose requests run inside the namespace."""

    def __init__(self, ns: Netns) -> None:
        self.ns = ns

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        return self.ns.call(lambda: self.ns.http().request(method, url, **kw))

    def get(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("GET", url, **kw)

    def head(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("HEAD", url, **kw)

    def put(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("PUT", url, **kw)

    def post(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("POST", url, **kw)

    def delete(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("DELETE", url, **kw)

    def close(self) -> None:
        pass
