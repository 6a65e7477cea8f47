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
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pysyncobj.utility import TcpUtility, UtilityException

from . import commands, membership, placement
from .applier import Applier
from .commands import Batch, Command, Inline, MemberDrop, MemberSet, Noop, Stored, TensorCommand
from .config import Config, NodeConfig
from .datapath import DataPathClient, DataPathServer, PayloadStream
from .errors import ConfigError, Conflict, NotHosted, StoreError, Timeout, Unavailable
from .futures import forward
from .payloads import PayloadStore, digest_of
from .raft import ShardReplica
from .snapshot import read_snapshot
from .threadnames import name_this_thread
from .journal import check_journal
from .pysyncobj_adapter import bind_outgoing_raft
from .sockets import source_address, warn_if_ephemeral
from .state import ShardState, Tensor

log = logging.getLogger(__name__)

JOIN_CATCH_UP_SECONDS = 120.0  # how long a snapshot source keeps its log for the joiner


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
            return sorted(self.bootstrap_peers + [str(self.node.raft_address(self.shard))])
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
        return target is not None and r.raftLastApplied + max_lag >= target \
            and self.applier.pending <= max_lag


class Store:
    def __init__(self, cfg: Config, join: membership.JoinPlan | None = None) -> None:
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
        self._stage_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="stage",
                                              initializer=name_this_thread)
        self._payload_writer = ThreadPoolExecutor(max_workers=8, thread_name_prefix="payload-write",
                                                  initializer=name_this_thread)
        self._closed = threading.Event()
        self.shards: dict[int, ShardHost] = {}
        self.membership = membership.MembershipFile(self.data_dir)
        self.join = join if not self.membership.exists() else None
        if join is not None and self.join is None:
            log.info("node %s: already joined (%s exists); --join ignored", self.node.id, self.membership.path)
        for shard, peers in self._placement().items():
            directory = {str(n.raft_address(shard)): n for n in cfg.nodes}
            if self.join is not None:
                directory.update({str(n.raft_address(shard)): n for n in self.join.shards[shard]})
            payloads = PayloadStore(self._shard_dir(shard) / "payloads", fsync=cfg.raft.fsync)
            applier = Applier(ShardState(shard, cfg.limits.dedupe_window),
                              self._resolver(shard, payloads), self._payload_used(shard, payloads))
            self.shards[shard] = ShardHost(shard, self.node, peers, directory, applier, payloads)
        warn_if_ephemeral({**{f"raft (shard {k})": self.node.raft_address(k).port for k in self.shards},
                           "data": self.node.data.port, "http": self.node.http.port}, log)
        self.datapath = DataPathServer(self.node.data, {k: h.payloads for k, h in self.shards.items()},
                                       secret, max_size=cfg.limits.max_body_bytes,
                                       snapshot_source=self._fresh_snapshot)

    def _placement(self) -> dict[int, list[str]]:
        """shard -> bootstrap peers (raft addresses) of every shard hosted here."""
        if self.membership.exists():
            return self.membership.load()
        if self.join is not None:
            return {k: [str(n.raft_address(k)) for n in members if n.id != self.node.id]
                    for k, members in self.join.shards.items()}
        placed = {}
        for shard in range(self.cfg.shards):
            hosts = placement.hosts_for(shard, list(self.cfg.nodes), self.cfg.replication)
            if self.node in hosts:
                placed[shard] = [str(h.raft_address(shard)) for h in hosts if h != self.node]
        return placed

    def start(self) -> None:
        """Join (download snapshots) if asked, load snapshots (refusing corrupt
        ones), bind the data path, start Raft."""
        if self.join is not None:
            self._download_snapshots(self.join)
        if not self.membership.exists() and self.join is None:
            self._record_membership()
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
                shard, self.node.raft_address(shard), host.bootstrap_peers,
                self.cfg.raft, self._shard_dir(shard), host.applier,
                on_snapshot=self._snapshot_done(host), preloaded=preloaded.get(shard),
                joining=self.join is not None)
        log.info("node %s: hosting shards %s", self.node.id, sorted(self.shards))

    def complete_join(self) -> None:
        """Call once the cluster has added this node: from now on the data dir
        restarts as a member (until then, `--join` starts the join over)."""
        self._record_membership()

    def _record_membership(self) -> None:
        self.membership.save({k: h.bootstrap_peers for k, h in self.shards.items()})

    def _download_snapshots(self, plan: membership.JoinPlan) -> None:
        """All shards at once: each source first writes a fresh snapshot."""
        def one(shard: int, source: NodeConfig) -> None:
            started = time.monotonic()

            def progress(got: int, size: int) -> None:
                log.info("joining: shard %d snapshot %d/%d MB", shard, got >> 20, size >> 20,
                         extra={"shard": shard})

            size = self.peer_client.fetch_snapshot(source.data, shard, self._shard_dir(shard) / "snapshot.bin",
                                                   progress=progress)
            log.info("joining: shard %d snapshot from %s, %d bytes in %.2fs", shard, source.id, size,
                     time.monotonic() - started, extra={"shard": shard})

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=max(1, len(plan.snapshot_sources))) as pool:
            for fut in [pool.submit(one, k, src) for k, src in sorted(plan.snapshot_sources.items())]:
                fut.result()
        log.info("joining: %d snapshots downloaded in %.2fs", len(plan.snapshot_sources),
                 time.monotonic() - started)

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
        self._stage_pool.shutdown(wait=False, cancel_futures=True)
        self._payload_writer.shutdown(wait=False, cancel_futures=True)

    # ---- placement -------------------------------------------------------------
    def hosts_of(self, shard: int) -> list[NodeConfig]:
        """The shard's current members if hosted here, else its bootstrap placement."""
        host = self.shards.get(shard)
        if host is not None:
            return host.hosts
        return placement.hosts_for(shard, list(self.cfg.nodes), self.cfg.replication)

    def shard_of(self, name: str) -> int:
        return placement.shard_for(name, self.cfg.shards)

    def host(self, shard: int) -> ShardHost:
        host = self.shards.get(shard)
        if host is None:
            raise NotHosted(f"shard {shard} is not hosted on {self.node.id}",
                            hosts=[h.url for h in self.hosts_of(shard)])
        if host.replica is None:
            raise Unavailable("replica is starting")
        return host

    # ---- writes ------------------------------------------------------------------
    def write(self, cmd: TensorCommand) -> Future:
        """Replicate a command for tensor `cmd.name`; its payloads ride inline
        if small, else are sideloaded. Retrying with the same request id never
        applies twice."""
        return self._submit(self.host(self.shard_of(cmd.name)), cmd)

    def write_batch(self, shard: int, batch: Batch) -> Future:
        """Commands of one shard as ONE Raft entry: all apply or none.
        Resolves with {"results": [...]} in order."""
        return self._submit(self.host(shard), batch)

    def _submit(self, host: ShardHost, cmd: Command) -> Future:
        inline_limit = self.cfg.limits.inline_payload_bytes
        refs: dict[commands.BlobPath, commands.Ref] = {}
        large = []
        for path, blob in commands.blobs(cmd):
            if len(blob) <= inline_limit:
                refs[path] = Inline(bytes(blob))
            else:
                large.append((path, blob))
        if not large:
            return host.replica.propose(commands.with_refs(cmd, refs))
        outer: Future = Future()

        def stage() -> None:
            try:
                for path, blob in large:
                    # the local copy is written while the peers receive theirs
                    payload_id = getattr(blob, "sha256", None) or digest_of(blob)
                    local = self._payload_writer.submit(host.payloads.put, blob, payload_id, payload_id)
                    stream = getattr(blob, "stream", None)  # already on its way to the peers
                    if stream is not None:
                        stream.finish(payload_id)
                        stream.wait(host.majority - 1, self.cfg.limits.request_timeout)
                    else:
                        self.peer_client.replicate(
                            [p.data for p in host.peers], host.shard, payload_id, blob,
                            need=host.majority - 1, timeout=self.cfg.limits.request_timeout)
                    local.result()
                    refs[path] = Stored(payload_id, len(blob))
                forward(host.replica.propose(commands.with_refs(cmd, refs)), outer)
            except StoreError as e:
                outer.set_exception(e)
            except Exception as e:
                log.exception("staging a payload failed")
                outer.set_exception(Unavailable(f"could not stage the payload: {e}"))
            finally:
                _end_streams(large)

        try:
            self._stage_pool.submit(stage)
        except RuntimeError as e:  # shutting down
            _end_streams(large)
            raise Unavailable(f"this replica is shutting down: {e}") from None
        return outer

    def payload_stream(self, name: str, size: int) -> PayloadStream | None:
        """Start forwarding a large payload for `name` to the other replicas of
        its shard while it arrives; None if the shard has no other replicas."""
        host = self.host(self.shard_of(name))
        peers = host.peers
        if not peers:
            return None
        return self.peer_client.stream([p.data for p in peers], host.shard, size)

    def barrier(self, shard: int) -> Future:
        """Resolves once a no-op committed after this call is applied here:
        reads after it see every write acknowledged before the call."""
        return self.host(shard).replica.propose(Noop())

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
        nodes: dict[str, NodeConfig] = {} if self.shards else {n.id: n for n in self.cfg.nodes}
        for shard in range(self.cfg.shards):
            hosts = self.hosts_of(shard)
            entry: dict[str, Any] = {"shard": shard, "replicas": [h.id for h in hosts]}
            host = self.shards.get(shard)
            if host is not None and host.replica is not None:
                nodes.update({h.id: h for h in hosts})
                r = host.replica
                leader = r.leader_address
                entry.update({
                    "leader": host.node_id_of(leader),
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
            "nodes": [{"id": n.id, "url": n.url, "http": str(n.http), "raft": str(n.raft), "data": str(n.data)}
                      for n in sorted(nodes.values(), key=lambda n: n.id)],
            "replication": self.cfg.replication,
            "ready": self.is_ready(),
            "uptime_seconds": round(time.monotonic() - self.started, 3),
        }

    # ---- membership (admin; blocking, run off the event loop) -------------------
    def add_member(self, node: NodeConfig, shards: list[int] | None = None) -> dict[str, Any]:
        """Make `node` a voting member of `shards` (default: every shard hosted
        here). Start the new replica with `--join` first: it downloads a
        snapshot over the data path and then waits to be added. Idempotent."""
        deadline = time.monotonic() + self.cfg.limits.max_wait_seconds
        results = []
        for shard in self._admin_targets(shards):
            host = self.host(shard)
            addr = str(node.raft_address(shard))
            known = host.member_address(node.id)
            if known is not None and known != addr:
                raise Conflict(f"shard {shard}: node {node.id!r} is already a member at {known}; "
                               "remove it first to change its addresses")
            self._wait(host.replica.propose(MemberSet(**membership.record_of(node))), deadline)
            if addr in host.replica.members():
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
            host = self.host(shard)
            addr = host.member_address(node_id)
            if addr is None:
                results.append({"shard": shard, "status": "not a member"})
                continue
            if len(host.replica.members()) == 1:
                raise Conflict(f"shard {shard}: {node_id!r} is its last member")
            self._move_leadership_from(host, addr, deadline)
            self._change_member(host, "rem", addr, deadline)
            if node_id != self.node.id:  # a removed replica can no longer commit anything
                self._wait(host.replica.propose(MemberDrop(id=node_id)), deadline)
            results.append({"shard": shard, "status": "removed"})
            log.info("shard %d: removed node %s (%s)", shard, node_id, addr, extra={"shard": shard})
        return {"node": node_id, "shards": results}

    def _admin_targets(self, shards: list[int] | None) -> list[int]:
        targets = sorted(self.shards) if shards is None else sorted(set(shards))
        for shard in targets:
            self.host(shard)  # NotHosted / Unavailable before changing anything
        return targets

    def _wait(self, fut: Future, deadline: float) -> Any:
        try:
            return fut.result(max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            raise Timeout("membership change: no answer before the deadline; check `paramstore status` "
                          "and retry (changes are idempotent)") from None

    def _change_member(self, host: ShardHost, kind: str, addr: str, deadline: float) -> None:
        """One change at a time per shard: retry while a previous one commits."""
        delay = 0.05
        while True:
            try:
                self._wait(host.replica.change_member(kind, addr), deadline)
                return
            except (Conflict, Unavailable) as e:
                done = (addr in host.replica.members()) == (kind == "add")
                if done:
                    return
                if time.monotonic() + delay > deadline:
                    raise e
            self._closed.wait(delay)
            delay = min(delay * 2, 0.5)

    def _move_leadership_from(self, host: ShardHost, addr: str, deadline: float) -> None:
        """pysyncobj cannot remove a leader: ask it to hand over (Raft TimeoutNow)."""
        while host.replica.leader_address in (addr, None):
            if time.monotonic() > deadline:
                raise Timeout(f"shard {host.shard}: leadership did not move away from {addr}; retry")
            if host.replica.leader_address == addr:
                if addr == str(self.node.raft_address(host.shard)):
                    host.replica.transferLeadership()
                else:
                    try:
                        TcpUtility(self.cfg.raft.password, timeout=2.0).executeCommand(addr, ["transfer", None])
                    except UtilityException as e:
                        log.info("shard %d: asking %s to hand over leadership: %s", host.shard, addr, e)
            self._closed.wait(0.2)

    def _fresh_snapshot(self, shard: int) -> Path:
        """Data path thread: a snapshot at most a few entries behind this
        replica's applied index, for a joining replica to start from."""
        host = self.host(shard)
        replica = host.replica
        target = replica.raftLastApplied
        deadline = time.monotonic() + self.cfg.limits.max_wait_seconds
        if replica.last_snapshot_index < target:
            replica.forceLogCompaction()
            while replica.last_snapshot_index < target:
                if time.monotonic() > deadline or self._closed.is_set():
                    raise Unavailable(f"shard {shard}: no snapshot within the deadline")
                self._closed.wait(0.01)
        replica.hold_compaction(replica.last_snapshot_index, JOIN_CATCH_UP_SECONDS)
        return self._shard_dir(shard) / "snapshot.bin"

    # ---- payload plumbing (applier thread) --------------------------------------
    def _resolver(self, shard: int, payloads: PayloadStore):
        def resolve(ref: Stored, index: int):
            payload_id = ref.id
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


def _end_streams(large: list[tuple[commands.BlobPath, Any]]) -> None:
    """Abort the cut-through streams of payloads that were not finished (the
    peers drop what they received) and unlink the rest from their buffers."""
    for _, blob in large:
        stream = getattr(blob, "stream", None)
        if stream is not None:
            if not stream.finished:
                stream.abort()
            del blob.stream  # the stream's queues hold views of the buffer: no cycle
