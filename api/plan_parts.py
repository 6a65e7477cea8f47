"""Per-node shares of one tensor's bytes under the store's real placement, for
`paramstore plan --partitions K` and the simulated-network bench: part i of
tensor N sits in shard (blake2b(N) mod S + i) mod S with
store.partitions.row_counts rows, shard k is hosted by the `replication`
nodes from k mod nodes on (store.placement.hosts_for), and a part's pushes
and pulls go to its shard's leader (the SDK's parallel part requests), the
first of those hosts unless `leaders` says where they are now."""

from __future__ import annotations

import math
from collections.abc import Mapping

from paramstore.plan import PlanError
from store.partitions import auto_partitions, part_name, row_counts, shard_of
from store.placement import hosts_for

Shares = tuple[tuple[float, ...], tuple[float, ...]]


def partition_shares(
    name: str,
    rows: int,
    partitions: int,
    nodes: int,
    shards: int,
    replication: int,
    leaders: Mapping[int, int] | None = None,
) -> Shares:
    """(lead, host) fraction of the tensor's bytes per node; `leaders`: shard ->
    node index of its leader (default: the bootstrap leader, its first host)."""
    if not 1 <= partitions <= rows:
        raise PlanError(f"partitions must be in 1..rows ({rows}), got {partitions}")
    lead = [0.0] * nodes
    host = [0.0] * nodes
    for i, count in enumerate(row_counts(rows, partitions)):
        shard = shard_of(part_name(name, i), shards)  # part 0 sits on the tensor's own shard
        hosts = hosts_for(shard, range(nodes), replication)
        entry = (leaders or {}).get(shard, hosts[0])
        lead[entry] += count / rows
        for h in hosts:
            host[h] += count / rows
    return tuple(lead), tuple(host)


def partitions_for_mb(rows: int, nbytes: int, part_mb: float, shards: int) -> int:
    """The K the store picks for parts of about `part_mb` MB (at most one per
    shard and one per row): store.partitions.auto_partitions."""
    if not part_mb > 0:
        raise PlanError(f"--partition-mb must be positive, got {part_mb}")
    part_bytes = math.ceil(part_mb * 1e6)
    return auto_partitions((rows,), nbytes, part_bytes, part_bytes, shards)
