"""`RoundTimer`: the leader's clock for synchronous rounds' `round_timeout`.

The state machine never reads a clock (store/sync_rounds.py). On each shard
this replica leads, this thread watches the open rounds and, once a round has
been open here for its `round_timeout`, proposes a `RoundClose` for it; where
the command lands in the log decides what the round closed with, identically
on every replica. Rounds opened by the same command (a batch push of a set of
tensors) close in one command, so the set stays in step.

A new leader starts timing the open rounds when it first sees them: after a
failover a round may stay open up to one `round_timeout` longer than asked.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

from .commands import RoundClose
from .shardhost import ShardHost
from .threadnames import name_this_thread

log = logging.getLogger(__name__)

PERIOD = 0.05  # seconds between looks at the open rounds
RETRY_AFTER = 1.0  # seconds before proposing a close again if the round is still open


class RoundTimer:
    def __init__(self, hosts: Callable[[], Iterable[ShardHost]], closed: threading.Event) -> None:
        self._hosts = hosts
        self._closed = closed
        # per shard led here: opened stamp -> [first seen (monotonic), last proposed or None]
        self._seen: dict[int, dict[int, list[float | None]]] = {}
        self._thread = threading.Thread(target=self._run, name="round-timer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        name_this_thread("round-timer")
        while not self._closed.wait(PERIOD):
            for host in self._hosts():
                try:
                    self.check(host, time.monotonic())
                except Exception:  # a bug: keep timing the other shards
                    log.exception("round timer: shard %d", host.shard)

    def check(self, host: ShardHost, now: float) -> list[RoundClose]:
        """Propose the closes that are due on `host` (if this replica leads
        it) at monotonic time `now`; returns them."""
        r = host.replica
        if r is None or r.role != "leader":
            self._seen.pop(host.shard, None)
            return []
        seen = self._seen.setdefault(host.shard, {})
        state = host.state
        due: dict[int, list[tuple[str, int]]] = {}
        still_open: set[int] = set()
        for name in list(state.open_rounds):
            t = state.tensors.get(name)
            if t is None or t.round is None or t.sync is None or t.sync["round_timeout"] is None:
                continue
            stamp = t.round.opened
            still_open.add(stamp)
            first, proposed = seen.setdefault(stamp, [now, None])
            assert first is not None
            if now - first >= t.sync["round_timeout"] and (proposed is None or now - proposed >= RETRY_AFTER):
                due.setdefault(stamp, []).append((name, t.version))
        for stamp in set(seen) - still_open:
            del seen[stamp]
        proposed_now = []
        for stamp, rounds in sorted(due.items()):
            seen[stamp][1] = now
            cmd = RoundClose(rounds=tuple(sorted(rounds)))
            r.propose(cmd).add_done_callback(_log_failure)
            proposed_now.append(cmd)
        return proposed_now


def _log_failure(fut: Future[Any]) -> None:
    err = fut.exception()
    if err is not None:  # the next look proposes it again while the round stays open
        log.warning("round timer: a round close was not applied: %s", err)
