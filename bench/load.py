"""The one load generator every system is driven by.

* `closed_loop`: N concurrent clients, each a connection doing one request,
  waiting for the reply, then the next (closed loop). The clients are spread
  over several worker *processes* (no GIL ceiling), each running them as
  asyncio tasks on raw asyncio streams (a minimal HTTP/1.1 keep-alive client,
  or RESP for Redis). Requests are pre-encoded bytes, so a client costs one
  write and one parse per operation. Every system's small-update figure comes
  from this function with the same number of processes and clients.
* `BlockingHTTP` / `BlockingRESP`: one connection, blocking sockets, bodies
  sent from a memoryview and received with recv_into into a preallocated
  buffer: the client for large pushes and pulls (the client side does not
  copy the payload, so it is not what limits MB/s).

Deliberately imports nothing heavy (workers are spawned).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import socket
import time
from dataclasses import dataclass

# ---------------------------------------------------------------- encoding --


def http_request(method: str, path: str, host: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def resp_command(*args: bytes | str) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n" % len(b))
        out.append(b)
        out.append(b"\r\n")
    return b"".join(out)


def _framing(line: bytes, length, chunked: bool):
    """Fold one response header line into (Content-Length, chunked)."""
    k, _, v = line.partition(b":")
    k = k.strip().lower()
    if k == b"content-length":
        return int(v), chunked
    if k == b"transfer-encoding" and b"chunked" in v.lower():
        return length, True
    return length, chunked


# ------------------------------------------------------------- async client --


async def _read_http(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, chunked = None, False
    for ln in lines[1:]:
        length, chunked = _framing(ln, length, chunked)
    if chunked:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        return status, b"".join(parts)
    return status, (await reader.readexactly(length) if length else b"")


async def _read_resp(reader: asyncio.StreamReader) -> bytes:
    line = await reader.readuntil(b"\r\n")
    t = line[:1]
    if t == b"-":
        raise RuntimeError(line.decode().strip())
    if t == b"$":
        n = int(line[1:-2])
        if n < 0:
            return b""
        data = await reader.readexactly(n + 2)
        return data[:-2]
    if t == b"*":
        return b"".join([await _read_resp(reader) for _ in range(int(line[1:-2]))])
    return line[1:-2]


@dataclass
class Job:
    protocol: str  # "http" or "resp"
    targets: list[tuple[str, int]]
    requests: list[bytes]  # per target index: the pre-encoded request
    replies: int = 1  # RESP replies per request (SET + WAIT 2 pipelined: 2)
    ok_status: tuple = (200, 201)
    check: bytes | None = None  # RESP: the WAIT reply must equal this (b"2")


async def _client(job: Job, idx: int, start: float, end: float, lat: list, errors: list) -> None:
    ti = idx % len(job.targets)
    host, port = job.targets[ti]
    req = job.requests[ti]
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    now = time.time()
    if start > now:
        await asyncio.sleep(start - now)
    try:
        while True:
            t0 = time.perf_counter()
            if time.time() >= end:
                break
            writer.write(req)
            if job.protocol == "http":
                status, _ = await _read_http(reader)
                good = status in job.ok_status
            else:
                last = b""
                for _ in range(job.replies):
                    last = await _read_resp(reader)
                good = job.check is None or last == job.check
            t1 = time.perf_counter()
            if time.time() <= end:
                if good:
                    lat.append(t1 - t0)
                else:
                    errors.append(status if job.protocol == "http" else last)
    except (ConnectionError, asyncio.IncompleteReadError, RuntimeError) as e:
        errors.append(repr(e))
    finally:
        writer.close()


def _worker(job: Job, indexes: list[int], seconds: float, ready, go, start_at, q) -> None:
    ready.put(os.getpid())
    go.wait()  # every worker is up (spawning and importing can take seconds on a loaded machine)
    start = start_at.value
    end = start + seconds
    lat: list[float] = []
    errors: list = []

    async def main():
        await asyncio.gather(*[_client(job, i, start, end, lat, errors) for i in indexes])

    asyncio.run(main())
    q.put((lat, [str(e) for e in errors[:5]], len(errors)))


def _load_context():
    """Worker processes forked from a server that has imported this module: a
    window's clients start in milliseconds, where spawning 4 fresh interpreters
    took ~2 s of the machine's 2 cores per window (a third of make bench's small
    section). The server is single-threaded, so forking it is safe."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def closed_loop(job: Job, clients: int, seconds: float, procs: int | None = None, probe=None) -> dict:
    """Run `clients` closed-loop clients for `seconds`; ops/s counts replies
    received inside the window (after a common start instant). `probe()`, if
    given, is read at the window's start and end; "probed" is the difference
    (e.g. the servers' CPU seconds spent inside the window)."""
    procs = procs or min(clients, int(os.environ.get("BENCH_LOAD_PROCS", "4")))
    ctx = _load_context()
    q, ready, go, start_at = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    ps = [
        ctx.Process(target=_worker, args=(job, list(range(p, clients, procs)), seconds, ready, go, start_at, q))
        for p in range(procs)
    ]
    for p in ps:
        p.start()
    for _ in ps:
        ready.get(timeout=120)
    start = time.time() + 0.5  # every client connected and waiting
    end = start + seconds
    start_at.value = start
    go.set()
    probed = None
    if probe is not None:
        time.sleep(max(0.0, start - time.time()))
        first = probe()
        time.sleep(max(0.0, end - time.time()))
        probed = probe() - first
    lat: list[float] = []
    errs: list = []
    nerr = 0
    for _ in ps:
        lats, e, n = q.get(timeout=seconds + 120)
        lat += lats
        errs += e
        nerr += n
    for p in ps:
        p.join(10)
    lat.sort()

    def pct(p):
        return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1e3 if lat else float("nan")

    return {
        "ops_s": len(lat) / seconds,
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "ops": len(lat),
        "errors": nerr,
        "error_samples": errs[:3],
        "probed": probed,
    }


# ------------------------------------------------------------ blocking client --


class _Conn:
    def __init__(self, host: str, port: int, timeout: float = 300):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.sink = bytearray()

    def close(self):
        self.sock.close()

    def _fill(self):
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("closed")
        self.buf += chunk

    def readline(self, sep=b"\r\n") -> bytes:
        while True:
            i = self.buf.find(sep)
            if i >= 0:
                line = bytes(self.buf[: i + len(sep)])
                del self.buf[: i + len(sep)]
                return line
            self._fill()

    def readinto(self, n: int) -> memoryview:
        """The next `n` bytes. Bodies of 1 MB and more land in one buffer the
        connection keeps, like the loopback sink's: a fresh 64 MB buffer costs
        the reader ~70 ms of page faults on this kind of VM, which would be
        charged to whichever system is measured. Valid until the next read."""
        if n >= 1 << 20:
            if len(self.sink) < n:
                self.sink = bytearray(n)
            mv = memoryview(self.sink)[:n]
        else:
            mv = memoryview(bytearray(n))
        k = min(n, len(self.buf))
        mv[:k] = self.buf[:k]
        del self.buf[:k]
        while k < n:
            r = self.sock.recv_into(mv[k:], min(n - k, 16 << 20))
            if not r:
                raise ConnectionError("closed")
            k += r
        return mv

    def send(self, head: bytes, body=None):
        if body is not None and len(body) < 65536:
            self.sock.sendall(head + bytes(body))
            return
        self.sock.sendall(head)
        if body is not None:
            self.sock.sendall(memoryview(body).cast("B"))


class BlockingHTTP(_Conn):
    def request(self, method: str, path: str, headers: dict | None = None, body=None) -> tuple[int, memoryview]:
        n = 0 if body is None else memoryview(body).nbytes
        lines = [f"{method} {path} HTTP/1.1", "Host: bench", f"Content-Length: {n}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode(), body)
        status = int(self.readline().split(b" ", 2)[1])
        length, chunked = 0, False
        while True:
            ln = self.readline()
            if ln == b"\r\n":
                break
            length, chunked = _framing(ln, length, chunked)
        if method == "HEAD" or status in (204, 304):
            return status, memoryview(b"")
        if chunked:
            parts = []
            while True:
                size = int(self.readline().split(b";")[0], 16)
                if size == 0:
                    self.readline()
                    break
                parts.append(bytes(self.readinto(size)))
                self.readline()
            return status, memoryview(b"".join(parts))
        return status, self.readinto(length)


class BlockingRESP(_Conn):
    def call(self, *args, body=None):
        """Send a command whose last argument may be a large buffer (`body`)."""
        parts = list(args)
        out = [b"*%d\r\n" % (len(parts) + (body is not None))]
        for a in parts:
            b = a.encode() if isinstance(a, str) else a
            out += [b"$%d\r\n" % len(b), b, b"\r\n"]
        if body is None:
            self.send(b"".join(out))
        else:
            n = memoryview(body).nbytes
            out.append(b"$%d\r\n" % n)
            self.send(b"".join(out), body)
            self.sock.sendall(b"\r\n")
        return self.reply()

    def reply(self):
        line = self.readline()
        t = line[:1]
        if t == b"-":
            raise RuntimeError(line.decode().strip())
        if t == b"$":
            n = int(line[1:-2])
            if n < 0:
                return None
            mv = self.readinto(n)
            self.readline()
            return mv
        if t == b"*":
            return [self.reply() for _ in range(int(line[1:-2]))]
        if t == b":":
            return int(line[1:-2])
        return line[1:-2]


# ------------------------------------------------------------- loopback TCP --


def _sink(port_q, nbytes, reps):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port_q.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    buf = bytearray(16 << 20)
    mv = memoryview(buf)
    for _ in range(reps + 1):
        left = nbytes
        while left:
            r = conn.recv_into(mv, min(left, len(buf)))
            if not r:
                return
            left -= r
        conn.sendall(b"k")
    conn.close()


def loopback_mb_s(nbytes: int, reps: int) -> list[float]:
    """Bytes pushed through one loopback socket to another process, MB/s."""
    ctx = _load_context()
    q = ctx.Queue()
    p = ctx.Process(target=_sink, args=(q, nbytes, reps))
    p.start()
    port = q.get(timeout=30)
    s = socket.create_connection(("127.0.0.1", port))
    data = memoryview(bytearray(os.urandom(1 << 20)) * (nbytes >> 20))
    out = []
    for i in range(reps + 1):  # the first push warms the connection up and is not counted
        t0 = time.perf_counter()
        s.sendall(data)
        s.recv(1)
        if i:
            out.append(nbytes / (1 << 20) / (time.perf_counter() - t0))
    s.close()
    p.join(10)
    return out
