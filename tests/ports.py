"""Free loopback port ranges for test clusters."""
from __future__ import annotations

import random
import socket


def _free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_range(count: int, host: str = "127.0.0.1", *more_hosts: str) -> int:
    """A base port such that base..base+count-1 are all free right now (on
    every host given), below the ephemeral range: an outgoing connection's
    source port can otherwise be the very port a replica is about to listen
    on, and a replica connecting to a peer not listening yet then connects to
    itself (TCP simultaneous open) and talks Raft with its own echo."""
    top = min(_ephemeral_low(), 60000) - count
    for _ in range(500):
        base = random.randrange(10000, top)
        if all(_free(base + i, h) for h in (host, *more_hosts) for i in range(count)):
            return base
    raise RuntimeError("no free port range found")
