"""`ShardHost`: one shard as hosted on this replica, and who its members are."""

from __future__ import annotations

from dataclasses import dataclass

from . import membership
from .applier import Applier
from .config import NodeConfig
from .errors import ConfigError, Unavailable
from .payloads import PayloadStore
from .raft import ShardReplica
from .state import ShardState


@dataclass
class ShardHost:
    shard: int
    node: NodeConfig
    bootstrap_peers: list[str]  # raft addresses this shard started with
    directory: dict[str, NodeConfig]  # raft address (of this shard) -> node, from config/join plan
    applier: Applier
    payloads: PayloadStore
    replica: ShardReplica | None = None
    payload_bytes_since_snapshot: int = 0

    @property
    def state(self) -> ShardState:
        return self.applier.state

    def _member_addresses(self) -> list[str]:
        if self.replica is None:
            return sorted([*self.bootstrap_peers, str(self.node.raft_address(self.shard))])
        return self.replica.members()

    def nodes_by_raft(self) -> dict[str, NodeConfig]:
        """Every node known to host or have hosted this shard, by its raft address."""
        book = dict(self.directory)
        for record in list(self.state.members.values()):
            try:
                n = membership.node_of(record)
            except ConfigError:
                continue
            book[str(n.raft_address(self.shard))] = n
        return book

    @property
    def hosts(self) -> list[NodeConfig]:
        """Current voting members whose addresses are known (all, normally)."""
        book = self.nodes_by_raft()
        return [book[a] for a in self._member_addresses() if a in book]

    @property
    def peers(self) -> list[NodeConfig]:
        return [h for h in self.hosts if h.id != self.node.id]

    def node_id_of(self, raft_address: str | None) -> str | None:
        if raft_address is None:
            return None
        n = self.nodes_by_raft().get(raft_address)
        return raft_address if n is None else n.id

    def member_address(self, node_id: str) -> str | None:
        """Raft address of `node_id` for this shard if it is a voting member."""
        members = set(self._member_addresses())
        for addr, n in self.nodes_by_raft().items():
            if n.id == node_id and addr in members:
                return addr
        return None

    @property
    def majority(self) -> int:
        return len(self._member_addresses()) // 2 + 1

    def is_ready(self, max_lag: int = 256) -> bool:
        """A leader is known and this replica is within `max_lag` entries of
        the leader's commit index (exactly caught up flaps under write load)."""
        r = self.replica
        if r is None or r.leader_address is None:
            return False
        target = r.leader_commit_index
        return target is not None and r.raftLastApplied + max_lag >= target and self.applier.pending <= max_lag

    def raft(self) -> ShardReplica:
        """The shard's Raft replica, once started."""
        if self.replica is None:
            raise Unavailable("replica is starting")
        return self.replica
