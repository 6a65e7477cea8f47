"""Snapshots for joining replicas: the joiner downloads a fresh one of every
shard before its replicas start; a source writes one on demand and holds its
log until the joiner has caught up (docs/architecture.md, "Joining")."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .config import NodeConfig
from .datapath import DataPathClient
from .errors import Unavailable
from .membership import JoinPlan
from .shardhost import ShardHost

log = logging.getLogger(__name__)

JOIN_CATCH_UP_SECONDS = 120.0  # how long a snapshot source keeps its log for the joiner


def download_snapshots(plan: JoinPlan, client: DataPathClient, shard_dir: Callable[[int], Path]) -> None:
    """All shards at once: each source first writes a fresh snapshot."""

    def one(shard: int, source: NodeConfig) -> None:
        started = time.monotonic()

        def progress(got: int, size: int) -> None:
            log.info("joining: shard %d snapshot %d/%d MB", shard, got >> 20, size >> 20, extra={"shard": shard})

        size = client.fetch_snapshot(source.data, shard, shard_dir(shard) / "snapshot.bin", progress=progress)
        log.info(
            "joining: shard %d snapshot from %s, %d bytes in %.2fs",
            shard,
            source.id,
            size,
            time.monotonic() - started,
            extra={"shard": shard},
        )

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, len(plan.snapshot_sources))) as pool:
        for fut in [pool.submit(one, k, src) for k, src in sorted(plan.snapshot_sources.items())]:
            fut.result()
    log.info("joining: %d snapshots downloaded in %.2fs", len(plan.snapshot_sources), time.monotonic() - started)


def fresh_snapshot(host: ShardHost, path: Path, max_wait: float, closed: threading.Event) -> Path:
    """Data path thread: `path`, a snapshot at most a few entries behind this
    replica's applied index, for a joining replica to start from; or, while
    an earlier join holds compaction, the snapshot it got."""
    replica = host.raft()
    if replica.compaction_held():
        # Another join is under way, or was abandoned after its download: the
        # log after the last snapshot is kept for it, so this joiner can start
        # from that snapshot too. A fresh one would need a compaction, which
        # the hold forbids (it used to wait here until the deadline).
        replica.hold_compaction(replica.last_snapshot_index, JOIN_CATCH_UP_SECONDS)
        if replica.compaction_held():
            log.info("shard %d: a joiner gets the snapshot an earlier join holds the log for", host.shard)
            return path
    target = replica.raftLastApplied
    deadline = time.monotonic() + max_wait
    if replica.last_snapshot_index < target:
        replica.forceLogCompaction()
        while replica.last_snapshot_index < target:
            if time.monotonic() > deadline or closed.is_set():
                raise Unavailable(f"shard {host.shard}: no snapshot within the deadline")
            closed.wait(0.01)
    replica.hold_compaction(replica.last_snapshot_index, JOIN_CATCH_UP_SECONDS)
    return path
