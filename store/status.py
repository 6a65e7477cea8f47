"""What `GET /v1/cluster` and `/metrics` report about this replica's shards."""

from __future__ import annotations

import time
from typing import Any

from .config import Config, NodeConfig
from .interface import LinkBytes, ShardStats, Traffic
from .routing import Routing
from .shardhost import ShardHost


def shard_stats(host: ShardHost) -> ShardStats | None:
    """None while the shard's replica is starting."""
    r = host.replica
    if r is None:
        return None
    return ShardStats(
        shard=host.shard,
        role=r.role,
        leader=host.node_id_of(r.leader_address),
        term=r.raftCurrentTerm,
        commit_index=r.raftCommitIndex,
        applied_index=r.raftLastApplied,
        ready=host.is_ready(),
        tensors=len(host.state.tensors),
        bytes=host.state.nbytes,
        log_entries=r.log_entries,
        snapshots=r.snapshots,
        leader_changes=r.leader_changes,
        last_snapshot_seconds=r.last_snapshot_seconds,
        last_snapshot_bytes=r.last_snapshot_bytes,
        applied_commands=host.applier.applied_count,
        apply_seconds=host.applier.apply_seconds,
        rounds_closed=host.state.round_stats["closed"],
        rounds_timed_out=host.state.round_stats["timed_out"],
        late_grads_refused=host.state.round_stats["late_refused"],
    )


def traffic(routing: Routing, datapath: dict[str, tuple[int, int]], window: float) -> Traffic:
    """Raft bytes per peer (summed over shards), data-path bytes per peer
    (`datapath`: keys are peers' data addresses or the node ids they sent),
    commit latencies of the last `window` seconds, replication lag per shard."""
    links: dict[tuple[str, str], list[int]] = {}
    by_data: dict[str, str] = {}
    known: set[str] = set()
    commits, latencies, lag = 0, [], {}
    for shard, host in sorted(routing.shards.items()):
        book = host.nodes_by_raft()
        for n in book.values():
            by_data[str(n.data)] = n.id
            known.add(n.id)
        r = host.replica
        if r is None:
            continue
        for addr, (received, sent) in list(r.link_bytes.items()):
            node = book.get(addr)
            counts = links.setdefault(("raft", addr if node is None else node.id), [0, 0])
            counts[0] += received
            counts[1] += sent
        commits += r.commit_latency.count
        latencies.extend(r.commit_latency.recent(window))
        lag[shard] = r.replication_lag()
    for key, (received, sent) in datapath.items():
        counts = links.setdefault(("data", by_data.get(key) or (key if key in known else "other")), [0, 0])
        counts[0] += received
        counts[1] += sent
    return Traffic(
        links=[LinkBytes(channel, peer, c[0], c[1]) for (channel, peer), c in sorted(links.items())],
        commits=commits,
        commit_seconds=sorted(latencies),
        replication_lag=lag,
    )


def hosted_stats(routing: Routing) -> list[ShardStats]:
    stats = (shard_stats(host) for _, host in sorted(routing.shards.items()))
    return [s for s in stats if s is not None]


STATUS_FIELDS = (
    "leader",
    "term",
    "commit_index",
    "applied_index",
    "role",
    "ready",
    "tensors",
    "bytes",
    "log_entries",
    "snapshots",
    "leader_changes",
)


def cluster_status(cfg: Config, routing: Routing, started: float) -> dict[str, Any]:
    """Every shard's replicas, with the Raft figures of those hosted here."""
    shards = []
    nodes: dict[str, NodeConfig] = {} if routing.shards else {n.id: n for n in cfg.nodes}
    for shard in range(cfg.shards):
        hosts = routing.hosts_of(shard)
        entry: dict[str, Any] = {"shard": shard, "replicas": [h.id for h in hosts]}
        host = routing.shards.get(shard)
        stats = shard_stats(host) if host is not None else None
        if stats is not None:
            nodes.update({h.id: h for h in hosts})
            entry.update({f: getattr(stats, f) for f in STATUS_FIELDS})
        shards.append(entry)
    return {
        "node": cfg.node.id,
        "shards": shards,
        "nodes": [
            {"id": n.id, "url": n.url, "http": str(n.http), "raft": str(n.raft), "data": str(n.data)}
            for n in sorted(nodes.values(), key=lambda n: n.id)
        ],
        "replication": cfg.replication,
        "ready": is_ready(routing),
        "uptime_seconds": round(time.monotonic() - started, 3),
    }


def is_ready(routing: Routing) -> bool:
    return all(h.is_ready() for h in routing.shards.values())
