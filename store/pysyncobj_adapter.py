"""Everything paramstore does to pysyncobj beyond its public API, in one place.

pysyncobj 0.3.17 keeps its Raft state in name-mangled attributes
(`self.__raftState` is `_SyncObj__raftState`) and offers no hooks for what we
change, so `TunedSyncObj` overrides private methods and reads private fields,
and `bind_outgoing_raft` replaces the socket module of its connection code.
Each change says what pysyncobj does there and why we differ;
docs/architecture.md ("pysyncobj settings and why") has the measurements.

Any other pysyncobj version may rename or rework these internals. `RELIES_ON`
lists every one of them; importing this module fails with a clear message
when one is missing, and tests/store/test_pysyncobj_adapter.py also checks
that the installed version is `PINNED_VERSION`.
"""

from __future__ import annotations

import base64
import errno
import importlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf
from pysyncobj import replicated as _replicated
from pysyncobj.config import SERIALIZER_STATE
from pysyncobj.node import TCPNode
from pysyncobj.transport import TCPTransport, Transport

from .durable_journal import DurableJournal
from .elections import CheckQuorum, ElectionSettings, LeaderLease, PreVoteRound
from .refusals import RefusalLog
from .sockets import source_address
from .threadnames import name_this_thread

__all__ = [
    "FAIL_REASON",
    "MAX_RAFT_FRAME",
    "PINNED_VERSION",
    "RELIES_ON",
    "SERIALIZER_STATE",
    "CountingTransport",
    "ElectionSettings",
    "LinkFilterTransport",
    "SyncObjConf",
    "TCPTransport",
    "Transport",
    "TunedSyncObj",
    "bind_outgoing_raft",
    "count_raft_bytes",
    "dump_meta_from_json",
    "dump_meta_to_json",
    "fail_name",
    "missing_names",
    "replicated",
]

log = logging.getLogger(__name__)

PINNED_VERSION = "0.3.17"

# (owner, name, kind): "attr" must be an attribute of the owner; "field" must
# be assigned in the owner's __init__; "const" must be a string constant of the
# owner's code (message keys we read). Owners are "module" or "module:qualname".
_ON_MESSAGE = "pysyncobj.syncobj:SyncObj._SyncObj__onMessageReceived"
RELIES_ON: list[tuple[str, str, str]] = [
    ("pysyncobj.syncobj:SyncObj", "_SyncObj__onMessageReceived", "attr"),
    ("pysyncobj.syncobj:SyncObj", "_SyncObj__connectedToAnyone", "attr"),
    ("pysyncobj.syncobj:SyncObj", "_SyncObj__tryLogCompaction", "attr"),
    ("pysyncobj.syncobj:SyncObj", "_SyncObj__sendAppendEntries", "attr"),
    ("pysyncobj.syncobj:SyncObj", "_SyncObj__getCurrentLogIndex", "attr"),
    ("pysyncobj.syncobj:SyncObj", "_checkCommandsToApply", "attr"),
    ("pysyncobj.syncobj:SyncObj", "_getLeader", "attr"),
    ("pysyncobj.syncobj:SyncObj", "_getRaftLogSize", "attr"),
    ("pysyncobj.syncobj:SyncObj", "_SyncObj__raftState", "field"),
    ("pysyncobj.syncobj:SyncObj", "_SyncObj__raftNextIndex", "field"),
    ("pysyncobj.syncobj:SyncObj", "_SyncObj__raftMatchIndex", "field"),
    ("pysyncobj.syncobj:SyncObj", "_SyncObj__otherNodes", "field"),
    ("pysyncobj.syncobj:SyncObj", "_SyncObj__leaderCommitIndex", "field"),
    ("pysyncobj.syncobj:SyncObj", "_SyncObj__thread", "field"),
    ("pysyncobj.syncobj:SyncObj", "_poller", "field"),
    (_ON_MESSAGE, "next_node_idx", "const"),
    (_ON_MESSAGE, "reset", "const"),
    (_ON_MESSAGE, "success", "const"),
    # pre-vote and check-quorum (GuardedElections)
    ("pysyncobj.syncobj:SyncObj", "_SyncObj__transport", "field"),
    ("pysyncobj.syncobj:SyncObj", "_SyncObj__raftElectionDeadline", "field"),
    ("pysyncobj.syncobj:SyncObj", "_SyncObj__transferInProgress", "field"),
    ("pysyncobj.syncobj:SyncObj", "_SyncObj__raftLeader", "field"),
    ("pysyncobj.syncobj:SyncObj", "_SyncObj__generateRaftTimeout", "attr"),
    ("pysyncobj.syncobj:SyncObj", "_SyncObj__getCurrentLogTerm", "attr"),
    ("pysyncobj.syncobj:SyncObj", "_SyncObj__setState", "attr"),
    (_ON_MESSAGE, "request_vote", "const"),
    (_ON_MESSAGE, "append_entries", "const"),
    (_ON_MESSAGE, "timeout_now", "const"),
    ("pysyncobj.syncobj:_RAFT_STATE", "FOLLOWER", "attr"),
    ("pysyncobj.syncobj:_RAFT_STATE", "CANDIDATE", "attr"),
    ("pysyncobj.syncobj:_RAFT_STATE", "LEADER", "attr"),
    ("pysyncobj.tcp_connection", "socket", "attr"),
    ("pysyncobj.tcp_connection:TcpConnection.connect", "socket", "code"),
    ("pysyncobj.pipe_notifier:PipeNotifier", "notify", "attr"),
    ("pysyncobj.transport:TCPTransport", "_onMessageReceived", "attr"),
    ("pysyncobj.transport:TCPTransport", "send", "attr"),
    ("pysyncobj.transport:TCPTransport", "_selfNode", "field"),
    # byte counts per peer (CountingTransport, CountingSocket)
    ("pysyncobj.tcp_server", "socket", "attr"),
    ("pysyncobj.tcp_server:TcpServer.bind", "socket", "code"),
    ("pysyncobj.tcp_connection:TcpConnection", "_TcpConnection__socket", "field"),
    ("pysyncobj.transport:TCPTransport", "_connectIfNecessarySingle", "attr"),
    ("pysyncobj.transport:TCPTransport", "_onIncomingMessageReceived", "attr"),
    ("pysyncobj.transport:TCPTransport", "_connToNode", "attr"),
    ("pysyncobj.transport:TCPTransport", "_connections", "field"),
    ("pysyncobj.transport:TCPTransport", "_syncObj", "field"),
    # durability (the section "durable journal" below)
    ("pysyncobj.syncobj", "createJournal", "attr"),
    ("pysyncobj.syncobj:SyncObj", "_SyncObj__raftLog", "field"),
    ("pysyncobj.syncobj:SyncObj", "_SyncObj__sendNextNodeIdx", "attr"),
    ("pysyncobj.syncobj:SyncObj", "_onTick", "attr"),
    ("pysyncobj.syncobj:SyncObj", "_SyncObj__applyLogEntries", "attr"),
    # membership changes in the journal adopted at start (_adopt_logged_membership)
    ("pysyncobj.syncobj:SyncObj", "_SyncObj__needLoadDumpFile", "field"),
    ("pysyncobj.syncobj:SyncObj", "_SyncObj__raftLastApplied", "field"),
    ("pysyncobj.syncobj:SyncObj", "_SyncObj__getEntries", "attr"),
    ("pysyncobj.syncobj:SyncObj", "_SyncObj__parseChangeClusterRequest", "attr"),
    ("pysyncobj.syncobj:SyncObj", "_SyncObj__doChangeCluster", "attr"),
    # peer input limits (the section "Raft frames from peers" below)
    ("pysyncobj.tcp_connection:TcpConnection", "_TcpConnection__processRead", "attr"),
    ("pysyncobj.tcp_connection:TcpConnection", "_TcpConnection__processParseMessage", "attr"),
    ("pysyncobj.tcp_connection:TcpConnection", "_TcpConnection__readBuffer", "field"),
    ("pysyncobj.tcp_connection:TcpConnection", "_TcpConnection__socket", "field"),
    ("pysyncobj.tcp_connection:TcpConnection", "_TcpConnection__state", "field"),
    ("pysyncobj.tcp_connection:CONNECTION_STATE", "DISCONNECTED", "attr"),
]


def _resolve(owner: str) -> Any:
    module, _, qualname = owner.partition(":")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError:
        return None
    for part in filter(None, qualname.split(".")):
        obj = getattr(obj, part, None)
    return obj


def _has(owner: str, name: str, kind: str) -> bool:
    obj = _resolve(owner)
    if obj is None:
        return False
    if kind == "attr":
        return hasattr(obj, name)
    code = (obj.__init__ if kind == "field" else obj).__code__
    return name in (code.co_consts if kind == "const" else code.co_names)


def missing_names() -> list[str]:
    """The relied-on pysyncobj internals the installed pysyncobj lacks."""
    return [f"{owner} {name} ({kind})" for owner, name, kind in RELIES_ON if not _has(owner, name, kind)]


def installed_version() -> str:
    return str(metadata.version("pysyncobj"))


if missing_names():
    raise ImportError(
        f"pysyncobj {installed_version()} lacks internals paramstore relies on (built for {PINNED_VERSION}): "
        + "; ".join(missing_names())
        + ". Install pysyncobj=="
        + PINNED_VERSION
    )
if installed_version() != PINNED_VERSION:
    log.warning("pysyncobj %s installed; paramstore is built and measured with %s", installed_version(), PINNED_VERSION)

# Internal modules and classes, imported once the check above passed.
_RAFT_STATE = _resolve("pysyncobj.syncobj:_RAFT_STATE")
_tcp = _resolve("pysyncobj.tcp_connection")
_tcp_server = _resolve("pysyncobj.tcp_server")
_PipeNotifier = _resolve("pysyncobj.pipe_notifier:PipeNotifier")
_syncobj_module = _resolve("pysyncobj.syncobj")

# Journal space the tick needs reserved before it appends queued commands (a
# few group-commit entries); ShardReplica refuses writes earlier, with more.
DRAIN_HEADROOM = 256 << 10

# pysyncobj ships no type information: its classes are Any to mypy.
replicated: Callable[[Callable[..., Any]], Callable[..., Any]] = _replicated

_FAIL_NAMES: dict[int, str] = {v: k for k, v in vars(FAIL_REASON).items() if k.isupper()}
_ROLES = {_RAFT_STATE.FOLLOWER: "follower", _RAFT_STATE.CANDIDATE: "candidate", _RAFT_STATE.LEADER: "leader"}


def fail_name(err: int) -> str:
    """FAIL_REASON's name for a callback's error code."""
    return _FAIL_NAMES.get(err, str(err))


# ---- pre-vote and check-quorum ---------------------------------------------------------
_PRE_VOTE_REQUEST = "pre_vote_request"
_PRE_VOTE_RESPONSE = "pre_vote_response"
_TRANSFER_CAMPAIGN = "transfer_campaign"


class GuardedElections:
    """Pre-vote, the leader lease and check-quorum (store/elections.py has the
    rules) wired into pysyncobj's election code. Mixed into `TunedSyncObj`,
    which calls `_election_may_start` when pysyncobj's election timer fired
    and `_election_message` for every received message; the tick callback
    `_check_quorum` is added in its __init__. pysyncobj ignores message types
    it does not know, so the three new ones cost nothing to older peers (who
    never answer a pre-vote, though: run one setting across a cluster)."""

    _SyncObj__raftState: Any
    _SyncObj__otherNodes: Any
    _SyncObj__transport: Any
    _SyncObj__raftElectionDeadline: float
    _SyncObj__transferInProgress: bool
    _SyncObj__raftLeader: Any
    _SyncObj__getCurrentLogTerm: Callable[[], int]
    _SyncObj__getCurrentLogIndex: Callable[[], int]
    _SyncObj__generateRaftTimeout: Callable[[], float]
    _SyncObj__setState: Callable[[int], None]
    raftCurrentTerm: int
    selfNode: Any

    def _init_elections(self, settings: ElectionSettings | None) -> None:
        self._elections = settings
        self._lease = LeaderLease(settings.min_timeout if settings else 0.0)
        self._pre_vote = PreVoteRound()
        self._quorum = CheckQuorum(settings.quorum_window, settings.stall_gap) if settings else None

    @property
    def pre_vote_rounds(self) -> tuple[int, int]:
        """(rounds started, rounds won) since start."""
        return self._pre_vote.rounds_started, self._pre_vote.rounds_won

    @property
    def quorum_step_downs(self) -> int:
        return self._quorum.step_downs if self._quorum else 0

    def _is_leader(self) -> bool:
        return bool(self._SyncObj__raftState == _RAFT_STATE.LEADER)

    def _voter_ids(self) -> list[str]:
        return [n.id for n in self._SyncObj__otherNodes]

    def _my_log(self) -> tuple[int, int]:
        return int(self._SyncObj__getCurrentLogTerm()), int(self._SyncObj__getCurrentLogIndex())

    def _send(self, node: Any, message: dict[str, Any]) -> None:
        self._SyncObj__transport.send(node, message)

    def _election_may_start(self) -> bool:
        """Tick thread: pysyncobj's election timer fired and it is about to
        raise the term and ask for votes. With pre-vote on, it may only once a
        pre-vote round won; otherwise a round starts here and pysyncobj's
        timer is re-armed, so rounds repeat once per election timeout."""
        settings = self._elections
        next_term = self.raftCurrentTerm + 1
        if self._SyncObj__transferInProgress:
            # TimeoutNow from our leader: the other followers still hold its
            # lease, so no pre-vote; the announcement lets them vote anyway.
            self._announce_campaign(next_term)
            return True
        if settings is None or not settings.pre_vote or self._pre_vote.take_win(next_term):
            return True
        if self._pre_vote.gave_up(settings.give_up_rounds):
            # The others hear a leader that cannot reach us (a restarted replica
            # that does not know a member added since its snapshot, a one-way
            # link): what pysyncobj would do, term and all, lease or not.
            log.warning(
                "no leader heard and no pre-vote won in %d election timeouts: campaigning for term %d anyway",
                settings.give_up_rounds,
                next_term,
            )
            self._announce_campaign(next_term)
            return True
        now = time.monotonic()
        self._SyncObj__raftElectionDeadline = now + self._SyncObj__generateRaftTimeout()
        voters = self._voter_ids()
        if self._pre_vote.start(next_term, self.selfNode.id, len(voters) + 1):
            return self._pre_vote.take_win(next_term)
        last_term, last_index = self._my_log()
        request = {
            "type": _PRE_VOTE_REQUEST,
            "term": next_term,
            "round": self._pre_vote.round,
            "last_log_term": last_term,
            "last_log_index": last_index,
        }
        for node in self._SyncObj__otherNodes:
            self._send(node, request)
        return False

    def _announce_campaign(self, term: int) -> None:
        """Tell the others that our vote request for `term` may pass their
        lease. It travels on the same connection as the request, ahead of it."""
        for node in self._SyncObj__otherNodes:
            self._send(node, {"type": _TRANSFER_CAMPAIGN, "term": term})

    def _election_message(self, node: Any, message: dict[str, Any]) -> bool:
        """Tick thread, every received message; True if consumed here (pysyncobj must not see it)."""
        kind = message.get("type")
        settings = self._elections
        if settings is None:
            return False
        if kind == "append_entries":  # the hot path: every entry and heartbeat
            if message.get("term", -1) >= self.raftCurrentTerm:
                self._lease.heard_from_leader(time.monotonic())
                self._pre_vote.cancel()
            return False
        if kind == "next_node_idx":
            if self._quorum is not None:
                self._quorum.replied(node.id, time.monotonic())
            return False
        now = time.monotonic()
        if kind == _PRE_VOTE_REQUEST:
            if node in self._SyncObj__otherNodes:
                self._answer_pre_vote(node, message, now)
            return True
        if kind == _PRE_VOTE_RESPONSE:
            if message.get("granted") and node in self._SyncObj__otherNodes:
                won = self._pre_vote.granted(
                    node.id, int(message.get("round", -1)), int(message.get("term", -1)), len(self._voter_ids()) + 1
                )
                if won:  # campaign in this very tick: pysyncobj checks its timer at the start of the next
                    self._SyncObj__raftElectionDeadline = 0.0
            return True
        if kind == _TRANSFER_CAMPAIGN:
            self._lease.transfer_announced(node.id, int(message.get("term", -1)))
            return True
        if kind == "request_vote" and settings.pre_vote:
            refuse = self._lease.refuse_vote(now, self._is_leader(), node.id, int(message.get("term", -1)))
            if refuse:
                log.info(
                    "ignoring a vote request from %s for term %s: a leader was heard from within %.2fs",
                    node.id,
                    message.get("term"),
                    settings.min_timeout,
                )
            return refuse
        return False

    def _answer_pre_vote(self, node: Any, message: dict[str, Any], now: float) -> None:
        settings = self._elections
        assert settings is not None
        term = int(message.get("term", -1))
        candidate = (int(message.get("last_log_term", -1)), int(message.get("last_log_index", -1)))
        granted = settings.pre_vote and self._lease.grant_pre_vote(
            now, self._is_leader(), self.raftCurrentTerm, self._my_log(), term, candidate
        )
        self._send(node, {"type": _PRE_VOTE_RESPONSE, "term": term, "round": message.get("round"), "granted": granted})

    def _check_quorum(self) -> None:
        """On-tick callback. pysyncobj's own check steps a leader down only
        after leaderFallbackTimeout; this one after an election timeout, as
        pysyncobj's fallback does it (follower, no leader) and with the
        election timer re-armed."""
        settings = self._elections
        quorum = self._quorum
        if settings is None or quorum is None:
            return
        if self._is_leader():
            self._pre_vote.cancel()  # a leader's own lease: pre-vote counts afresh once it is lost
        if not settings.check_quorum:
            return
        now = time.monotonic()
        if quorum.tick(now, self._is_leader(), self._voter_ids()):
            log.warning(
                "stepping down: no majority answered within %.2fs (term %d)",
                settings.quorum_window,
                self.raftCurrentTerm,
            )
            self._SyncObj__setState(_RAFT_STATE.FOLLOWER)
            self._SyncObj__raftLeader = None
            self._SyncObj__raftElectionDeadline = now + self._SyncObj__generateRaftTimeout()


class TunedSyncObj(GuardedElections, SyncObj):  # type: ignore[misc]  # pysyncobj ships no types: SyncObj is Any
    """SyncObj with eager append entries, wake on propose, the nextIndex
    guard and three hooks for subclasses: `_before_append` (tick thread,
    before queued commands are appended), `_may_campaign` and
    `_compaction_may_run`."""

    guard_next_index = True  # bench/rawpeer.py turns it off to measure pysyncobj as shipped

    def __init__(
        self,
        self_addr: str,
        peers: list[str],
        conf: SyncObjConf,
        transport: type[Transport] = TCPTransport,
        thread_name: str | None = None,
        fsync: bool | None = None,
        elections: ElectionSettings | None = None,
    ) -> None:
        """`fsync`: None keeps pysyncobj's own journal (mmap, never synced);
        True or False writes it with DurableJournal, synced or not.
        `elections` None: pysyncobj's own elections (bench/rawpeer.py)."""
        self._init_elections(elections)
        self._sent_mark = (0, 0)
        self._wake: Any = None  # pysyncobj PipeNotifier
        self._thread_name = thread_name
        self._journal: DurableJournal | None = None
        self._held_acks: dict[Any, tuple[int, int]] = {}  # node -> (next index, term) awaiting the sync thread
        self._held_since: dict[Any, float] = {}  # node -> when it last heard from us while an answer was held
        self._keepalive = conf.connectionTimeout / 4
        self._commit_cap: int | None = None
        self._full_logged = 0.0
        self._membership_adopted = not conf.dynamicMembershipChange
        if fsync is not None and conf.journalFile:
            _durable_journals[conf.journalFile] = fsync
        try:
            super().__init__(self_addr, peers, conf, transportClass=transport)
        finally:
            _durable_journals.pop(conf.journalFile, None)
        journal = self._SyncObj__raftLog  # the journal createJournal made
        if isinstance(journal, DurableJournal):
            self._journal = journal
            journal.on_durable = self.wake_tick
        self.addOnTickCallback(self._send_eagerly)
        self.addOnTickCallback(self._sync_journal)  # after _send_eagerly: our fdatasync overlaps the followers'
        self.addOnTickCallback(self._check_quorum)

    # ---- hooks for subclasses ----------------------------------------------------
    def _before_append(self) -> None:
        """Tick thread, just before pysyncobj appends (or forwards) queued commands."""

    def _may_campaign(self) -> bool:
        return True

    def _compaction_may_run(self) -> bool:
        return True

    # ---- eager append entries, wake on propose ------------------------------------
    def _send_eagerly(self) -> None:
        """On-tick callback. pysyncobj (appendEntriesUseBatch=True) sends new
        entries and the commit index only every appendEntriesPeriod: a write
        waits up to a period for replication and a forwarded write another
        for the follower to learn the commit. We send in the tick that moved
        the leader's last index or commit index (1 KB sync write 106 -> 8 ms)."""
        if self._wake is None:  # created here, on the tick thread that owns the poller
            self._wake = _PipeNotifier(self._poller)
            if self._thread_name is not None:
                name_this_thread(self._thread_name)
        if self._SyncObj__raftState != _RAFT_STATE.LEADER:
            return
        mark = (self._SyncObj__getCurrentLogIndex(), self.raftCommitIndex)
        if mark != self._sent_mark:
            self._sent_mark = mark
            self._SyncObj__sendAppendEntries()

    def wake_tick(self) -> None:
        """Wake the tick thread out of its poll. pysyncobj only does this for
        queued commands with appendEntriesUseBatch=False (which loses
        callbacks); otherwise a command waits up to autoTickPeriod to be
        appended (leader-path sync write 8 -> 2.3 ms)."""
        wake = self._wake
        if wake is not None:
            try:  # noqa: SIM105 (every proposal passes here: contextlib.suppress allocates, try costs nothing)
                wake.notify()
            except BlockingIOError:  # the pipe is full: the tick thread is awake anyway
                pass

    def on_tick_thread(self) -> bool:
        return threading.current_thread() is self._SyncObj__thread

    def _checkCommandsToApply(self) -> None:
        """pysyncobj drains its command queue here each tick; our hook runs
        first. On a full disk the queue waits (see `journal_has_room`)."""
        self._before_append()
        if not self.journal_has_room(DRAIN_HEADROOM):
            return
        SyncObj._checkCommandsToApply(self)

    # ---- overrides of pysyncobj's private methods ---------------------------------
    def _SyncObj__onMessageReceived(self, node: Any, message: dict[str, Any]) -> None:
        """pysyncobj sets nextIndex from every successful append reply, so a
        late reply to an older append (pipelining, which eager sending makes
        common) moves it backwards: every later tick re-sends entries already
        in flight and followers log 'truncating already-applied'. We keep
        nextIndex from moving backwards on such replies (raw pysyncobj
        15K -> 21K ops/s). Pre-vote and check-quorum see every message first."""
        if self._election_message(node, message):
            return
        if (
            self.guard_next_index
            and message.get("type") == "next_node_idx"
            and message.get("success")
            and not message.get("reset")
        ):
            before = self._SyncObj__raftNextIndex.get(node)
            SyncObj._SyncObj__onMessageReceived(self, node, message)
            after = self._SyncObj__raftNextIndex.get(node)
            if before is not None and after is not None and after < before:
                self._SyncObj__raftNextIndex[node] = before
            return
        self._append_or_log_full_disk(node, message)

    def _SyncObj__connectedToAnyone(self) -> bool:
        """pysyncobj starts an election on timeout when connected to any
        peer (the only place it asks); `_may_campaign` can veto that (a joining
        replica must not), then pre-vote (`_election_may_start`)."""
        if not self._may_campaign():
            return False
        return bool(SyncObj._SyncObj__connectedToAnyone(self)) and self._election_may_start()

    def _SyncObj__tryLogCompaction(self) -> None:
        """pysyncobj checks each tick whether to snapshot and drop the log;
        `_compaction_may_run` can postpone that."""
        if not self._compaction_may_run():
            return
        SyncObj._SyncObj__tryLogCompaction(self)

    # ---- durable journal (store/durable_journal.py): durable before acknowledging ----
    # Raft counts an entry towards a commit once it is on a replica's stable
    # storage. pysyncobj acknowledges an append (next_node_idx) right after
    # adding the entries to its journal, and the leader counts its own log
    # without asking. The journal's sync thread fdatasyncs once per batch
    # while this (tick) thread keeps sending heartbeats and answering votes
    # (Raft thesis 10.2.1): a successful next_node_idx leaves only once the
    # entries it names are durable (held in `_held_acks` until then), and the
    # leader's commit computation sees its own log only up to the durable
    # index. Term and vote are made durable by DurableJournal.setCurrentTerm
    # itself, synchronously.
    def _sync_journal(self) -> None:
        """On-tick callback, after _send_eagerly: the leader's fdatasync
        overlaps the followers'. Sends the answers the last sync released."""
        journal = self._journal
        if journal is None:
            return
        journal.request_sync()
        if self._held_acks:
            self._release_acks(journal.durable_index)

    def _release_acks(self, durable: int) -> None:
        """Sends the held answers now durable. The others' leaders get an
        empty answer (success and reset false: it moves nothing but the time
        of their last answer) every quarter of the connection timeout, or
        pysyncobj drops a connection that stays silent through a slow sync."""
        term = self.raftCurrentTerm
        now = time.monotonic()
        for node, (next_idx, acked_term) in list(self._held_acks.items()):
            if acked_term != term or next_idx - 1 <= durable:
                del self._held_acks[node]
                self._held_since.pop(node, None)
                if acked_term == term:  # pysyncobj's answer names no term: never send one into a later term
                    SyncObj._SyncObj__sendNextNodeIdx(self, node, False, next_idx, True)
            elif now - self._held_since.setdefault(node, now) >= self._keepalive:
                self._held_since[node] = now
                SyncObj._SyncObj__sendNextNodeIdx(self, node, False, next_idx, False)

    def journal_has_room(self, headroom: int) -> bool:
        """False while the journal cannot reserve `headroom` more bytes (a full disk)."""
        journal = self._journal
        return journal is None or journal.has_room(headroom)

    def _append_or_log_full_disk(self, node: Any, message: dict[str, Any]) -> None:
        """A follower whose disk is full cannot append: pysyncobj's handler
        raises ENOSPC from the journal before adding the entry (it stays in
        memory unchanged) and answers nothing, so the leader sends it again
        later; the replica keeps serving reads."""
        try:
            SyncObj._SyncObj__onMessageReceived(self, node, message)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            now = time.monotonic()
            if now - self._full_logged > 10.0:
                self._full_logged = now
                log.warning("Raft journal: disk full, not appending entries from %s", node)

    def _SyncObj__sendNextNodeIdx(
        self, node: Any, reset: bool = False, nextNodeIdx: int | None = None, success: bool = False
    ) -> None:
        """A successful append answer leaves once what it names is durable.
        Failures move no match index and leave at once."""
        journal = self._journal
        if journal is None or not success:
            SyncObj._SyncObj__sendNextNodeIdx(self, node, reset, nextNodeIdx, success)
            return
        if nextNodeIdx is None:
            nextNodeIdx = self._SyncObj__getCurrentLogIndex() + 1
        journal.request_sync()
        if nextNodeIdx - 1 <= journal.durable_index:
            SyncObj._SyncObj__sendNextNodeIdx(self, node, reset, nextNodeIdx, success)
            return
        term = self.raftCurrentTerm
        held = self._held_acks.get(node)
        if held is None or held[1] != term or held[0] < nextNodeIdx:
            self._held_acks[node] = (nextNodeIdx, term)

    def _SyncObj__getCurrentLogIndex(self) -> int:
        """pysyncobj's, capped (`_commit_cap`) while the leader computes its commit index."""
        last: int = self._SyncObj__raftLog[-1][1]
        cap = self._commit_cap
        return last if cap is None or cap >= last else cap

    def _SyncObj__applyLogEntries(self) -> bool:
        """pysyncobj calls this right after the leader's commit computation:
        the cap set in `_onTick` ends here, before anything appends or sends."""
        self._commit_cap = None
        return bool(SyncObj._SyncObj__applyLogEntries(self))

    def _onTick(self, timeToWait: float = 0.0) -> None:
        """The leader's commit computation at the start of the tick counts its
        own log only up to the durable index."""
        journal = self._journal
        if (
            journal is not None
            and self._SyncObj__raftState == _RAFT_STATE.LEADER
            and not self._SyncObj__needLoadDumpFile
        ):
            journal.request_sync()
            self._commit_cap = journal.durable_index
        try:
            SyncObj._onTick(self, timeToWait)
        finally:
            self._commit_cap = None
        if not self._membership_adopted and not self._SyncObj__needLoadDumpFile:
            self._membership_adopted = True
            self._adopt_logged_membership()

    def _adopt_logged_membership(self) -> None:
        """Tick thread, once, after the snapshot is loaded at start. Raft uses
        the latest configuration in its log, committed or not (thesis 4.1), and
        pysyncobj does so for entries it appends, but at start it adopts a
        logged change only when it applies the entry, i.e. once it learns the
        commit index from a leader. A replica whose log held 'add n5' past its
        saved commit index, with n5 leading, refused n5's connections (an
        unknown node) and never learnt it: the give-up rule in
        store/elections.py recovered it after 6-12 s of campaigning. Adopting
        is what pysyncobj does on append; applying the entry later is a no-op,
        and a leader truncating the entry reverts it as for any appended one."""
        applied = self._SyncObj__raftLastApplied
        for entry in self._SyncObj__getEntries(applied + 1):
            request = self._SyncObj__parseChangeClusterRequest(entry[0])
            if request is not None and self._SyncObj__doChangeCluster(request):
                log.info("adopted the membership change %s %s logged at index %d", request[0], request[1], entry[1])

    # ---- read-only views of pysyncobj's state ---------------------------------------
    @property
    def role(self) -> str:
        return _ROLES.get(self._SyncObj__raftState, "unknown")

    def leader_node(self) -> Any:
        """The last leader this replica heard of (a pysyncobj Node), or None."""
        return self._getLeader()

    @property
    def leader_address(self) -> str | None:
        leader = self._getLeader()
        return None if leader is None else leader.id

    @property
    def leader_commit_index(self) -> int | None:
        index: int | None = self._SyncObj__leaderCommitIndex
        return index

    @property
    def log_entries(self) -> int:
        return int(self._getRaftLogSize())

    def other_member_ids(self) -> list[str]:
        """Raft addresses of the other voting members, as this replica knows them."""
        for _ in range(5):  # the tick thread may change the set while we copy it
            try:
                return [n.id for n in list(self._SyncObj__otherNodes)]
            except RuntimeError:
                continue
        return []

    def match_indexes(self) -> dict[str, int]:
        """Tick thread, leader: each other member's highest replicated index."""
        match = self._SyncObj__raftMatchIndex
        return {n.id: match.get(n, 0) for n in self._SyncObj__otherNodes}

    def replication_lag(self) -> int:
        """Any thread. Leader: entries its commit index is ahead of the slowest
        other member's match index; follower: entries the leader committed
        that this replica has not applied yet."""
        if not self._is_leader():
            leader_commit = self._SyncObj__leaderCommitIndex or self.raftCommitIndex
            return max(0, int(leader_commit) - int(self.raftLastApplied))
        for _ in range(5):  # the tick thread may change the members while we read
            try:
                matches = list(self.match_indexes().values())
                break
            except RuntimeError:
                continue
        else:
            return 0
        return max(0, int(self.raftCommitIndex) - min(matches, default=int(self.raftCommitIndex)))


# pysyncobj makes its journal with `createJournal(conf.journalFile)` inside
# SyncObj.__init__ and offers no option for another class: its module's name is
# replaced by one that builds a DurableJournal for the files TunedSyncObj
# registered (one process hosts several shards, each its own file).
_durable_journals: dict[str, bool] = {}  # journal path -> fsync, during one SyncObj.__init__
_pysyncobj_create_journal = _syncobj_module.createJournal


def _create_journal(journal_file: str | None) -> Any:
    if journal_file is not None and journal_file in _durable_journals:
        return DurableJournal(journal_file, _durable_journals[journal_file])
    return _pysyncobj_create_journal(journal_file)


_syncobj_module.createJournal = _create_journal


def dump_meta_to_json(meta: tuple[Any, ...]) -> tuple[int, dict[str, Any]]:
    """The Raft metadata pysyncobj hands a custom serializer (last and
    previous log entries, the cluster's nodes) as JSON-able data, with the
    index the snapshot covers."""
    last, prev, cluster = meta
    return int(last[1]), {
        "entries": [[base64.b64encode(e[0]).decode(), e[1], e[2]] for e in (last, prev)],
        "cluster": sorted(n.id for n in cluster),
    }


def dump_meta_from_json(raft_meta: dict[str, Any]) -> tuple[Any, ...]:
    """What a custom deserializer must return to pysyncobj: the inverse of `dump_meta_to_json`."""
    entries = [(base64.b64decode(c), i, t) for c, i, t in raft_meta["entries"]]
    return entries[0], entries[1], {TCPNode(addr) for addr in raft_meta["cluster"]}


# ---- bytes per peer ------------------------------------------------------------------
class CountingSocket(socket.socket):
    """A socket that adds the size of each buffer it sends or receives to
    `counts` ([received, sent]): one addition per call pysyncobj makes, no
    work per byte. Until the transport knows the peer, a socket counts into
    its own list; `attach` moves those counts to the peer's."""

    __slots__ = ("counts",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counts: list[int] = [0, 0]

    def send(self, data: Any, flags: int = 0) -> int:
        n = super().send(data, flags)
        self.counts[1] += n
        return n

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        self.counts[0] += len(data)
        return data

    def accept(self) -> tuple[socket.socket, Any]:
        """socket.accept, returning a CountingSocket (the stdlib's makes a plain one)."""
        fd, addr = self._accept()  # type: ignore[attr-defined]  # the stdlib's own helper
        sock = CountingSocket(self.family, self.type, self.proto, fileno=fd)
        if socket.getdefaulttimeout() is None and self.gettimeout():
            sock.setblocking(True)
        return sock, addr

    def attach(self, counts: list[int]) -> None:
        if self.counts is not counts:
            counts[0] += self.counts[0]
            counts[1] += self.counts[1]
            self.counts = counts


class CountingTransport(TCPTransport):  # type: ignore[misc]  # pysyncobj ships no types
    """TCPTransport whose connections count bytes per peer into the SyncObj's
    `link_bytes` (raft address -> [received, sent]; absent: no counting).
    Each connection's socket is attached to its peer's counts once pysyncobj
    knows the peer: when it connects out, or on an incoming connection's
    first message (the peer's address). Only the tick thread writes them."""

    def _attach(self, node: Any) -> None:
        links = getattr(self._syncObj, "link_bytes", None)
        conn = self._connections.get(node)
        if links is None or conn is None or not isinstance(node, TCPNode):
            return
        sock = conn._TcpConnection__socket
        if isinstance(sock, CountingSocket):
            sock.attach(links.setdefault(node.id, [0, 0]))

    def _connectIfNecessarySingle(self, node: Any) -> bool:
        connected = bool(super()._connectIfNecessarySingle(node))
        if connected:
            self._attach(node)
        return connected

    def _onIncomingMessageReceived(self, conn: Any, message: Any) -> None:
        super()._onIncomingMessageReceived(conn, message)
        node = self._connToNode(conn)
        if node is not None:
            self._attach(node)


class LinkFilterTransport(CountingTransport):
    """TCPTransport that drops messages on links `link_cut(src, dst)` names
    (hosts), in both directions, as a network drop rule would. pysyncobj
    delivers every received message through `_onMessageReceived`."""

    def link_cut(self, src_host: str | None, dst_host: str | None) -> bool:
        return False

    def send(self, node: Any, message: Any) -> bool:
        if self.link_cut(getattr(self._selfNode, "host", None), getattr(node, "host", None)):
            return True  # lost on the way, as a dropped packet would be
        return bool(super().send(node, message))

    def _onMessageReceived(self, node: Any, message: Any) -> None:
        if self.link_cut(getattr(node, "host", None), getattr(self._selfNode, "host", None)):
            return
        super()._onMessageReceived(node, message)


# ---- outgoing connections from the node's own address; counting sockets --------------
class _RaftSocketModule:
    """Stands in for the `socket` module of pysyncobj's connection and server
    code: its sockets count bytes (CountingSocket) and, with `host`, outgoing
    IPv4 ones bind to it first."""

    def __init__(self, host: str | None) -> None:
        self._host = host

    def __getattr__(self, name: str) -> Any:
        return getattr(socket, name)

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, *args: Any) -> socket.socket:
        s = CountingSocket(family, type, *args)
        if self._host is not None and family == socket.AF_INET:
            s.bind((self._host, 0))
        return s


def bind_outgoing_raft(host: str) -> None:
    """Process-wide: pysyncobj's outgoing sockets start from `host` (one node per process).

    pysyncobj's TCPConnection.connect creates its socket with its module's
    `socket.socket` and has no source address option, so Linux picks
    127.0.0.1 for every loopback connection and per-address network rules
    (and the peers' view of who is calling) would be wrong. We swap that
    module's `socket` for one whose IPv4 sockets bind to `host` first."""
    if source_address(host) is not None:
        _tcp.socket = _RaftSocketModule(host)


def count_raft_bytes() -> None:
    """Process-wide: pysyncobj's sockets (outgoing, listening and so accepted)
    are CountingSockets, so CountingTransport can report bytes per peer."""
    if not isinstance(_tcp.socket, _RaftSocketModule):
        _tcp.socket = _RaftSocketModule(None)
    _tcp_server.socket = _RaftSocketModule(None)


# ---- Raft frames from peers -------------------------------------------------------------
# pysyncobj reads a 4-byte length, then buffers (`bytes +=`, quadratic) until
# that many bytes arrived, before anything is authenticated: a frame announcing
# 2**31-1 bytes made a replica buffer ~400 MB and cost 13 elections. Our largest
# frame is one append batch (64 KB of entries plus one entry of at most 48 KB,
# group commit) or a 64 KB snapshot piece, pickled (x1.5 for bytes), compressed
# and Fernet-encoded (x4/3): well under 1 MB. A frame announcing more (or a
# negative length) drops the connection as soon as its length arrives.
MAX_RAFT_FRAME = 4 << 20
_DISCONNECTED = _resolve("pysyncobj.tcp_connection:CONNECTION_STATE").DISCONNECTED
_frame_refusals = RefusalLog(log, "Raft frame")
_pysyncobj_process_read = _tcp.TcpConnection._TcpConnection__processRead
_pysyncobj_parse_message = _tcp.TcpConnection._TcpConnection__processParseMessage


def oversized_frame(buffer: bytes, limit: int = MAX_RAFT_FRAME) -> int | None:
    """The first length announced in `buffer` (a run of frames) outside 0..limit, or None."""
    pos, end = 0, len(buffer)
    while pos + 4 <= end:
        (length,) = struct.unpack_from("i", buffer, pos)
        if not 0 <= length <= limit:
            return int(length)
        pos += 4 + length
    return None


def _peer_of(conn: Any) -> str:
    peer: str | None = getattr(conn, "_paramstore_peer", None)
    if peer is None:
        try:
            peer = str(conn._TcpConnection__socket.getpeername()[0])
        except (OSError, AttributeError):
            return "?"
        conn._paramstore_peer = peer
    return peer


def _process_read_capped(conn: Any) -> bool:
    more = bool(_pysyncobj_process_read(conn))
    length = oversized_frame(conn._TcpConnection__readBuffer)
    if length is None:
        return more
    _frame_refusals.refused(_peer_of(conn), f"a frame announcing {length} bytes (limit {MAX_RAFT_FRAME})")
    conn.disconnect()
    return False


def _parse_message_logged(conn: Any) -> Any:
    """pysyncobj drops a frame that fails to decrypt or unpickle, and its
    connection, without a word: say so, once per peer."""
    peer = _peer_of(conn)
    message = _pysyncobj_parse_message(conn)
    if message is None and conn._TcpConnection__state == _DISCONNECTED:
        _frame_refusals.refused(peer, "a frame that is not authentic under the cluster secret (or not decodable)")
    return message


_tcp.TcpConnection._TcpConnection__processRead = _process_read_capped
_tcp.TcpConnection._TcpConnection__processParseMessage = _parse_message_logged
