"""pysyncobj wiring for one shard: a SyncObj whose single replicated method
hands committed commands to the shard's Applier, and whose snapshots are our
binary format written off the tick thread.

Traps handled here (see docs/architecture.md):
- the apply hook runs on the tick thread: it only enqueues;
- a custom serializer runs on the tick thread too: it only enqueues a capture
  on the applier, a writer thread writes the file and renames it, and
  `serializeChecker` reports the outcome;
- pysyncobj binds 0.0.0.0 unless told: `bindAddress` is always the node's own;
- pysyncobj's forwarded commands report FAIL_REASON codes: mapped to typed errors.
"""
from __future__ import annotations

import base64
import logging
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
from pysyncobj.config import SERIALIZER_STATE
from pysyncobj.node import TCPNode
from pysyncobj.pipe_notifier import PipeNotifier

from . import commands
from .applier import Applier
from .commands import Command, Group, Noop
from .config import Address, RaftSettings
from .errors import Conflict, StoreError, Unavailable
from .futures import forward, settle
from .snapshot import read_snapshot, write_snapshot
from .threadnames import name_this_thread
from .transport import transport_class

log = logging.getLogger(__name__)

_FAIL_NAMES = {v: k for k, v in vars(FAIL_REASON).items() if k.isupper()}
MAX_ATTEMPTS = 3
GROUP_MAX_COMMANDS = 256
GROUP_IN_FLIGHT = 1  # entries of queued proposals in flight per replica; the next waits for one to land
GROUP_MAX_WAIT = 0.02  # ...or until its oldest proposal waited this long (seconds)
FLIGHT_STALE = 5.0  # an entry in flight this long no longer holds the queue back (seconds)
GROUP_MAX_BYTES = 48 << 10  # stay under pysyncobj's 64 KB append batch: bigger entries go in pieces


class ShardReplica(SyncObj):
    def __init__(self, shard: int, self_addr: Address, peers: list[Address], settings: RaftSettings,
                 shard_dir: Path, applier: Applier, on_snapshot: Callable[[int, int, float], None],
                 preloaded: tuple[Any, int, dict] | None = None, joining: bool = False) -> None:
        self.shard = shard
        # A joining replica is not a member until a leader adds it: it must not
        # campaign meanwhile (its rising term would depose the leader once added).
        self._joining = joining
        self._compaction_hold: tuple[float, int, frozenset] | None = None
        self._applier = applier
        self._on_snapshot = on_snapshot
        self._dump_path = shard_dir / "snapshot.bin"
        self._snapshot_status = SERIALIZER_STATE.NOT_SERIALIZING
        self._snapshot_lock = threading.Lock()
        self._preloaded = preloaded
        self._fsync = settings.fsync
        self.term_changes = 0
        self.leader_changes = 0
        self.snapshots = 0
        self.last_snapshot_seconds = 0.0
        self.last_snapshot_bytes = 0
        self.last_snapshot_index = 0
        self._last_leader: Any = None
        conf = SyncObjConf(
            autoTickPeriod=settings.auto_tick_period,
            appendEntriesPeriod=settings.append_entries_period,
            raftMinTimeout=settings.min_timeout,
            raftMaxTimeout=settings.max_timeout,
            connectionTimeout=settings.connection_timeout,
            connectionRetryTime=min(1.0, settings.connection_timeout),
            leaderFallbackTimeout=settings.leader_fallback_timeout,
            appendEntriesBatchSizeBytes=2 ** 16,
            sendBufferSize=settings.socket_buffer_bytes,
            recvBufferSize=settings.socket_buffer_bytes,
            logCompactionMinEntries=settings.compaction_min_entries,
            logCompactionMinTime=settings.compaction_min_seconds,
            commandsWaitLeader=True,
            bindAddress=str(self_addr),
            password=settings.password,
            journalFile=str(shard_dir / "journal.bin"),
            fullDumpFile=str(self._dump_path),
            serializer=self._serialize,
            deserializer=self._deserialize,
            serializeChecker=self._check_serialize,
            onStateChanged=self._state_changed,
            dynamicMembershipChange=True,
            maxBindRetries=10,
            bindRetryTime=0.5,
        )
        self._sent_mark = (0, 0)
        self._wake: PipeNotifier | None = None
        self._pending: dict[int, tuple] = {}  # id(outer future) -> (cmd, outer, attempt, leader then)
        self._group: list[tuple[Command, Future, int, float]] = []  # proposals waiting for the next tick
        self._group_lock = threading.Lock()
        self._in_flight: dict[int, float] = {}  # id(future) -> launch time of our entries not yet landed
        super().__init__(str(self_addr), [str(p) for p in peers], conf,
                         transportClass=transport_class(settings.transport))
        self.addOnTickCallback(self._send_eagerly)
        self.addOnTickCallback(self._track_leader)

    def _track_leader(self) -> None:
        """Count leader changes as this replica sees them (onStateChanged only
        fires when this replica's own role changes)."""
        leader = self._getLeader()
        if leader != self._last_leader:
            if leader is not None:
                self._joining = False
                self.leader_changes += 1
                log.info("shard %d: leader is now %s (term %d)", self.shard, leader, self.raftCurrentTerm,
                         extra=self._log_fields())
                self._repropose_after_leader_change(leader)
            self._last_leader = leader

    def _send_eagerly(self) -> None:
        """Ship new entries and a new commit index in the tick that produced them.

        pysyncobj otherwise waits for the next appendEntriesPeriod: a write
        waits up to one period for replication and a forwarded write another
        for the follower to learn the commit (~100 ms at the defaults). Runs
        on the tick thread, after commands were appended and entries applied.
        """
        if self._wake is None:  # created here, on the tick thread that owns the poller
            self._wake = PipeNotifier(self._poller)
            name_this_thread(f"raft-{self.shard}")
        if self._SyncObj__raftState != 2:  # leader
            return
        mark = (self._SyncObj__getCurrentLogIndex(), self.raftCommitIndex)
        if mark != self._sent_mark:
            self._sent_mark = mark
            self._SyncObj__sendAppendEntries()

    # ---- commands ------------------------------------------------------------
    @replicated
    def _apply(self, entry: tuple) -> Future:
        return self._applier.submit(self.raftLastApplied + 1, entry)

    def propose(self, cmd: Command) -> Future:
        """Replicate `cmd`; the Future resolves with its result on this replica
        once applied here, or fails with a StoreError.

        Group commit: proposals are queued and everything queued becomes ONE
        Raft entry (a `Group` command whose parts apply independently),
        so under many concurrent writers the log, the journal, the network and
        the followers do one entry's work for many writes. The queue goes out
        at once when this replica has no such entry in flight; otherwise when
        that entry lands (or after GROUP_MAX_WAIT): under load, writes gather
        while the previous entry commits. A lone proposal goes alone, at once.

        A command whose leader changed before it committed is proposed again
        (at most MAX_ATTEMPTS times): pysyncobj drops a command forwarded to
        a leader that died, and reports DISCARDED/UNKNOWN_OUTCOME for others.
        Re-proposing is safe because every write carries a request id the
        state machine applies at most once, and a no-op barrier is idempotent.
        """
        outer: Future = Future()
        cmd = commands.with_rid(cmd)
        if not _retryable(cmd):
            self._attempt(cmd, outer, 1)
            return outer
        with self._group_lock:
            self._group.append((cmd, outer, _inline_bytes(cmd), time.monotonic()))
            idle = not self._busy()
        if idle:
            self._wake_tick()
        return outer

    def _busy(self) -> bool:
        """Under `_group_lock`: GROUP_IN_FLIGHT entries of ours are in flight.
        One that has not landed after FLIGHT_STALE seconds no longer counts
        (pysyncobj drops a forwarded command silently if the link to the
        leader breaks while the leader stays: its callback never comes)."""
        if len(self._in_flight) < GROUP_IN_FLIGHT:
            return False
        cutoff = time.monotonic() - FLIGHT_STALE
        for key in [k for k, since in self._in_flight.items() if since < cutoff]:
            del self._in_flight[key]
        return len(self._in_flight) >= GROUP_IN_FLIGHT

    def _launched(self, outer: Future) -> None:
        with self._group_lock:
            self._in_flight[id(outer)] = time.monotonic()
        outer.add_done_callback(self._landed)

    def _landed(self, outer: Future) -> None:
        """An entry of queued proposals was applied here (or failed): the
        proposals queued meanwhile go now, as one entry."""
        with self._group_lock:
            self._in_flight.pop(id(outer), None)
            waiting = bool(self._group)
        if waiting:
            self._wake_tick()

    def _checkCommandsToApply(self) -> None:
        """Tick thread, before pysyncobj appends queued commands: turn the
        proposals queued since the last tick into entries."""
        with self._group_lock:
            queued = self._group
            if queued and (not self._busy() or time.monotonic() - queued[0][3] >= GROUP_MAX_WAIT):
                self._group = []
            else:
                queued = []
        while queued:
            take, size = 0, 0
            while take < len(queued) and take < GROUP_MAX_COMMANDS and (take == 0 or size + queued[take][2] <= GROUP_MAX_BYTES):
                size += queued[take][2]
                take += 1
            part, queued = queued[:take], queued[take:]
            outer = part[0][1]
            try:  # on the tick thread: a bad command must fail its callers, not the tick
                if len(part) == 1:
                    self._launched(outer)
                    self._attempt(part[0][0], outer, 1)
                    continue
                outer = Future()
                outer.add_done_callback(lambda f, part=part: _split(f, [o for _, o, _, _ in part]))
                self._launched(outer)
                self._attempt(Group(cmds=tuple(c for c, _, _, _ in part)), outer, 1)
            except Exception as e:
                log.exception("shard %d: could not propose", self.shard)
                settle(outer, exc=Unavailable(f"shard {self.shard}: could not propose: {e}"))
        SyncObj._checkCommandsToApply(self)

    def _attempt(self, cmd: Command, outer: Future, attempt: int) -> None:
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
            name = _FAIL_NAMES.get(err, str(err))
            lost = err in (FAIL_REASON.DISCARDED, FAIL_REASON.UNKNOWN_OUTCOME, FAIL_REASON.NOT_LEADER,
                           FAIL_REASON.LEADER_CHANGED)
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
            self._pending[key] = (cmd, outer, attempt, self._getLeader())
        self._apply(commands.to_log(cmd), callback=done)  # the start-up journal check verifies the seal
        if threading.current_thread() is not self._SyncObj__thread:
            self._wake_tick()

    def _repropose_after_leader_change(self, leader: Any) -> None:
        """Tick thread: commands in flight when the leader changed may have
        been lost on the way (forwarded to a dead leader): propose them again."""
        for key, (cmd, outer, attempt, sent_to) in list(self._pending.items()):
            if outer.done():
                self._pending.pop(key, None)
            elif sent_to != leader and attempt < MAX_ATTEMPTS:
                self._attempt(cmd, outer, attempt + 1)

    def _wake_tick(self) -> None:
        """Wake the tick thread out of its poll so the command is appended now,
        not up to autoTickPeriod later (pysyncobj only does this itself with
        appendEntriesUseBatch=False)."""
        wake = self._wake
        if wake is not None:
            try:
                wake.notify()
            except BlockingIOError:  # the pipe is full: the tick thread is awake anyway
                pass

    def _SyncObj__onMessageReceived(self, node: Any, message: dict) -> None:
        """pysyncobj 0.3.17 lowers nextIndex when an older append's success
        reply arrives after newer appends were sent (pipelining, which eager
        sending makes common); every later tick then re-sends entries already
        in flight and followers log 'truncating already-applied'. Keep
        nextIndex from moving backwards on such replies."""
        if message.get("type") == "next_node_idx" and message.get("success") and not message.get("reset"):
            before = self._SyncObj__raftNextIndex.get(node)
            SyncObj._SyncObj__onMessageReceived(self, node, message)
            after = self._SyncObj__raftNextIndex.get(node)
            if before is not None and after is not None and after < before:
                self._SyncObj__raftNextIndex[node] = before
            return
        SyncObj._SyncObj__onMessageReceived(self, node, message)

    def _SyncObj__connectedToAnyone(self) -> bool:
        if self._joining:
            return False
        return SyncObj._SyncObj__connectedToAnyone(self)

    # ---- membership ----------------------------------------------------------
    def members(self) -> list[str]:
        """Raft addresses of this shard's voting members, this replica included,
        as this replica knows them (a change applies when its entry is appended)."""
        for _ in range(5):  # the tick thread may change the set while we copy it
            try:
                others = [n.id for n in list(self._SyncObj__otherNodes)]
                break
            except RuntimeError:
                continue
        else:
            others = []
        return sorted(others + [self.selfNode.id])

    def change_member(self, kind: str, raft_address: str) -> Future:
        """Add (`kind="add"`) or remove a voting member through the log; the
        Future resolves once the change committed. pysyncobj allows one change
        at a time and refuses to remove the leader itself (REQUEST_DENIED)."""
        outer: Future = Future()

        def done(res: Any, err: int) -> None:
            if err == FAIL_REASON.SUCCESS:
                settle(outer, {"shard": self.shard, kind: raft_address})
            elif err == FAIL_REASON.REQUEST_DENIED:
                settle(outer, exc=Conflict(
                    f"shard {self.shard}: membership change refused (another change is still "
                    "committing, the node is already in that state, or it is the leader); retry"))
            else:
                settle(outer, exc=Unavailable(
                    f"shard {self.shard}: membership change failed ({_FAIL_NAMES.get(err, err)}); retry",
                    reason=str(_FAIL_NAMES.get(err, err)).lower()))

        change = self.addNodeToCluster if kind == "add" else self.removeNodeFromCluster
        change(raft_address, callback=done)
        self._wake_tick()
        return outer

    def hold_compaction(self, index: int, seconds: float) -> None:
        """Keep the log after `index` until a node that joins from a snapshot
        at `index` has caught up (or `seconds` pass): otherwise a compaction
        meanwhile would make this leader send it a snapshot through Raft
        messages, pysyncobj's slow path."""
        self._compaction_hold = (time.monotonic() + seconds, index, frozenset(self.members()))

    def _SyncObj__tryLogCompaction(self) -> None:
        hold = self._compaction_hold
        if hold is not None:
            until, index, before = hold
            match = self._SyncObj__raftMatchIndex
            joined = [n for n in self._SyncObj__otherNodes if n.id not in before]
            if time.monotonic() > until or (joined and all(match.get(n, 0) >= index for n in joined)):
                self._compaction_hold = None
            else:
                return
        SyncObj._SyncObj__tryLogCompaction(self)

    # ---- snapshots -----------------------------------------------------------
    def _serialize(self, tmp_file: str, meta: tuple) -> None:
        """Tick thread: queue a capture; the applier reaches it at exactly this index."""
        last, prev, cluster = meta
        raft_meta = {
            "entries": [[base64.b64encode(e[0]).decode(), e[1], e[2]] for e in (last, prev)],
            "cluster": sorted(n.id for n in cluster),
        }
        index = last[1]
        with self._snapshot_lock:
            self._snapshot_status = SERIALIZER_STATE.SERIALIZING
        self._applier.call(lambda: self._capture_and_write(index, raft_meta))

    def _capture_and_write(self, index: int, raft_meta: dict) -> None:
        state = self._applier.state
        raft_meta["members"] = dict(state.members)
        tensors = state.capture()
        dedupe = state.dedupe.copy()
        threading.Thread(target=self._write, args=(tensors, dedupe, index, raft_meta),
                         name=f"snapshot-{self.shard}", daemon=True).start()

    def _write(self, tensors, dedupe, index, raft_meta) -> None:
        name_this_thread()
        started = time.perf_counter()
        partial = self._dump_path.with_suffix(".writing")
        try:
            size = write_snapshot(partial, tensors, dedupe, self.shard, index, raft_meta, self._fsync)
            os.replace(partial, self._dump_path)
            status = SERIALIZER_STATE.SUCCESS
            self.snapshots += 1
            self.last_snapshot_seconds = time.perf_counter() - started
            self.last_snapshot_bytes = size
            self.last_snapshot_index = index
            log.info("shard %d: snapshot at index %d, %d bytes in %.2fs",
                     self.shard, index, size, self.last_snapshot_seconds, extra=self._log_fields())
            self._on_snapshot(index, size, self.last_snapshot_seconds)
        except Exception:
            log.exception("shard %d: snapshot at index %d failed", self.shard, index, extra=self._log_fields())
            status = SERIALIZER_STATE.FAILED
        with self._snapshot_lock:
            self._snapshot_status = status

    def _check_serialize(self) -> int:
        with self._snapshot_lock:
            status = self._snapshot_status
            if status in (SERIALIZER_STATE.SUCCESS, SERIALIZER_STATE.FAILED):
                self._snapshot_status = SERIALIZER_STATE.NOT_SERIALIZING
            return status

    def _deserialize(self, path: str) -> tuple:
        """Tick thread, at start or when a leader sent a snapshot: install it."""
        preloaded, self._preloaded = self._preloaded, None
        if preloaded is not None:
            state, index, raft_meta = preloaded
        else:
            state, index, raft_meta = read_snapshot(path, self._applier.state.dedupe_window)
        self._applier.call(lambda: self._applier.install(state, index)).result()
        self.last_snapshot_index = index
        entries = [(base64.b64decode(c), i, t) for c, i, t in raft_meta["entries"]]
        cluster = {TCPNode(addr) for addr in raft_meta["cluster"]}
        log.info("shard %d: installed snapshot at index %d (%d tensors)",
                 self.shard, index, len(state.tensors))
        return entries[0], entries[1], cluster

    # ---- status --------------------------------------------------------------
    def _state_changed(self, old: int, new: int) -> None:
        log.info("shard %d: raft state %s -> %s (term %d)", self.shard, old, new, self.raftCurrentTerm,
                 extra=self._log_fields())

    def _log_fields(self) -> dict:
        """Structured fields for the JSON log formatter."""
        return {"shard": self.shard, "term": self.raftCurrentTerm}

    @property
    def leader_address(self) -> str | None:
        leader = self._getLeader()
        return None if leader is None else leader.id

    @property
    def role(self) -> str:
        state = self._SyncObj__raftState
        return {0: "follower", 1: "candidate", 2: "leader"}.get(state, "unknown")

    @property
    def leader_commit_index(self) -> int | None:
        return self._SyncObj__leaderCommitIndex

    @property
    def log_entries(self) -> int:
        return self._getRaftLogSize()



def _retryable(cmd: Command) -> bool:
    """Safe to propose again: applied at most once thanks to its request id(s)."""
    if isinstance(cmd, Group):
        return all(_retryable(c) for c in cmd.cmds)
    return getattr(cmd, "rid", None) is not None or isinstance(cmd, Noop)


def _inline_bytes(cmd: Command) -> int:
    """Rough size of a command in the log (store/commands.py)."""
    return commands.inline_bytes(cmd)


def _split(group: Future, outers: list[Future]) -> None:
    """Hand each part of a group its own outcome."""
    exc = group.exception()
    for i, outer in enumerate(outers):
        if exc is not None:
            settle(outer, exc=exc)
            continue
        outcome = group.result()["outcomes"][i]
        if "ok" in outcome:
            settle(outer, outcome["ok"])
        else:
            settle(outer, exc=StoreError.from_dict(outcome))
