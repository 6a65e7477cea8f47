"""pysyncobj wiring for one shard: a SyncObj whose single replicated method
hands committed commands to the shard's Applier.

Traps handled here (see docs/architecture.md):
- the apply hook runs on the tick thread: it only enqueues;
- snapshots are written off the tick thread (store/snapshotter.py);
- pysyncobj binds 0.0.0.0 unless told: `bindAddress` is always the node's own;
- pysyncobj's forwarded commands report FAIL_REASON codes: mapped to typed errors;
- a command forwarded to a leader that died is lost: proposed again.
What we change inside pysyncobj itself is in store/pysyncobj_adapter.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from . import commands
from .applier import Applier
from .commands import Command, Group, Noop
from .config import Address, RaftSettings
from .durable_journal import RESERVE
from .errors import Conflict, Unavailable
from .futures import forward, settle
from .group_commit import GROUP_MAX_BYTES, GroupCommit
from .pysyncobj_adapter import FAIL_REASON, ElectionSettings, SyncObjConf, TunedSyncObj, fail_name, replicated
from .snapshotter import Snapshotter
from .traffic import Counts, LatencyWindow
from .transport import transport_class

__all__ = ["GROUP_MAX_BYTES", "MAX_ATTEMPTS", "ShardReplica"]

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
# Journal space a replica must be able to reserve to accept a write: writes
# stop well before the journal cannot take the no-op barriers reads need.
WRITE_HEADROOM = RESERVE


class ShardReplica(TunedSyncObj):
    def __init__(
        self,
        shard: int,
        self_addr: Address,
        peers: list[str],  # the other members' raft addresses, "host:port"
        settings: RaftSettings,
        shard_dir: Path,
        applier: Applier,
        on_snapshot: Callable[[int, int, float], None],
        preloaded: tuple[Any, int, dict[str, Any]] | None = None,
        joining: bool = False,
        on_installed: Callable[[int], None] | None = None,
    ) -> None:
        self.shard = shard
        # A joining replica is not a member until a leader adds it: it must not
        # campaign meanwhile (its rising term would depose the leader once added).
        self._joining = joining
        self._compaction_hold: tuple[float, int, frozenset[str]] | None = None
        self._hold_lock = threading.Lock()  # the data path sets holds, the tick thread releases them
        self._applier = applier
        self.term_changes = 0
        self.leader_changes = 0
        self._last_leader: Any = None
        self._pending: dict[int, tuple[Any, ...]] = {}  # id(outer future) -> (cmd, outer, attempt, leader then)
        self.link_bytes: dict[str, Counts] = {}  # peer raft address -> [received, sent] (CountingTransport)
        self.commit_latency = LatencyWindow()  # propose -> applied here, of writes (not barriers)
        self.snapshotter = Snapshotter(
            shard,
            shard_dir / "snapshot.bin",
            applier,
            settings.fsync,
            on_snapshot,
            preloaded,
            self._log_fields,
            on_installed,
        )
        self._group_commit = GroupCommit(self._launch, _group_command, self.wake_tick, f"shard {shard}")
        conf = _conf(settings, self_addr, shard_dir, self.snapshotter, self._state_changed)
        super().__init__(
            str(self_addr),
            list(peers),
            conf,
            transport=transport_class(settings.transport),
            thread_name=f"raft-{shard}",
            fsync=settings.fsync,
            elections=_elections(settings),
        )
        self.addOnTickCallback(self._track_leader)

    def _track_leader(self) -> None:
        """Count leader changes as this replica sees them (onStateChanged only
        fires when this replica's own role changes)."""
        leader = self.leader_node()
        if leader != self._last_leader:
            if leader is not None:
                self._joining = False
                self.leader_changes += 1
                log.info(
                    "shard %d: leader is now %s (term %d)",
                    self.shard,
                    leader,
                    self.raftCurrentTerm,
                    extra=self._log_fields(),
                )
                self._repropose_after_leader_change(leader)
            self._last_leader = leader

    def _may_campaign(self) -> bool:
        return not self._joining

    # ---- commands ------------------------------------------------------------
    @replicated
    def _apply(self, entry: tuple[Any, ...]) -> Future[Any]:
        return self._applier.submit(self.raftLastApplied + 1, entry)

    def propose(self, cmd: Command) -> Future[Any]:
        """Replicate `cmd`; the Future resolves with its result on this replica
        once applied here, or fails with a StoreError.

        Retryable commands go through group commit (store/group_commit.py):
        under many concurrent writers they share Raft entries.

        A command whose leader changed before it committed is proposed again
        (at most MAX_ATTEMPTS times): pysyncobj drops a command forwarded to
        a leader that died, and reports DISCARDED/UNKNOWN_OUTCOME for others.
        Re-proposing is safe because every write carries a request id the
        state machine applies at most once, and a no-op barrier is idempotent.
        """
        if not isinstance(cmd, Noop) and not self.journal_has_room(WRITE_HEADROOM):
            failed: Future[Any] = Future()
            failed.set_exception(
                Unavailable(
                    f"shard {self.shard}: this replica's disk is full; writes resume once space is freed",
                    reason="disk_full",
                )
            )
            return failed
        cmd = commands.with_rid(cmd)
        if not _retryable(cmd):
            outer: Future[Any] = Future()
            self._attempt(cmd, outer, 1)
            return outer
        future = self._group_commit.add(cmd, _inline_bytes(cmd))
        if not isinstance(cmd, Noop):
            started, window = time.perf_counter(), self.commit_latency

            def measured(f: Future[Any]) -> None:
                if not f.cancelled() and f.exception() is None:
                    window.add(time.perf_counter() - started)

            future.add_done_callback(measured)
        return future

    def _before_append(self) -> None:
        self._group_commit.flush()

    def _launch(self, cmd: Command, outer: Future[Any]) -> None:
        self._attempt(cmd, outer, 1)

    def _attempt(self, cmd: Command, outer: Future[Any], attempt: int) -> None:
        retryable = _retryable(cmd)
        key = id(outer)

        def done(res: Any, err: int) -> None:
            if outer.done():  # answered by another attempt, or the caller gave up
                self._pending.pop(key, None)
                return
            if err == FAIL_REASON.SUCCESS:
                self._pending.pop(key, None)
                forward(res, outer)
                return
            name = fail_name(err)
            lost = err in (
                FAIL_REASON.DISCARDED,
                FAIL_REASON.UNKNOWN_OUTCOME,
                FAIL_REASON.NOT_LEADER,
                FAIL_REASON.LEADER_CHANGED,
            )
            if lost and retryable and attempt < MAX_ATTEMPTS:
                self._attempt(cmd, outer, attempt + 1)
                return
            self._pending.pop(key, None)
            if lost:
                detail = f"shard {self.shard}: leader changed, outcome unknown ({name}); retry"
            else:
                detail = f"shard {self.shard}: no leader can take the write ({name})"
            settle(outer, exc=Unavailable(detail, reason=name.lower()))

        if retryable:
            self._pending[key] = (cmd, outer, attempt, self.leader_node())
        self._apply(commands.to_log(cmd), callback=done)  # the start-up journal check verifies the seal
        if not self.on_tick_thread():
            self.wake_tick()

    def _repropose_after_leader_change(self, leader: Any) -> None:
        """Tick thread: commands in flight when the leader changed may have
        been lost on the way (forwarded to a dead leader): propose them again."""
        for key, (cmd, outer, attempt, sent_to) in list(self._pending.items()):
            if outer.done():
                self._pending.pop(key, None)
            elif sent_to != leader and attempt < MAX_ATTEMPTS:
                self._attempt(cmd, outer, attempt + 1)

    # ---- membership ----------------------------------------------------------
    def members(self) -> list[str]:
        """Raft addresses of this shard's voting members, this replica included,
        as this replica knows them (a change applies when its entry is appended)."""
        return sorted([*self.other_member_ids(), self.selfNode.id])

    def change_member(self, kind: str, raft_address: str) -> Future[Any]:
        """Add (`kind="add"`) or remove a voting member through the log; the
        Future resolves once the change committed. pysyncobj allows one change
        at a time and refuses to remove the leader itself (REQUEST_DENIED)."""
        outer: Future[Any] = Future()

        def done(res: Any, err: int) -> None:
            if err == FAIL_REASON.SUCCESS:
                settle(outer, {"shard": self.shard, kind: raft_address})
            elif err == FAIL_REASON.REQUEST_DENIED:
                settle(
                    outer,
                    exc=Conflict(
                        f"shard {self.shard}: membership change refused (another change is still "
                        "committing, the node is already in that state, or it is the leader); retry"
                    ),
                )
            else:
                settle(
                    outer,
                    exc=Unavailable(
                        f"shard {self.shard}: membership change failed ({fail_name(err)}); retry",
                        reason=str(fail_name(err)).lower(),
                    ),
                )

        change = self.addNodeToCluster if kind == "add" else self.removeNodeFromCluster
        change(raft_address, callback=done)
        self.wake_tick()
        return outer

    def hold_compaction(self, index: int, seconds: float) -> None:
        """Keep the log after `index` until nodes that join from a snapshot
        at `index` have caught up (or `seconds` pass): otherwise a compaction
        meanwhile would make this leader send them a snapshot through Raft
        messages, pysyncobj's slow path. A hold already in place is extended
        (the lower index, the members before the first of the joins)."""
        with self._hold_lock:
            until, before = time.monotonic() + seconds, frozenset(self.members())
            if self._compaction_hold is not None:
                _, held, before = self._compaction_hold
                index = min(index, held)
            self._compaction_hold = (until, index, before)

    def compaction_held(self) -> bool:
        return self._compaction_hold is not None

    def _compaction_may_run(self) -> bool:
        """Tick thread. A hold ends once every node that joined since has
        matched its index, when it expires, or when this replica stops leading
        (only a leader sends snapshots, and only a leader's match indexes move)."""
        if self._compaction_hold is None:
            return True
        with self._hold_lock:
            hold = self._compaction_hold
            if hold is None:
                return True
            until, index, before = hold
            joined = [match for node, match in self.match_indexes().items() if node not in before]
            if (
                time.monotonic() > until
                or not self._is_leader()
                or (joined and all(match >= index for match in joined))
            ):
                self._compaction_hold = None
                return True
            return False

    # ---- snapshots and status ------------------------------------------------
    @property
    def snapshots(self) -> int:
        return self.snapshotter.snapshots

    @property
    def last_snapshot_index(self) -> int:
        return self.snapshotter.last_snapshot_index

    @property
    def last_snapshot_seconds(self) -> float:
        return self.snapshotter.last_snapshot_seconds

    @property
    def last_snapshot_bytes(self) -> int:
        return self.snapshotter.last_snapshot_bytes

    def _state_changed(self, old: int, new: int) -> None:
        log.info(
            "shard %d: raft state %s -> %s (term %d)",
            self.shard,
            old,
            new,
            self.raftCurrentTerm,
            extra=self._log_fields(),
        )

    def _log_fields(self) -> dict[str, Any]:
        """Structured fields for the JSON log formatter."""
        return {"shard": self.shard, "term": self.raftCurrentTerm}


def _conf(
    settings: RaftSettings,
    self_addr: Address,
    shard_dir: Path,
    snapshotter: Snapshotter,
    on_state_changed: Callable[[int, int], None],
) -> SyncObjConf:
    return SyncObjConf(
        autoTickPeriod=settings.auto_tick_period,
        appendEntriesPeriod=settings.append_entries_period,
        raftMinTimeout=settings.min_timeout,
        raftMaxTimeout=settings.max_timeout,
        connectionTimeout=settings.connection_timeout,
        connectionRetryTime=min(1.0, settings.connection_timeout),
        leaderFallbackTimeout=settings.leader_fallback_timeout,
        appendEntriesBatchSizeBytes=2**16,
        sendBufferSize=settings.socket_buffer_bytes,
        recvBufferSize=settings.socket_buffer_bytes,
        logCompactionMinEntries=settings.compaction_min_entries,
        logCompactionMinTime=settings.compaction_min_seconds,
        commandsWaitLeader=True,
        bindAddress=str(self_addr),
        password=settings.password,
        journalFile=str(shard_dir / "journal.bin"),
        fullDumpFile=str(snapshotter.dump_path),
        serializer=snapshotter.serialize,
        deserializer=snapshotter.deserialize,
        serializeChecker=snapshotter.check,
        onStateChanged=on_state_changed,
        dynamicMembershipChange=True,
        maxBindRetries=10,
        bindRetryTime=0.5,
    )


def _elections(settings: RaftSettings) -> ElectionSettings:
    return ElectionSettings(
        pre_vote=settings.pre_vote,
        check_quorum=settings.check_quorum,
        min_timeout=settings.min_timeout,
        # an election timeout: followers have elected another leader by then
        quorum_window=settings.max_timeout,
        # three heartbeats late: this replica was not running (paused, starved)
        stall_gap=3 * settings.append_entries_period,
    )


def _group_command(cmds: list[Command]) -> Group:
    """One Raft entry whose commands apply independently (state.py `_group`)."""
    return Group(cmds=tuple(cmds))


def _retryable(cmd: Command) -> bool:
    """Safe to propose again: applied at most once thanks to its request id(s)."""
    if isinstance(cmd, Group):
        return all(_retryable(c) for c in cmd.cmds)
    return getattr(cmd, "rid", None) is not None or isinstance(cmd, Noop)


def _inline_bytes(cmd: Command) -> int:
    """Rough size of a command in the log (store/commands.py)."""
    return commands.inline_bytes(cmd)
