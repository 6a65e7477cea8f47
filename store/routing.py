"""Which shard a tensor lives in, which shards this replica hosts, and which
nodes host the others (the target of a 307 for a shard not hosted here)."""

from __future__ import annotations

from . import membership, partitions, placement
from .config import Config, NodeConfig
from .errors import NotHosted
from .shardhost import ShardHost


def placed_shards(
    cfg: Config, file: membership.MembershipFile, join: membership.JoinPlan | None
) -> dict[int, list[str]]:
    """shard -> bootstrap peers (raft addresses) of every shard hosted here:
    recorded membership wins over a join plan, which wins over the config."""
    node = cfg.node
    if file.exists():
        return file.load()
    if join is not None:
        return {k: [str(n.raft_address(k)) for n in members if n.id != node.id] for k, members in join.shards.items()}
    placed: dict[int, list[str]] = {}
    for shard in range(cfg.shards):
        hosts = placement.hosts_for(shard, list(cfg.nodes), cfg.replication)
        if node in hosts:
            placed[shard] = [str(h.raft_address(shard)) for h in hosts if h != node]
    return placed


class Routing:
    """The shards hosted here (`shards`, filled in as they are built) and the
    way to any shard's hosts."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.shards: dict[int, ShardHost] = {}

    def shard_of(self, name: str) -> int:
        """A tensor's shard; a part `<name>#p<i>` of a partitioned tensor is placed after its home."""
        return partitions.shard_of(name, self.cfg.shards)

    def hosts_of(self, shard: int) -> list[NodeConfig]:
        """The shard's current members if hosted here, else its bootstrap placement."""
        host = self.shards.get(shard)
        if host is not None:
            return host.hosts
        return placement.hosts_for(shard, list(self.cfg.nodes), self.cfg.replication)

    def host(self, shard: int) -> ShardHost:
        """The shard's host here; NotHosted (naming who hosts it) or
        Unavailable while its replica starts."""
        host = self.shards.get(shard)
        if host is None:
            raise NotHosted(
                f"shard {shard} is not hosted on {self.cfg.node.id}", hosts=[h.url for h in self.hosts_of(shard)]
            )
        host.raft()
        return host

    def host_of(self, name: str) -> ShardHost:
        return self.host(self.shard_of(name))
