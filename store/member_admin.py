"""Adding and removing voting members of the shards hosted here (admin
requests; blocking, so run off the event loop). docs/architecture.md,
"Membership changes", has the whole procedure."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from pysyncobj.utility import TcpUtility, UtilityException

from . import membership
from .commands import MemberDrop, MemberSet
from .config import Config, NodeConfig
from .errors import Conflict, Timeout, Unavailable
from .routing import Routing
from .shardhost import ShardHost

log = logging.getLogger(__name__)


class MemberAdmin:
    def __init__(self, cfg: Config, routing: Routing, closed: threading.Event) -> None:
        self.cfg = cfg
        self.node = cfg.node
        self.routing = routing
        self._closed = closed

    def add_member(self, node: NodeConfig, shards: list[int] | None = None) -> dict[str, Any]:
        """Make `node` a voting member of `shards` (default: every shard hosted
        here). Start the new replica with `--join` first: it downloads a
        snapshot over the data path and then waits to be added. Idempotent."""
        deadline = time.monotonic() + self.cfg.limits.max_wait_seconds
        results = []
        for shard in self._admin_targets(shards):
            host = self.routing.host(shard)
            replica = host.raft()
            addr = str(node.raft_address(shard))
            known = host.member_address(node.id)
            if known is not None and known != addr:
                raise Conflict(
                    f"shard {shard}: node {node.id!r} is already a member at {known}; "
                    "remove it first to change its addresses"
                )
            self._wait(replica.propose(MemberSet(**membership.record_of(node))), deadline)
            if addr in replica.members():
                results.append({"shard": shard, "status": "already a member"})
                continue
            self._change_member(host, "add", addr, deadline)
            results.append({"shard": shard, "status": "added"})
            log.info("shard %d: added node %s (%s)", shard, node.id, addr, extra={"shard": shard})
        return {"node": node.id, "shards": results}

    def remove_member(self, node_id: str, shards: list[int] | None = None) -> dict[str, Any]:
        """Remove `node_id` from `shards` (default: every shard hosted here);
        if it leads a shard, leadership is moved away first. Idempotent."""
        deadline = time.monotonic() + self.cfg.limits.max_wait_seconds
        results = []
        for shard in self._admin_targets(shards):
            host = self.routing.host(shard)
            replica = host.raft()
            addr = host.member_address(node_id)
            if addr is None:
                results.append({"shard": shard, "status": "not a member"})
                continue
            if len(replica.members()) == 1:
                raise Conflict(f"shard {shard}: {node_id!r} is its last member")
            self._move_leadership_from(host, addr, deadline)
            self._change_member(host, "rem", addr, deadline)
            if node_id != self.node.id:  # a removed replica can no longer commit anything
                self._wait(replica.propose(MemberDrop(id=node_id)), deadline)
            results.append({"shard": shard, "status": "removed"})
            log.info("shard %d: removed node %s (%s)", shard, node_id, addr, extra={"shard": shard})
        return {"node": node_id, "shards": results}

    def _admin_targets(self, shards: list[int] | None) -> list[int]:
        targets = sorted(self.routing.shards) if shards is None else sorted(set(shards))
        for shard in targets:
            self.routing.host(shard)  # NotHosted / Unavailable before changing anything
        return targets

    def _wait(self, fut: Future[Any], deadline: float) -> Any:
        try:
            return fut.result(max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            raise Timeout(
                "membership change: no answer before the deadline; check `paramstore status` "
                "and retry (changes are idempotent)"
            ) from None

    def _change_member(self, host: ShardHost, kind: str, addr: str, deadline: float) -> None:
        """One change at a time per shard: retry while a previous one commits."""
        replica = host.raft()
        delay = 0.05
        while True:
            try:
                self._wait(replica.change_member(kind, addr), deadline)
                return
            except (Conflict, Unavailable) as e:
                done = (addr in replica.members()) == (kind == "add")
                if done:
                    return
                if time.monotonic() + delay > deadline:
                    raise e
            self._closed.wait(delay)
            delay = min(delay * 2, 0.5)

    def _move_leadership_from(self, host: ShardHost, addr: str, deadline: float) -> None:
        """pysyncobj cannot remove a leader: ask it to hand over (Raft TimeoutNow)."""
        replica = host.raft()
        while replica.leader_address in (addr, None):
            if time.monotonic() > deadline:
                raise Timeout(f"shard {host.shard}: leadership did not move away from {addr}; retry")
            if replica.leader_address == addr:
                if addr == str(self.node.raft_address(host.shard)):
                    replica.transferLeadership()
                else:
                    try:
                        TcpUtility(self.cfg.raft.password, timeout=2.0).executeCommand(addr, ["transfer", None])
                    except UtilityException as e:
                        log.info("shard %d: asking %s to hand over leadership: %s", host.shard, addr, e)
            self._closed.wait(0.2)
