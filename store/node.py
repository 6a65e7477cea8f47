"""`Store`: everything one replica hosts. The only entry point `api/` uses.

It owns the payload store, the data path, and one ShardHost (state, applier,
Raft replica) per shard placed on this node. Methods never block on Raft:
writes and waits return `concurrent.futures.Future`s that the caller awaits
however it likes (the HTTP layer bridges them to asyncio).
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from . import placement
from .applier import Applier
from .config import Config, NodeConfig
from .datapath import DataPathClient, DataPathServer
from .errors import ConfigError, NotHosted, StoreError, Unavailable
from .futures import forward
from .payloads import PayloadStore
from .raft import ShardReplica
from .snapshot import read_snapshot
from .journal import check_journal
from .sockets import bind_outgoing_raft, source_address
from .state import ShardState, Tensor

log = logging.getLogger(__name__)


@dataclass
class ShardHost:
    shard: int
    hosts: list[NodeConfig]
    peers: list[NodeConfig]
    applier: Applier
    payloads: PayloadStore
    replica: ShardReplica | None = None
    payload_bytes_since_snapshot: int = 0

    @property
    def state(self) -> ShardState:
        return self.applier.state

    @property
    def majority(self) -> int:
        return len(self.hosts) // 2 + 1

    def is_ready(self, max_lag: int = 256) -> bool:
        """A leader is known and this replica is within `max_lag` entries of
        the leader's commit index (exactly caught up flaps under write load)."""
        r = self.replica
        if r is None or r.leader_address is None:
            return False
        target = r.leader_commit_index
        return target is not None and r.raftLastApplied + max_lag >= target \
            and self.applier.pending <= max_lag


class Store:
    def __init__(self, cfg: Config) -> None:
        if cfg.data_dir is None:
            raise ConfigError("node.data_dir: a data directory is required (--data-dir)")
        if cfg.raft.password is None and not cfg.all_loopback():
            raise ConfigError(
                "raft.password: required when any node address is not loopback, because pysyncobj "
                "unpickles whatever reaches its port (set PARAMSTORE_RAFT_PASSWORD)")
        self.cfg = cfg
        self.node: NodeConfig = cfg.node
        self.data_dir = Path(cfg.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        secret = (hashlib.sha256(b"paramstore-datapath:" + cfg.raft.password.encode()).digest()
                  if cfg.raft.password else None)
        self.peer_client = DataPathClient(secret, source=source_address(self.node.data.host))
        self._stage_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="stage")
        self._closed = threading.Event()
        self.shards: dict[int, ShardHost] = {}
        for shard in range(cfg.shards):
            hosts = placement.hosts_for(shard, list(cfg.nodes), cfg.replication)
            if self.node not in hosts:
                continue
            payloads = PayloadStore(self._shard_dir(shard) / "payloads", fsync=cfg.raft.fsync)
            applier = Applier(ShardState(shard, cfg.limits.dedupe_window),
                              self._resolver(shard, payloads), self._payload_used(shard, payloads))
            self.shards[shard] = ShardHost(shard, hosts, [h for h in hosts if h != self.node],
                                           applier, payloads)
        self.datapath = DataPathServer(self.node.data, {k: h.payloads for k, h in self.shards.items()},
                                       secret, max_size=cfg.limits.max_body_bytes)

    def start(self) -> None:
        """Load snapshots (refusing corrupt ones), bind the data path, start Raft."""
        preloaded = {}
        for shard in self.shards:
            check_journal(self._shard_dir(shard) / "journal.bin")  # refuses a damaged one
            dump = self._shard_dir(shard) / "snapshot.bin"
            if dump.exists():
                preloaded[shard] = read_snapshot(dump, self.cfg.limits.dedupe_window)
        self.datapath.start()
        bind_outgoing_raft(self.node.raft.host)
        for shard, host in self.shards.items():
            host.replica = ShardReplica(
                shard, self.node.raft_address(shard), [h.raft_address(shard) for h in host.peers],
                self.cfg.raft, self._shard_dir(shard), host.applier,
                on_snapshot=self._snapshot_done(host), preloaded=preloaded.get(shard))
        log.info("node %s: hosting shards %s", self.node.id, sorted(self.shards))

    def _shard_dir(self, shard: int) -> Path:
        d = self.data_dir / f"shard-{shard}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def close(self) -> None:
        self._closed.set()
        for host in self.shards.values():
            if host.replica is not None:
                host.replica.destroy()
            host.applier.stop()
        self.datapath.close()
        self.peer_client.close()
        self._stage_pool.shutdown(wait=False, cancel_futures=True)

    # ---- placement -------------------------------------------------------------
    def shard_of(self, name: str) -> int:
        return placement.shard_for(name, self.cfg.shards)

    def host(self, shard: int) -> ShardHost:
        host = self.shards.get(shard)
        if host is None:
            hosts = placement.hosts_for(shard, list(self.cfg.nodes), self.cfg.replication)
            raise NotHosted(f"shard {shard} is not hosted on {self.node.id}",
                            hosts=[h.url for h in hosts])
        if host.replica is None:
            raise Unavailable("replica is starting")
        return host

    # ---- writes ------------------------------------------------------------------
    def write(self, name: str, cmd: dict[str, Any], data=None, **blobs: Any) -> Future:
        """Replicate a command for tensor `name`; its byte blobs (`data`, and any
        other named field) ride inline if small, else are sideloaded.

        `cmd` gets a request id unless it has one; retrying with the same `rid`
        never applies twice.
        """
        host = self.host(self.shard_of(name))
        cmd = dict(cmd, name=name)
        cmd.setdefault("rid", uuid.uuid4().hex)
        if data is not None:
            blobs["data"] = data
        return self._submit(host, cmd, [(cmd, field, blob) for field, blob in blobs.items()])

    def write_batch(self, shard: int, ops: list[tuple[dict[str, Any], dict[str, Any]]],
                    rid: str | None = None) -> Future:
        """Several (command, blobs) pairs of one shard as ONE Raft entry: all
        apply or none. Resolves with {"results": [...]} in order."""
        host = self.host(shard)
        cmds = [dict(cmd) for cmd, _ in ops]
        slots = [(c, field, blob) for c, (_, blobs) in zip(cmds, ops) for field, blob in blobs.items()]
        return self._submit(host, {"op": "batch", "ops": cmds, "rid": rid or uuid.uuid4().hex}, slots)

    def _submit(self, host: ShardHost, cmd: dict[str, Any], slots: list[tuple[dict, str, Any]]) -> Future:
        inline_limit = self.cfg.limits.inline_payload_bytes
        large = []
        for target, field, blob in slots:
            if len(blob) <= inline_limit:
                target[field] = {"inline": bytes(blob)}
            else:
                large.append((target, field, blob))
        if not large:
            return host.replica.propose(cmd)
        outer: Future = Future()

        def stage() -> None:
            try:
                for target, field, blob in large:
                    payload_id = host.payloads.put(blob)
                    self.peer_client.replicate(
                        [p.data for p in host.peers], host.shard, payload_id, blob,
                        need=host.majority - 1, timeout=self.cfg.limits.request_timeout)
                    target[field] = {"id": payload_id, "size": len(blob)}
                forward(host.replica.propose(cmd), outer)
            except StoreError as e:
                outer.set_exception(e)
            except Exception as e:
                log.exception("staging a payload failed")
                outer.set_exception(Unavailable(f"could not stage the payload: {e}"))

        self._stage_pool.submit(stage)
        return outer

    def barrier(self, shard: int) -> Future:
        """Resolves once a no-op committed after this call is applied here:
        reads after it see every write acknowledged before the call."""
        return self.host(shard).replica.propose({"op": "noop"})

    # ---- reads -------------------------------------------------------------------
    def get(self, name: str) -> tuple[Tensor, int]:
        """The tensor, safe to read while writes go on (copied only for
        tensors that sparse pushes update in place: see `peek`)."""
        shard = self.shard_of(name)
        return self.host(shard).state.read(name), shard

    def peek(self, name: str) -> tuple[Tensor, int]:
        """The live record, for metadata: its value may be updated in place if
        `in_place` is set."""
        shard = self.shard_of(name)
        return self.host(shard).state.get(name), shard

    def get_rows(self, name: str, rows) -> tuple[Any, Tensor, int]:
        shard = self.shard_of(name)
        arr, t = self.host(shard).state.read_rows(name, rows)
        return arr, t, shard

    def watch(self, name: str, min_version: int) -> Future:
        return self.host(self.shard_of(name)).applier.watch(name, min_version)

    def unwatch(self, name: str, fut: Future) -> None:
        self.host(self.shard_of(name)).applier.unwatch(name, fut)

    def list(self) -> list[dict[str, Any]]:
        out = []
        for shard, host in sorted(self.shards.items()):
            out += [t.describe(shard) for t in list(host.state.tensors.values())]
        return sorted(out, key=lambda d: d["name"])

    def is_ready(self) -> bool:
        return all(h.is_ready() for h in self.shards.values())

    def status(self) -> dict[str, Any]:
        shards = []
        for shard in range(self.cfg.shards):
            hosts = placement.hosts_for(shard, list(self.cfg.nodes), self.cfg.replication)
            entry: dict[str, Any] = {"shard": shard, "replicas": [h.id for h in hosts]}
            host = self.shards.get(shard)
            if host is not None and host.replica is not None:
                r = host.replica
                leader = r.leader_address
                entry.update({
                    "leader": _node_for_raft(self.cfg, shard, leader),
                    "term": r.raftCurrentTerm,
                    "commit_index": r.raftCommitIndex,
                    "applied_index": r.raftLastApplied,
                    "role": r.role,
                    "ready": host.is_ready(),
                    "tensors": len(host.state.tensors),
                    "bytes": host.state.nbytes,
                    "log_entries": r.log_entries,
                    "snapshots": r.snapshots,
                    "leader_changes": r.leader_changes,
                })
            shards.append(entry)
        return {
            "node": self.node.id,
            "shards": shards,
            "nodes": [{"id": n.id, "url": n.url, "raft": str(n.raft), "data": str(n.data)}
                      for n in self.cfg.nodes],
            "replication": self.cfg.replication,
            "ready": self.is_ready(),
            "uptime_seconds": round(time.monotonic() - self.started, 3),
        }

    # ---- payload plumbing (applier thread) --------------------------------------
    def _resolver(self, shard: int, payloads: PayloadStore):
        def resolve(ref: Mapping[str, Any], index: int):
            payload_id = ref["id"]
            delay = 0.05
            while True:
                data = payloads.get(payload_id)
                if data is not None:
                    return data
                # A background push may be about to land; then ask the peers.
                if payloads.wait_for(payload_id, 0.2):
                    continue
                for peer in self.shards[shard].peers:
                    try:
                        fetched = self.peer_client.fetch(peer.data, shard, payload_id)
                    except (OSError, ConnectionError, ValueError) as e:
                        log.info("fetching payload %s from %s failed: %s", payload_id[:12], peer.id, e)
                        continue
                    if fetched is not None:
                        payloads.put(fetched, payload_id)
                        return fetched
                if self._closed.is_set():
                    raise Unavailable("shutting down")
                log.warning("shard %d: payload %s for index %d not found on any peer; retrying",
                            shard, payload_id[:12], index)
                self._closed.wait(delay)
                delay = min(delay * 2, 2.0)
        return resolve

    def _payload_used(self, shard: int, payloads: PayloadStore):
        def used(payload_id: str, size: int, index: int) -> None:
            payloads.applied(payload_id, index)
            host = self.shards[shard]
            host.payload_bytes_since_snapshot += size
            threshold = max(self.cfg.raft.compaction_min_bytes, host.state.nbytes)
            if host.payload_bytes_since_snapshot > threshold and host.replica is not None:
                host.payload_bytes_since_snapshot = 0
                host.replica.forceLogCompaction()
        return used

    def _snapshot_done(self, host: ShardHost):
        def done(index: int, size: int, seconds: float) -> None:
            removed = host.payloads.collect(index)
            if removed:
                log.info("shard %d: collected %d payloads covered by the snapshot", host.shard, removed)
        return done


def _node_for_raft(cfg: Config, shard: int, raft_addr: str | None) -> str | None:
    if raft_addr is None:
        return None
    for n in cfg.nodes:
        if str(n.raft_address(shard)) == raft_addr:
            return n.id
    return raft_addr
