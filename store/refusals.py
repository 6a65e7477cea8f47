"""Log lines for refused peer input (Raft frames, data-path requests): one per
peer at once, then at most one per `INTERVAL` per peer counting the refusals
in between, never a traceback, and at most `ECHO` bytes of the input. A
hostile or broken peer must not be able to fill the log or the disk."""

from __future__ import annotations

import logging
import threading
import time

INTERVAL = 60.0
ECHO = 200
MAX_PEERS = 1024  # peers tracked at once; the rest share one entry


def clip(value: object, limit: int = ECHO) -> str:
    """`value` as text, cut to `limit` characters (its repr for non-strings)."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


class RefusalLog:
    def __init__(self, logger: logging.Logger, what: str, interval: float = INTERVAL) -> None:
        self._log = logger
        self._what = what
        self._interval = interval
        self._lock = threading.Lock()
        self._peers: dict[str, tuple[float, int]] = {}  # peer -> (last line logged, refusals since)

    def refused(self, peer: str, reason: object) -> bool:
        """Record one refusal from `peer`; returns whether a line was logged."""
        now = time.monotonic()
        with self._lock:
            if peer not in self._peers and len(self._peers) >= MAX_PEERS:
                self._peers = {p: v for p, v in self._peers.items() if now - v[0] < self._interval}
                if len(self._peers) >= MAX_PEERS:
                    peer = "(other peers)"
            last, since = self._peers.get(peer, (-self._interval, 0))
            if now - last < self._interval:
                self._peers[peer] = (last, since + 1)
                return False
            self._peers[peer] = (now, 0)
        more = f" ({since} more since the last line)" if since else ""
        self._log.warning("refused %s from %s: %s%s", self._what, clip(peer, 64), clip(reason), more)
        return True
