"""Free loopback port ranges for test clusters."""

from __future__ import annotations

import random
import socket

from store.sockets import ephemeral_range


def _free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def free_range(count: int, host: str = "127.0.0.1", *more_hosts: str) -> int:
    """A base port such that base..base+count-1 are all free right now (on
    every host given), below the ephemeral range: an outgoing connection's
    source port can otherwise be the very port a replica is about to listen
    on, and a replica connecting to a peer not listening yet then connects to
    itself (TCP simultaneous open) and talks Raft with its own echo."""
    top = min(ephemeral_range()[0], 60000) - count
    for _ in range(500):
        base = random.randrange(10000, top)
        if all(_free(base + i, h) for h in (host, *more_hosts) for i in range(count)):
            return base
    raise RuntimeError("no free port range found")
