"""What `api/` may ask of a replica's store: the `StoreAPI` protocol, which
`store.node.Store` implements, and the plain values it returns.

api/ types against this protocol and nothing else of store/'s internals (no
shard hosts, appliers or Raft replicas): the HTTP face can then be tested
against, or moved onto, anything that answers these calls.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .commands import Batch, TensorCommand
from .config import Config, NodeConfig
from .datapath import PayloadStream
from .partitions import Layout
from .record import Tensor
from .tables.service import TableService


@dataclass(frozen=True)
class ShardStats:
    """One hosted shard's Raft and state-machine figures (GET /metrics)."""

    shard: int
    role: str  # leader, follower or candidate
    leader: str | None  # node id, or a raft address not in the address book
    term: int
    commit_index: int
    applied_index: int
    ready: bool
    tensors: int
    bytes: int
    log_entries: int
    snapshots: int
    leader_changes: int
    last_snapshot_seconds: float
    last_snapshot_bytes: int
    applied_commands: int
    apply_seconds: float
    rounds_closed: int = 0  # synchronous rounds (store/sync_rounds.py), as applied here
    rounds_timed_out: int = 0
    late_grads_refused: int = 0


@dataclass(frozen=True)
class LinkBytes:
    """Bytes this replica exchanged with one peer on one channel since it started."""

    channel: str  # "raft" (all shards' Raft connections) or "data" (payloads, snapshots, tables)
    peer: str  # node id; "other" for a sender that named no known node
    received: int
    sent: int


@dataclass(frozen=True)
class Traffic:
    """Network figures for /metrics and /ui (store/traffic.py)."""

    links: list[LinkBytes]
    commits: int  # writes whose commit was measured since start
    commit_seconds: list[float]  # ascending: latencies (propose -> applied here) of the last `window` seconds
    replication_lag: dict[int, int]  # shard -> entries the slowest member is behind (see Store.traffic)


class StoreAPI(Protocol):
    """Writes, waits and barriers return Futures and never block on Raft;
    `add_member`/`remove_member` block (run them off the event loop)."""

    @property
    def cfg(self) -> Config: ...

    @property
    def node(self) -> NodeConfig: ...

    @property
    def tables(self) -> TableService: ...  # embedding tables (store/tables/service.py)

    @property
    def data_dir(self) -> Path: ...

    def start(self) -> None: ...

    def close(self) -> None: ...

    # ---- placement
    def shard_of(self, name: str) -> int: ...

    def hosts_of(self, shard: int) -> list[NodeConfig]: ...

    def hosted_shards(self) -> list[int]: ...

    # ---- writes
    def write(self, cmd: TensorCommand) -> Future[Any]: ...

    def write_batch(self, shard: int, batch: Batch) -> Future[Any]: ...

    def payload_stream(self, name: str, size: int) -> PayloadStream | None: ...

    def barrier(self, shard: int) -> Future[Any]: ...

    # ---- reads
    def get(self, name: str) -> tuple[Tensor, int]: ...

    def peek(self, name: str) -> tuple[Tensor, int]: ...

    def get_rows(self, name: str, rows: np.ndarray) -> tuple[np.ndarray, Tensor, int]: ...

    def layout(self, name: str) -> Layout | None: ...  # a partitioned tensor's layout (home shard), else None

    def watch(self, name: str, min_version: int) -> Future[Any]: ...

    def unwatch(self, name: str, fut: Future[Any]) -> None: ...

    def capture(self, shard: int) -> Future[dict[str, Tensor]]: ...

    def list_tensors(self) -> list[dict[str, Any]]: ...

    # ---- status
    def is_ready(self) -> bool: ...

    def status(self) -> dict[str, Any]: ...

    def shard_stats(self) -> list[ShardStats]: ...

    def traffic(self, window: float) -> Traffic: ...

    # ---- membership administration (blocking)
    def add_member(self, node: NodeConfig, shards: list[int] | None = None) -> dict[str, Any]: ...

    def remove_member(self, node_id: str, shards: list[int] | None = None) -> dict[str, Any]: ...
