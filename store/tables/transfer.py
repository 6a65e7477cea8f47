"""Moving a shard's tables to a replica that did not apply the log itself:
a joining replica, and a follower that pysyncobj brought up to date with a
snapshot. Either fetches a checkpoint of the tables (data-path op `tables`)
that is at or past the Raft snapshot it starts from; the log replayed after
the snapshot then skips what the tables hold (their stamps)."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..config import NodeConfig
from ..datapath import DataPathClient
from ..errors import StoreError, Unavailable
from ..membership import JoinPlan
from ..shardhost import ShardHost
from .engine import MemoryBudget
from .registry import Tables

log = logging.getLogger(__name__)

ShardDir = Callable[[int], Path]


def install(host: ShardHost, fetched: Path, live: Path, budget: MemoryBudget, fsync: bool) -> None:
    """Replace the shard's tables with a fetched checkpoint (applier thread, or before Raft starts)."""
    state = host.state
    if state.tables is not None:
        state.tables.close()
    shutil.rmtree(live, ignore_errors=True)
    os.replace(fetched, live)
    state.tables = Tables(live, budget, fsync)


def download_for_join(
    plan: JoinPlan,
    client: DataPathClient,
    shard_dir: ShardDir,
    hosts: dict[int, ShardHost],
    budget: MemoryBudget,
    fsync: bool,
) -> None:
    """Every shard's tables from its snapshot source, after the snapshots."""

    def one(shard: int, source: NodeConfig) -> None:
        fetched = shard_dir(shard) / "tables.fetching"
        shutil.rmtree(fetched, ignore_errors=True)
        size = client.fetch_tables(source.data, shard, fetched)
        install(hosts[shard], fetched, shard_dir(shard) / "tables", budget, fsync)
        log.info("joining: shard %d tables from %s, %d bytes", shard, source.id, size, extra={"shard": shard})

    with ThreadPoolExecutor(max_workers=max(1, len(plan.snapshot_sources))) as pool:
        for fut in [pool.submit(one, k, src) for k, src in sorted(plan.snapshot_sources.items())]:
            fut.result()


def checkpoint_for_peer(host: ShardHost, shard_dir: Path) -> Path:
    """Data path thread: a checkpoint of the shard's tables as of now, taken
    between two commands on the applier thread (hard links, no copying);
    the data path deletes it once sent."""
    tables = host.state.tables
    if tables is None:
        raise Unavailable("this replica keeps no embedding tables")
    dest = shard_dir / f"tables-out-{uuid.uuid4().hex}"
    host.applier.call(lambda: tables.checkpoint(dest)).result(timeout=300)
    return dest


def refresher(
    host: ShardHost,
    node: NodeConfig,
    client: DataPathClient,
    shard_dir: Path,
    budget: MemoryBudget,
    fsync: bool,
    closed: threading.Event,
) -> Callable[[int], None]:
    """The hook run on the applier thread after a snapshot the leader sent:
    the tables may have missed commands that the snapshot covers, so the
    leader's (at or past the snapshot) replace them before any later command."""

    def refresh(index: int) -> None:
        fetched = shard_dir / "tables.fetching"
        for attempt in range(20):
            replica = host.replica
            leader = host.nodes_by_raft().get(str(replica.leader_address)) if replica is not None else None
            if leader is not None and leader.id != node.id:
                try:
                    shutil.rmtree(fetched, ignore_errors=True)
                    size = client.fetch_tables(leader.data, host.shard, fetched)
                    install(host, fetched, shard_dir / "tables", budget, fsync)
                    log.info(
                        "shard %d: tables from %s after the snapshot at %d, %d bytes",
                        host.shard,
                        leader.id,
                        index,
                        size,
                    )
                    return
                except (OSError, StoreError) as e:
                    log.warning("shard %d: fetching tables from %s failed: %s", host.shard, leader.id, e)
            if closed.wait(min(2.0, 0.1 * 2**attempt)):
                return
        log.error("shard %d: no leader sent its tables after the snapshot at %d; they may be stale", host.shard, index)

    return refresh
