"""Bytes moved between replicas and the latency of recent commits: what
/metrics and /ui report about the network (issue 14, item 5).

Bytes are counted where a buffer changes hands (a socket send or recv, a
payload of known size): one addition per call, never work per byte. Raft
bytes are counted by the transport (store/pysyncobj_adapter.py,
`CountingTransport`); data-path bytes here, by store/datapath.py.
"""

from __future__ import annotations

import threading
import time
from collections import deque

# A link's counts: [bytes received, bytes sent]. Raft's are plain lists, each
# written by one shard's tick thread only; the data path's go through DataPathTraffic.
Counts = list[int]


class DataPathTraffic:
    """Data-path payload bytes by peer. Many threads transfer at once (one
    per connection), each adding once per payload or chunk: a lock is cheap there."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, Counts] = {}

    def add(self, peer: str, received: int = 0, sent: int = 0) -> None:
        with self._lock:
            counts = self._counts.setdefault(peer, [0, 0])
            counts[0] += received
            counts[1] += sent

    def snapshot(self) -> dict[str, tuple[int, int]]:
        with self._lock:
            return {peer: (c[0], c[1]) for peer, c in self._counts.items()}


class LatencyWindow:
    """The last `size` commit latencies with the time each was taken, so that
    quantiles are over the recent seconds, not since start."""

    def __init__(self, size: int = 4096) -> None:
        self._lock = threading.Lock()
        self._samples: deque[tuple[float, float]] = deque(maxlen=size)
        self.count = 0  # commits measured since start

    def add(self, seconds: float) -> None:
        with self._lock:
            self._samples.append((time.monotonic(), seconds))
            self.count += 1

    def recent(self, window: float) -> list[float]:
        """Latencies of the commits of the last `window` seconds."""
        since = time.monotonic() - window
        with self._lock:
            return [s for t, s in self._samples if t >= since]


def quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of an ascending list (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = min(len(sorted_values) - 1, max(0, int(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]
