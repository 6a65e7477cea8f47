"""The data path: moves payload bytes between replicas over plain TCP.

Raft entries stay small; tensor bytes go here, with no pickle and no
compression. One request per connection:

    client -> server   one JSON line {"op": ..., "shard", "id", "size", "ts", "nonce", "mac"}
    put_stream: client sends `size` raw bytes (as they arrive from its own
          client, or all at once), then a trailer line {"id", "mac"} naming
          them; server answers {"ok": true} once the bytes are stored and their
          hash matches `id` (hashed while they arrive, with the algorithm the
          header's `digest` names: "b3", or none for SHA-256; see
          store/content_id.py). Every payload goes
          this way (PayloadStream, DataPathClient.replicate).
    put:  the same with `id` in the header; sent by earlier versions
    get:  server answers {"ok": true, "size": n} and the n raw bytes
    snapshot: the server takes a fresh snapshot of the shard (if its last one
          is behind) and answers {"ok": true, "size": n, "mac", "digest"}, the
          file's n bytes, then a trailer line {"mac"}; a joining replica starts
          from it instead of a transfer through Raft messages
    tables: the same with a `send_dir` stream of a fresh checkpoint of the
          shard's embedding tables (no size in the head)

Every request carries an HMAC of its header (and a `put_stream` trailer one
of its own) under the cluster secret, with a timestamp and a nonce, so a
captured header cannot be replayed (store/peer_auth.py); anything else is
refused before a byte past the header line is read. `snapshot` and `tables`
replies are signed (their head, and a trailer over the digest of the bytes,
both bound to the request's nonce): keyed BLAKE3 when the request asks for it
with `"digest": "b3"` and the head answers the same, else SHA-256, the form
replicas of earlier versions know (store/stream_digest.py); the receiver
hashes while it receives and installs nothing that fails. `get` replies need no MAC: a payload's name
is its hash (store/content_id.py), checked on arrival. Bytes travel unencrypted
(docs/reliability.md, "Security defaults").

Payload bytes are counted per peer (store/traffic.py) for /metrics: a
request's header may name the sending node (`from`, outside the MAC), which
only labels them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from . import content_id
from .buffers import Bytes, as_buffer, receive_buffer
from .config import Address
from .errors import CorruptData, StoreError, Unavailable
from .hashed_send import send_file_hashed
from .payloads import PayloadStore
from .peer_auth import PeerAuth
from .refusals import RefusalLog, clip
from .stream_digest import StreamDigest, announced, requested
from .tables.engine import receive_dir, send_dir
from .threadnames import name_this_thread
from .traffic import DataPathTraffic

log = logging.getLogger(__name__)

MAX_HEADER = 4096
CHUNK = 4 << 20
SOCKET_BUFFER = 4 << 20


def _read_line(sock: socket.socket) -> dict[str, Any]:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("connection closed while reading a header")
        buf += chunk
        if len(buf) > MAX_HEADER:
            raise ConnectionError("header too long")
    return _parse_line(buf, "header")


def _read_line_from(stream: BinaryIO) -> dict[str, Any]:
    """`_read_line` from a buffered stream (the socket is already wrapped in it)."""
    line = stream.readline(MAX_HEADER + 1)
    if not line.endswith(b"\n"):
        raise ConnectionError("connection closed or header too long while reading a trailer")
    return _parse_line(line, "trailer")


def _parse_line(line: bytes | bytearray, what: str) -> dict[str, Any]:
    try:
        msg = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: nesting, not a ValueError; the line is capped
        raise ConnectionError(f"{what} is not a JSON object") from None
    if not isinstance(msg, dict):
        raise ConnectionError(f"{what} is not an object")
    return msg


def _send_line(sock: socket.socket, msg: Mapping[str, Any]) -> None:
    sock.sendall(json.dumps(msg).encode() + b"\n")


def _recv_exact(sock: socket.socket, size: int, hasher: content_id.Hasher | None = None) -> np.ndarray | bytearray:
    """`size` bytes (a buffer: see store/buffers.py); `hasher` is fed
    as they arrive, overlapping the hashing with the transfer."""
    buf = receive_buffer(size)
    view = memoryview(as_buffer(buf))
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], min(CHUNK, size - got))
        if n == 0:
            raise ConnectionError(f"connection closed after {got} of {size} bytes")
        if hasher is not None:
            hasher.update(view[got : got + n])
        got += n
    return buf


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)


class DataPathServer:
    def __init__(
        self,
        address: Address,
        payloads: Mapping[int, PayloadStore],
        secret: bytes,
        max_size: int,
        snapshot_source: Callable[[int], Path] | None = None,
        tables_source: Callable[[int], Path] | None = None,
        traffic: DataPathTraffic | None = None,
    ) -> None:
        self.payloads = payloads
        self.traffic = traffic or DataPathTraffic()  # keyed by the sender's node id (header `from`)
        self.snapshot_source = snapshot_source
        self.tables_source = tables_source  # a fresh checkpoint of a shard's embedding tables
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer._handle(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.auth = PeerAuth(secret)
        self.refusals = RefusalLog(log, "data-path request")
        self.max_size = max_size
        self._server = Server((address.host, address.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="datapath", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():  # shutdown() waits forever for a loop that never ran
            self._server.shutdown()
        self._server.server_close()

    def _refuse(self, sock: socket.socket, peer: str, error: str) -> None:
        self.refusals.refused(peer, error)
        _send_line(sock, {"ok": False, "error": error})

    def _handle(self, sock: socket.socket) -> None:
        name_this_thread("datapath-serve")
        peer = "?"
        try:
            peer = str(sock.getpeername()[0])
            sock.settimeout(30)
            _tune(sock)
            msg = _read_line(sock)
            op, pid, size = msg.get("op"), str(msg.get("id", "")), msg.get("size", 0)
            shard = msg.get("shard")
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= self.max_size:
                return self._refuse(sock, peer, f"bad size {clip(size, 40)}")
            refused = self.auth.check_header(msg)
            if refused is not None:
                return self._refuse(sock, peer, refused)
            if not isinstance(shard, int) or shard not in self.payloads:
                return self._refuse(sock, peer, f"shard {clip(shard, 40)} is not hosted here")
            nonce = str(msg["nonce"])
            store = self.payloads[shard]
            sender = str(msg.get("from", ""))[:64]  # only a label; the store maps unknown ones to "other"
            if op == "put":  # sent by replicas of earlier versions (rolling upgrades)
                kind = content_id.kind_of(pid)
                if kind is None:
                    return self._refuse(sock, peer, f"invalid payload id {clip(pid, 80)}")
                hasher = content_id.hasher(kind)
                data = _recv_exact(sock, size, hasher)
                self.traffic.add(sender, received=size)
                store.put(data, pid, digest=content_id.name(kind, hasher))
                _send_line(sock, {"ok": True})
            elif op == "put_stream":
                # the bytes first, then a trailer naming them: the sender
                # forwards a body while it still arrives (see PayloadStream),
                # as fast as its client sends it
                sock.settimeout(STREAM_IDLE)
                # the id's algorithm is announced up front (no field: SHA-256, as earlier versions send)
                kind = requested(msg)
                hasher = content_id.hasher(kind)
                data = _recv_exact(sock, size, hasher)
                self.traffic.add(sender, received=size)
                trailer = _read_line(sock)
                pid = str(trailer.get("id", ""))
                if not self.auth.check_trailer(trailer, shard, size, nonce):
                    return self._refuse(sock, peer, "authentication failed (trailer)")
                store.put(data, pid, digest=content_id.name(kind, hasher))
                _send_line(sock, {"ok": True})
            elif op == "snapshot" and self.snapshot_source is not None:
                sent = self._send_snapshot(sock, shard, nonce, requested(msg), self.snapshot_source(shard))
                self.traffic.add(sender, sent=sent)
            elif op == "tables" and self.tables_source is not None:
                sent = self._send_tables(sock, shard, nonce, requested(msg), self.tables_source(shard))
                self.traffic.add(sender, sent=sent)
            elif op == "get":
                held = store.get(pid)
                if held is None:
                    return _send_line(sock, {"ok": False, "error": "not here"})
                _send_line(sock, {"ok": True, "size": len(held)})
                sock.sendall(as_buffer(held))
                self.traffic.add(sender, sent=len(held))
            else:
                self._refuse(sock, peer, f"unknown op {clip(op, 40)}")
        except (OSError, ConnectionError, ValueError, StoreError) as e:  # StoreError: CorruptData, Unavailable...
            self.refusals.refused(peer, f"request failed: {e}")
            with contextlib.suppress(OSError):
                _send_line(sock, {"ok": False, "error": clip(str(e))})

    def _reply_head(self, op: str, shard: int, nonce: str, size: int | None, alg: str) -> dict[str, Any]:
        head: dict[str, Any] = {"ok": True, "mac": self.auth.reply_head_mac(op, shard, nonce, size)}
        if size is not None:
            head["size"] = size
        if alg == content_id.B3:  # absent: SHA-256, all a replica of an earlier version reads
            head["digest"] = alg
        return head

    def _send_snapshot(self, sock: socket.socket, shard: int, nonce: str, alg: str, path: Path) -> int:
        with open(path, "rb") as f:  # an open file survives the next snapshot's rename
            size = os.fstat(f.fileno()).st_size
            _send_line(sock, self._reply_head("snapshot", shard, nonce, size, alg))
            sock.settimeout(None)
            hasher = self.auth.stream_digest(alg)
            send_file_hashed(f, sock, size, hasher)
            _send_line(sock, {"mac": self.auth.reply_end_mac("snapshot", shard, nonce, size, hasher.hexdigest())})
        log.info("sent the snapshot of shard %d (%d bytes, %s) to a joining replica", shard, size, alg)
        return size

    def _send_tables(self, sock: socket.socket, shard: int, nonce: str, alg: str, checkpoint: Path) -> int:
        try:
            _send_line(sock, self._reply_head("tables", shard, nonce, None, alg))
            sock.settimeout(None)
            hasher = self.auth.stream_digest(alg)
            send_dir(checkpoint, sock, hasher)  # hashed from a mapping and sent with sendfile
            mac = self.auth.reply_end_mac("tables", shard, nonce, hasher.size, hasher.hexdigest())
            _send_line(sock, {"mac": mac})
        finally:
            shutil.rmtree(checkpoint, ignore_errors=True)
        log.info("sent the tables of shard %d (%d bytes) to a joining replica", shard, hasher.size)
        return hasher.size


def _signed_reply(
    auth: PeerAuth, reply: Mapping[str, Any], op: str, shard: int, nonce: str, addr: Address
) -> StreamDigest:
    """Refuse a `snapshot` / `tables` reply head that is not the answer of a
    replica holding the cluster secret to this very request; the hasher for
    the bytes that follow, as the head announces."""
    what = "a snapshot" if op == "snapshot" else "the tables"
    if not reply.get("ok"):
        raise ConnectionError(f"{addr} did not send {what} of shard {shard}: {clip(reply.get('error'))}")
    size = reply.get("size") if op == "snapshot" else None
    if op == "snapshot" and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise ConnectionError(f"{addr} sent {what} of shard {shard} with a bad size {clip(size, 40)}")
    if not auth.same(auth.reply_head_mac(op, shard, nonce, size), reply):
        raise ConnectionError(
            f"{addr} sent {what} of shard {shard} that failed authentication (reply not signed with the "
            "cluster secret: not a replica of this cluster, or one of a version before signed replies)"
        )
    alg = announced(reply)
    if alg is None:
        raise ConnectionError(f"{addr} sent {what} of shard {shard} with an unknown digest {clip(reply.get('digest'))}")
    return auth.stream_digest(alg)


def _check_end(
    auth: PeerAuth, trailer: Mapping[str, Any], op: str, shard: int, nonce: str, hasher: StreamDigest, addr: Address
) -> None:
    if not auth.same(auth.reply_end_mac(op, shard, nonce, hasher.size, hasher.hexdigest()), trailer):
        what = "a snapshot" if op == "snapshot" else "the tables"
        raise ConnectionError(
            f"{addr} sent {what} of shard {shard} that failed authentication: its {hasher.size} bytes do not "
            "match the signed digest (forged or altered in transit); nothing installed"
        )


class DataPathClient:
    def __init__(
        self,
        secret: bytes,
        timeout: float = 30.0,
        source: tuple[str, int] | None = None,
        max_size: int | None = None,
        origin: str = "",
        traffic: DataPathTraffic | None = None,
    ) -> None:
        self.auth = PeerAuth(secret)
        self.max_size = max_size  # the largest payload a `get` reply may announce (None: no cap)
        self.timeout = timeout
        self.source = source
        self.origin = origin  # this node's id, sent as `from` (a label for the peer's counts)
        self.traffic = traffic or DataPathTraffic()  # keyed by the peer's data address, "host:port"
        # asked for in signed replies; None: SHA-256, as earlier versions
        self.stream_digest: str | None = content_id.B3

    def _header(self, op: str, shard: int, payload_id: str, size: int) -> dict[str, Any]:
        header = self.auth.header(op, shard, payload_id, size)
        if self.origin:
            header["from"] = self.origin
        if op in ("snapshot", "tables") and self.stream_digest:
            header["digest"] = self.stream_digest  # outside the MAC: see store/stream_digest.py
        return header

    def _connect(self, addr: Address) -> socket.socket:
        sock = socket.create_connection((addr.host, addr.port), timeout=self.timeout, source_address=self.source)
        _tune(sock)
        return sock

    def fetch(self, addr: Address, shard: int, payload_id: str) -> np.ndarray | bytearray | None:
        """The payload `payload_id` from the replica at `addr` (None: not
        there), verified against its name (its hash) as it arrives."""
        with self._connect(addr) as sock:
            _send_line(sock, self._header("get", shard, payload_id, 0))
            reply = _read_line(sock)
            if not reply.get("ok"):
                return None
            size = reply.get("size")
            if (
                not isinstance(size, int)
                or isinstance(size, bool)
                or size < 0
                or (self.max_size is not None and size > self.max_size)
            ):  # checked before a buffer of that size is allocated
                raise ConnectionError(f"{addr} answered payload {payload_id[:16]}… with a bad size {clip(size, 40)}")
            kind = content_id.kind_of(payload_id)
            if kind is None:
                raise ValueError(f"invalid payload id {clip(payload_id, 80)}")
            hasher = content_id.hasher(kind)
            data = _recv_exact(sock, size, hasher)
            if (
                content_id.name(kind, hasher) != payload_id
            ):  # a squatter on a dead peer's port, or bytes altered in transit
                raise ConnectionError(f"{addr} sent bytes for payload {payload_id[:16]}… that hash to something else")
            self.traffic.add(str(addr), received=size)
            return data

    def fetch_snapshot(
        self,
        addr: Address,
        shard: int,
        dest: Path,
        timeout: float = 600.0,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Download a fresh snapshot of `shard` from the replica at `addr` into
        `dest` (written beside it, fsynced, then renamed); returns its size."""
        partial = dest.with_suffix(".fetching")
        with self._connect(addr) as sock:
            sock.settimeout(timeout)  # the source may first have to write the snapshot
            header = self._header("snapshot", shard, "", 0)
            _send_line(sock, header)
            reply = _read_line(sock)
            hasher = _signed_reply(self.auth, reply, "snapshot", shard, header["nonce"], addr)
            size = int(reply["size"])
            got, last_report = 0, time.monotonic()
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            try:
                with open(partial, "wb") as f:
                    while got < size:
                        n = sock.recv_into(view, min(CHUNK, size - got))
                        if n == 0:
                            raise ConnectionError(f"{addr}: snapshot of shard {shard} cut after {got} of {size} bytes")
                        hasher.update(view[:n])
                        f.write(view[:n])
                        got += n
                        if progress is not None and (time.monotonic() - last_report > 1.0 or got == size):
                            last_report = time.monotonic()
                            progress(got, size)
                    _check_end(self.auth, _read_line(sock), "snapshot", shard, header["nonce"], hasher, addr)
                    f.flush()
                    os.fsync(f.fileno())
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
        os.replace(partial, dest)
        self.traffic.add(str(addr), received=size)
        return size

    def fetch_tables(self, addr: Address, shard: int, dest: Path, timeout: float = 600.0) -> int:
        """Download a fresh checkpoint of `shard`'s embedding tables from the
        replica at `addr` into the new directory `dest`; returns its bytes."""
        with self._connect(addr) as sock:
            sock.settimeout(timeout)
            header = self._header("tables", shard, "", 0)
            _send_line(sock, header)
            reply = _read_line(sock)
            hasher = _signed_reply(self.auth, reply, "tables", shard, header["nonce"], addr)
            with sock.makefile("rb") as stream:
                try:
                    size = receive_dir(stream, dest, hasher=hasher)
                except CorruptData as e:  # receive_dir removed dest
                    raise ConnectionError(f"{addr} sent the tables of shard {shard}: {e}") from None
                try:
                    trailer = _read_line_from(stream)
                    _check_end(self.auth, trailer, "tables", shard, header["nonce"], hasher, addr)
                except BaseException:
                    shutil.rmtree(dest, ignore_errors=True)
                    raise
        self.traffic.add(str(addr), received=size)
        return size

    def replicate(
        self, peers: Sequence[Address], shard: int, payload_id: str, data: Bytes, need: int, timeout: float
    ) -> None:
        """Send a payload that is already complete to every peer in parallel;
        return once `need` of them hold it. The remaining sends go on in the
        background, so a slow replica does not slow the write, and a replica
        that misses it fetches it at apply. The same `put_stream` as a body
        forwarded while it arrives, with all of it queued at once."""
        view = memoryview(as_buffer(data)).cast("B")
        stream = self.stream(peers, shard, view.nbytes, content_id.kind_of(payload_id))
        stream.feed(view)
        stream.finish(payload_id)
        stream.wait(need, timeout)

    def stream(self, peers: Sequence[Address], shard: int, size: int, kind: str | None = None) -> PayloadStream:
        """Start forwarding a payload of `size` bytes to every peer while it
        is still arriving, to be named by a `kind` id (store/content_id.py;
        default: what new payloads get); see PayloadStream."""
        return PayloadStream(self, peers, shard, size, kind or content_id.new_kind())


class _Signal:
    """What a sender's queue carries besides chunks."""


_END, _ABORT = _Signal(), _Signal()
STREAM_IDLE = 120.0  # seconds a sender waits for the next chunk before giving up


class PayloadStream:
    """Cut-through replication of one payload: the bytes go to the peers as
    they arrive from the client, so the transfer to the peers overlaps the
    body's intake instead of following it. Its name (its hash) is only known at
    the end and travels in a trailer (`put_stream`); each peer hashes while
    receiving and refuses bytes that do not match.

    `feed` never blocks (called on the event loop): views of the body buffer
    (no copies) are queued for one sender thread per peer. Then either
    `finish(payload_id)` + `wait(need)`, or `abort()` (the peers drop what
    they received). Senders are threads of their own, not the client's pool:
    a stream lasts as long as its client takes to send the body, and slow
    uploads must not starve other pushes of pool threads.
    """

    def __init__(self, client: DataPathClient, peers: Sequence[Address], shard: int, size: int, kind: str) -> None:
        self.client = client
        self.shard = shard
        self.size = size
        self.kind = kind  # of the id finish() will give: each peer hashes with it while receiving
        self.payload_id: str | None = None
        self._queues: list[queue.SimpleQueue[memoryview | _Signal]] = [queue.SimpleQueue() for _ in peers]
        self._cond = threading.Condition()
        self._ok = 0
        self._failed = 0
        self._errors: list[str] = []
        self._total = len(peers)
        self._live = [True] * len(peers)
        self.finished = self.aborted = False
        for i, peer in enumerate(peers):
            threading.Thread(target=self._send, args=(peer, i), name="datapath-stream", daemon=True).start()

    def feed(self, chunk: memoryview) -> None:
        for q, live in zip(self._queues, self._live, strict=True):
            if live:  # a failed sender reads no more: queued views would pin the body
                q.put(chunk)

    def finish(self, payload_id: str) -> None:
        self.payload_id = payload_id
        self.finished = True
        for q in self._queues:
            q.put(_END)

    def abort(self) -> None:
        self.aborted = True
        for q in self._queues:
            q.put(_ABORT)

    def wait(self, need: int, timeout: float) -> None:
        """Return once `need` peers hold the payload; the rest go on in the background."""
        with self._cond:
            self._cond.wait_for(lambda: self._ok >= need or self._failed > self._total - need, timeout)
            if self._ok >= need:
                return
            acks, errors = self._ok, list(self._errors)
        raise Unavailable(
            f"payload reached {acks} of the {need} peers a majority needs"
            + (f" ({'; '.join(errors)})" if errors else "")
        )

    def _send(self, peer: Address, i: int) -> None:
        client, shard, size, q = self.client, self.shard, self.size, self._queues[i]
        outcome = "failed"
        sock: socket.socket | None = None
        try:
            sock = client._connect(peer)
            header = client._header("put_stream", shard, "", size)
            if self.kind == content_id.B3:  # absent: SHA-256, all a replica of an earlier version reads
                header["digest"] = content_id.B3
            _send_line(sock, header)
            sent = 0
            while True:
                item = q.get(timeout=STREAM_IDLE)  # Empty: the write was given up without abort()
                if item is _ABORT:
                    outcome = "aborted"
                    return
                if isinstance(item, _Signal):  # _END
                    break
                if self.aborted:
                    outcome = "aborted"
                    return
                sock.sendall(item)
                sent += len(item)
                client.traffic.add(str(peer), sent=len(item))
            if sent != size:
                raise ConnectionError(f"stream ended after {sent} of {size} bytes")
            pid = self.payload_id or ""  # set by finish(), which queued _END
            _send_line(sock, {"id": pid, "mac": client.auth.trailer_mac(shard, pid, size, header["nonce"])})
            reply = _read_line(sock)
            if not reply.get("ok"):
                raise ConnectionError(f"{peer} refused payload: {reply.get('error')}")
            outcome = "ok"
        except (OSError, ConnectionError, ValueError, queue.Empty) as e:
            self._errors.append(f"{peer}: {e!r}")
            log.info("payload stream to %s failed: %r", peer, e)
        finally:
            if sock is not None:
                sock.close()
            self._live[i] = False
            while True:  # drop what is still queued: views of the body
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
            with self._cond:
                if outcome == "ok":
                    self._ok += 1
                else:
                    self._failed += 1
                self._cond.notify_all()
