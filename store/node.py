"""`Store`: everything one replica hosts, and the facade `api/` calls
(through the `store.interface.StoreAPI` protocol, which it implements).

It builds and starts one ShardHost (state, applier, Raft replica, payload
store) per shard placed on this node, the data path, and the owners of each
concern: `Routing` (which shard, hosted where), `PayloadStaging` (payload
bytes around a write), `MemberAdmin` (membership changes), `joining`
(snapshots for joiners), `status`. Methods never block on Raft: writes and
waits return `concurrent.futures.Future`s that the caller awaits however it
likes (the HTTP layer bridges them to asyncio).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import content_id, joining, membership, status
from .applier import Applier
from .commands import Batch, Command, Noop, TensorCommand
from .config import Config, NodeConfig
from .datapath import DataPathClient, DataPathServer, PayloadStream
from .errors import ConfigError, Unavailable
from .interface import ShardStats, Traffic
from .journal import check_journal
from .member_admin import MemberAdmin
from .partitions import Layout, describe_partitioned, parse_part
from .payloads import PayloadStore
from .peer_auth import datapath_key
from .pysyncobj_adapter import bind_outgoing_raft, count_raft_bytes
from .raft import ShardReplica
from .record import Tensor
from .round_timer import RoundTimer
from .routing import Routing, placed_shards
from .shardhost import ShardHost
from .snapshot import read_snapshot
from .sockets import source_address, warn_if_ephemeral
from .staging import PayloadStaging
from .state import ShardState
from .tables import transfer as table_transfer
from .tables.engine import MemoryBudget
from .tables.registry import Tables
from .tables.service import TableService

if TYPE_CHECKING:
    from .interface import StoreAPI

log = logging.getLogger(__name__)


class Store:
    def __init__(self, cfg: Config, join: membership.JoinPlan | None = None) -> None:
        if cfg.data_dir is None:
            raise ConfigError("node.data_dir: a data directory is required (--data-dir)")
        if not cfg.raft.password:
            # loopback included: any local user can reach a loopback port
            raise ConfigError(
                "raft.password: a cluster secret is required on every replica, loopback included: it "
                "authenticates the Raft and data-path ports, whose peers could otherwise run code in "
                "this process (set PARAMSTORE_RAFT_PASSWORD, e.g. to $(openssl rand -hex 24); "
                "`paramstore dev` generates one)"
            )
        self.cfg = cfg
        content_id.choose(cfg.limits.payload_ids)  # one setting for the process: api/wire.py names bodies too
        self.node: NodeConfig = cfg.node
        self.data_dir = Path(cfg.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        secret = datapath_key(cfg.raft.password)
        self.peer_client = DataPathClient(
            secret,
            source=source_address(self.node.data.host),
            max_size=cfg.limits.max_body_bytes,
            origin=self.node.id,
        )
        self._closed = threading.Event()
        self.routing = Routing(cfg)
        self.staging = PayloadStaging(cfg, self.routing, self.peer_client, self._closed)
        self.admin = MemberAdmin(cfg, self.routing, self._closed)
        self.round_timer = RoundTimer(lambda: list(self.shards.values()), self._closed)
        self.table_budget = MemoryBudget(cfg.limits.table_cache_bytes)  # all tables' block cache
        self._tables = TableService(self, cfg.limits.table_max_ids, self.table_budget)
        self.membership = membership.MembershipFile(self.data_dir)
        self.join = join if not self.membership.exists() else None
        if join is not None and self.join is None:
            log.info("node %s: already joined (%s exists); --join ignored", self.node.id, self.membership.path)
        for shard, peers in placed_shards(cfg, self.membership, self.join).items():
            self.routing.shards[shard] = self._build_host(shard, peers)
        warn_if_ephemeral(
            {
                **{f"raft (shard {k})": self.node.raft_address(k).port for k in self.shards},
                "data": self.node.data.port,
                "http": self.node.http.port,
            },
            log,
        )
        self.datapath = DataPathServer(
            self.node.data,
            {k: h.payloads for k, h in self.shards.items()},
            secret,
            max_size=cfg.limits.max_body_bytes,
            snapshot_source=self._snapshot_for_joiner,
            tables_source=lambda shard: table_transfer.checkpoint_for_peer(
                self.routing.host(shard), self._shard_dir(shard)
            ),
        )

    @property
    def shards(self) -> dict[int, ShardHost]:
        return self.routing.shards

    def _build_host(self, shard: int, peers: list[str]) -> ShardHost:
        directory = {str(n.raft_address(shard)): n for n in self.cfg.nodes}
        if self.join is not None:
            directory.update({str(n.raft_address(shard)): n for n in self.join.shards[shard]})
        payloads = PayloadStore(self._shard_dir(shard) / "payloads", fsync=self.cfg.raft.fsync)
        applier = Applier(
            ShardState(shard, self.cfg.limits.dedupe_window),
            self.staging.resolver(shard, payloads),
            self.staging.payload_used(shard, payloads),
        )
        applier.state.tables = Tables(self._shard_dir(shard) / "tables", self.table_budget, self.cfg.raft.fsync)
        return ShardHost(shard, self.node, peers, directory, applier, payloads)

    def start(self) -> None:
        """Join (download snapshots) if asked, load snapshots (refusing corrupt
        ones), bind the data path, start Raft."""
        if self.join is not None:
            joining.download_snapshots(self.join, self.peer_client, self._shard_dir)
            table_transfer.download_for_join(
                self.join, self.peer_client, self._shard_dir, self.shards, self.table_budget, self.cfg.raft.fsync
            )
        if not self.membership.exists() and self.join is None:
            self._record_membership()
        preloaded = {}
        for shard in self.shards:
            check_journal(self._shard_dir(shard) / "journal.bin")  # refuses a damaged one
            dump = self._shard_dir(shard) / "snapshot.bin"
            if dump.exists():
                preloaded[shard] = read_snapshot(dump, self.cfg.limits.dedupe_window)
        self.datapath.start()
        count_raft_bytes()
        bind_outgoing_raft(self.node.raft.host)
        for shard, host in self.shards.items():
            host.replica = ShardReplica(
                shard,
                self.node.raft_address(shard),
                host.bootstrap_peers,
                self.cfg.raft,
                self._shard_dir(shard),
                host.applier,
                on_snapshot=self.staging.snapshot_done(host),
                preloaded=preloaded.get(shard),
                joining=self.join is not None,
                on_installed=table_transfer.refresher(
                    host,
                    self.node,
                    self.peer_client,
                    self._shard_dir(shard),
                    self.table_budget,
                    self.cfg.raft.fsync,
                    self._closed,
                ),
            )
        self.round_timer.start()
        log.info("node %s: hosting shards %s", self.node.id, sorted(self.shards))

    def complete_join(self) -> None:
        """Call once the cluster has added this node: from now on the data dir
        restarts as a member (until then, `--join` starts the join over)."""
        self._record_membership()

    def _record_membership(self) -> None:
        self.membership.save({k: h.bootstrap_peers for k, h in self.shards.items()})

    def _snapshot_for_joiner(self, shard: int) -> Path:
        return joining.fresh_snapshot(
            self.routing.host(shard),
            self._shard_dir(shard) / "snapshot.bin",
            self.cfg.limits.max_wait_seconds,
            self._closed,
        )

    def _shard_dir(self, shard: int) -> Path:
        d = self.data_dir / f"shard-{shard}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def close(self) -> None:
        self._closed.set()
        for host in self.shards.values():
            if host.replica is not None:
                host.replica.destroy()
            tables = host.state.tables
            if tables is not None:  # on the applier thread: never under a push that is being applied
                with contextlib.suppress(Exception):
                    host.applier.call(tables.close).result(timeout=30)
            host.applier.stop()
        self.datapath.close()
        self.staging.close()

    # ---- placement -------------------------------------------------------------
    def shard_of(self, name: str) -> int:
        return self.routing.shard_of(name)

    def hosts_of(self, shard: int) -> list[NodeConfig]:
        return self.routing.hosts_of(shard)

    def hosted_shards(self) -> list[int]:
        return sorted(self.shards)

    # ---- writes ------------------------------------------------------------------
    def write(self, cmd: TensorCommand) -> Future[Any]:
        """Replicate a command for tensor `cmd.name`; its payloads ride inline
        if small, else are sideloaded. Retrying with the same request id never
        applies twice."""
        return self.staging.submit(self.routing.host_of(cmd.name), cmd)

    def submit_to(self, shard: int, cmd: Command) -> Future[Any]:
        """Replicate any command on `shard` (embedding tables: one per shard touched)."""
        return self.staging.submit(self.routing.host(shard), cmd)

    def write_batch(self, shard: int, batch: Batch) -> Future[Any]:
        """Commands of one shard as ONE Raft entry: all apply or none.
        Resolves with {"results": [...]} in order."""
        return self.staging.submit(self.routing.host(shard), batch)

    def payload_stream(self, name: str, size: int) -> PayloadStream | None:
        """Start forwarding a large payload for `name` to the other replicas of
        its shard while it arrives; None if the shard has no other replicas."""
        return self.staging.stream(name, size)

    def barrier(self, shard: int) -> Future[Any]:
        """Resolves once a no-op committed after this call is applied here:
        reads after it see every write acknowledged before the call."""
        return self.routing.host(shard).raft().propose(Noop())

    # ---- embedding tables (store/tables) --------------------------------------------
    @property
    def tables(self) -> TableService:
        return self._tables

    def table_shards(self) -> int:
        return self.cfg.shards

    def local_tables(self, shard: int) -> Tables:
        tables = self.routing.host(shard).state.tables
        if tables is None:
            raise Unavailable("this replica keeps no embedding tables")
        return tables

    # ---- reads -------------------------------------------------------------------
    def get(self, name: str) -> tuple[Tensor, int]:
        """The tensor, safe to read while writes go on (copied only for
        tensors that sparse pushes update in place: see `peek`)."""
        host = self.routing.host_of(name)
        return host.state.read(name), host.shard

    def peek(self, name: str) -> tuple[Tensor, int]:
        """The live record, for metadata: its value may be updated in place if
        `in_place` is set."""
        host = self.routing.host_of(name)
        return host.state.get(name), host.shard

    def get_rows(self, name: str, rows: np.ndarray) -> tuple[np.ndarray, Tensor, int]:
        host = self.routing.host_of(name)
        arr, t = host.state.read_rows(name, rows)
        return arr, t, host.shard

    def layout(self, name: str) -> Layout | None:
        """The layout of partitioned tensor `name` as its home shard here has
        applied it; None for a whole tensor or no tensor."""
        return self.routing.host_of(name).state.layouts.get(name)

    def watch(self, name: str, min_version: int) -> Future[Any]:
        return self.routing.host_of(name).applier.watch(name, min_version)

    def watch_shard(self, shard: int, key: str, min_version: int) -> Future[Any]:
        return self.routing.host(shard).applier.watch(key, min_version)

    def unwatch_shard(self, shard: int, key: str, fut: Future[Any]) -> None:
        self.routing.host(shard).applier.unwatch(key, fut)

    def unwatch(self, name: str, fut: Future[Any]) -> None:
        self.routing.host_of(name).applier.unwatch(name, fut)

    def capture(self, shard: int) -> Future[dict[str, Tensor]]:
        """The shard's tensor map as of everything applied before this call,
        taken on its applier thread (the records are immutable: no copy)."""
        host = self.routing.host(shard)
        return host.applier.call(host.state.capture)

    def list_tensors(self) -> list[dict[str, Any]]:
        """Whole tensors, and each partitioned tensor (whose home shard is
        hosted here) as one entry describing its parts; parts are not listed
        on their own unless their layout is not hosted here."""
        layouts = {n: lay for host in self.shards.values() for n, lay in list(host.state.layouts.items())}
        parts: dict[str, dict[int, Any]] = {n: {} for n in layouts}
        out = []
        for shard, host in sorted(self.shards.items()):
            for t in list(host.state.tensors.values()):
                part = parse_part(t.name)
                if part is not None and part[0] in layouts:
                    parts[part[0]][part[1]] = t
                else:
                    out.append(t.describe(shard))
        for name, lay in layouts.items():
            out.append(describe_partitioned(lay, parts[name], self.cfg.shards))
        return sorted(out, key=lambda d: d["name"])

    # ---- status ------------------------------------------------------------------
    def is_ready(self) -> bool:
        return status.is_ready(self.routing)

    def status(self) -> dict[str, Any]:
        return status.cluster_status(self.cfg, self.routing, self.started)

    def shard_stats(self) -> list[ShardStats]:
        return status.hosted_stats(self.routing)

    def traffic(self, window: float) -> Traffic:
        """Bytes per peer, recent commit latencies and replication lag (store/traffic.py)."""
        datapath = self.peer_client.traffic.snapshot()
        for peer, (received, sent) in self.datapath.traffic.snapshot().items():
            before = datapath.get(peer, (0, 0))
            datapath[peer] = (before[0] + received, before[1] + sent)
        return status.traffic(self.routing, datapath, window)

    # ---- membership (admin; blocking, run off the event loop) -------------------
    def add_member(self, node: NodeConfig, shards: list[int] | None = None) -> dict[str, Any]:
        """Make `node` a voting member of `shards` (default: all hosted here); idempotent."""
        return self.admin.add_member(node, shards)

    def remove_member(self, node_id: str, shards: list[int] | None = None) -> dict[str, Any]:
        """Remove `node_id` from `shards` (default: all hosted here); idempotent."""
        return self.admin.remove_member(node_id, shards)


if TYPE_CHECKING:

    def _implements_the_interface(store: Store) -> StoreAPI:
        return store  # mypy checks Store against the protocol api/ depends on
