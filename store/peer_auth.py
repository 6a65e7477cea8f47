"""Authentication of data-path requests between replicas (store/datapath.py).

Every request header carries a timestamp, a random nonce and an HMAC-SHA256
of both and of what it asks, under the cluster secret. A server accepts a
header only if its MAC verifies, its timestamp is within `WINDOW` seconds of
its own clock, and it has not seen the nonce before: a captured header cannot
be replayed, neither at once (the nonce is remembered) nor later (the
timestamp is too old by the time the nonce is forgotten). A `put_stream`
trailer's MAC covers the header's nonce, so it cannot be spliced onto another
stream. Replicas' clocks must agree within `WINDOW` (NTP does far better).

Replies that carry state (`snapshot`, `tables`) are signed too, bound to the
request's nonce: a head MAC before the first byte, and a trailer MAC over the
digest of every byte streamed (keyed BLAKE3, or SHA-256 with replicas of
earlier versions: store/stream_digest.py), which the receiver computes as the
bytes arrive and checks before it installs anything. Someone who binds a dead peer's data port
cannot feed a joiner a forged snapshot, nor replay an old authentic one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from .stream_digest import StreamDigest, stream_key

WINDOW = 60.0  # seconds a header stays valid either side of the server's clock
MAX_REMEMBERED = 1_000_000  # nonces held at once (~8,000 requests/s over 2 windows); beyond, refuse


def datapath_key(cluster_secret: str) -> bytes:
    """The data path's MAC key, derived from the cluster secret (raft.password)."""
    return hashlib.sha256(b"paramstore-datapath:" + cluster_secret.encode()).digest()


class PeerAuth:
    def __init__(self, secret: bytes, window: float = WINDOW, max_remembered: int = MAX_REMEMBERED) -> None:
        if not secret:
            raise ValueError("the data path needs a non-empty cluster secret")
        self._secret = secret
        self._stream_key = stream_key(secret)
        self.window = window
        self._max = max_remembered
        self._seen: dict[str, float] = {}  # nonce -> when it may be forgotten (its timestamp + window)
        self._lock = threading.Lock()
        self._next_prune = 0.0

    def _mac(self, *parts: object) -> str:
        return hmac.new(self._secret, ":".join(map(str, parts)).encode(), hashlib.sha256).hexdigest()

    def header(self, op: str, shard: int, payload_id: str, size: int) -> dict[str, Any]:
        """A request header for `op`, signed, fresh."""
        ts, nonce = round(time.time(), 3), os.urandom(16).hex()
        return {
            "op": op,
            "shard": shard,
            "id": payload_id,
            "size": size,
            "ts": ts,
            "nonce": nonce,
            "mac": self._mac(op, shard, payload_id, size, ts, nonce),
        }

    def trailer_mac(self, shard: int, payload_id: str, size: int, nonce: str) -> str:
        return self._mac("put_stream_end", shard, payload_id, size, nonce)

    def check_trailer(self, msg: Mapping[str, Any], shard: int, size: int, nonce: str) -> bool:
        pid = str(msg.get("id", ""))
        return hmac.compare_digest(self.trailer_mac(shard, pid, size, nonce), str(msg.get("mac", "")))

    def reply_head_mac(self, op: str, shard: int, nonce: str, size: int | None) -> str:
        """The MAC of a `snapshot` / `tables` reply's head line (`size`: None
        when the length is not known in advance)."""
        return self._mac(op + "_reply", shard, nonce, size)

    def stream_digest(self, alg: str) -> StreamDigest:
        """A hasher for a signed reply's bytes (`alg`: store/stream_digest.py), keyed by the cluster secret."""
        return StreamDigest(alg, self._stream_key)

    def reply_end_mac(self, op: str, shard: int, nonce: str, size: int, digest: str) -> str:
        """The MAC of the trailer after a reply's `size` bytes with `digest`
        (StreamDigest.hexdigest: the algorithm's name is part of it)."""
        return self._mac(op + "_reply_end", shard, nonce, size, digest)

    @staticmethod
    def same(expected: str, msg: Mapping[str, Any]) -> bool:
        return hmac.compare_digest(expected, str(msg.get("mac", "")))

    def check_header(self, msg: Mapping[str, Any]) -> str | None:
        """None if `msg` is an authentic, fresh header never seen before (its
        nonce is then remembered); otherwise why it is refused."""
        ts, nonce = msg.get("ts"), msg.get("nonce")
        if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not isinstance(nonce, str) or not nonce:
            return "authentication failed: no timestamp or nonce"
        expected = self._mac(msg.get("op"), msg.get("shard"), msg.get("id", ""), msg.get("size", 0), ts, nonce)
        if not hmac.compare_digest(expected, str(msg.get("mac", ""))):
            return "authentication failed"
        now = time.time()
        if not abs(now - ts) <= self.window:  # `not <=`: NaN is refused too
            return f"authentication failed: timestamp {now - ts:+.0f} s off this replica's clock"
        with self._lock:
            if now >= self._next_prune:
                self._seen = {n: t for n, t in self._seen.items() if t > now}
                self._next_prune = now + 1.0
            if nonce in self._seen:
                return "authentication failed: replayed request"
            if len(self._seen) >= self._max:
                return "authentication failed: too many requests to remember"
            self._seen[nonce] = ts + self.window
        return None
