"""Outgoing connections from this node's own address, and port sanity checks.

On one host with replicas on 127.0.0.1/2/3, Linux picks 127.0.0.1 as the
source of every loopback connection, so per-address network rules (and the
peers' view of who is calling) would be wrong: connections bind to the node's
address first (pysyncobj's through store/pysyncobj_adapter.py).
"""

from __future__ import annotations

import ipaddress
import logging


def _is_ipv4_literal(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv4Address)
    except ValueError:
        return False


def source_address(host: str) -> tuple[str, int] | None:
    """For socket.create_connection: bind to `host` when it is an IPv4 literal."""
    return (host, 0) if _is_ipv4_literal(host) and host != "0.0.0.0" else None


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' source ports."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split()[:2])
            return low, high
    except (OSError, ValueError):
        return 32768, 60999


def warn_if_ephemeral(ports: dict[str, int], log: logging.Logger) -> None:
    """A listening port inside the ephemeral range can be taken as the source
    port of an outgoing connection before the replica binds it; a peer
    connecting to it meanwhile may even connect to itself."""
    low, high = ephemeral_range()
    inside = [f"{what} {port}" for what, port in ports.items() if low <= port <= high]
    if inside:
        log.warning(
            "ports inside the kernel's ephemeral range %d-%d (%s): prefer ports below %d",
            low,
            high,
            ", ".join(inside),
            low,
        )
