"""Pre-vote and check-quorum (Raft thesis section 9.6), as rules without Raft.

pysyncobj 0.3.17 has neither: a follower whose election timer fires raises
its term at once, so a replica that was paused, starved of CPU or cut off
deposes a healthy leader the moment it is heard again; and a leader cut off
from its majority keeps leading until `leaderFallbackTimeout`.
store/pysyncobj_adapter.py feeds these classes pysyncobj's events and acts
on their answers; here they are plain state and time, tested without a
cluster (tests/store/test_prevote.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["CheckQuorum", "ElectionSettings", "LeaderLease", "PreVoteRound", "log_up_to_date", "majority"]


@dataclass(frozen=True)
class ElectionSettings:
    pre_vote: bool
    check_quorum: bool
    min_timeout: float  # a replica that heard from a leader this recently refuses to help depose it
    quorum_window: float  # a leader that heard from no majority for this long steps down
    stall_gap: float  # a tick this much later than the last means this replica itself was not running
    # Pre-vote rounds without hearing any leader after which a replica campaigns
    # anyway, past the others' lease, as pysyncobj would: a replica that the
    # leader cannot reach (a restarted replica that does not know a leader added
    # since its snapshot, a one-way link) would otherwise wait forever.
    give_up_rounds: int = 10


def majority(voters: int) -> int:
    """Votes needed among `voters` (this replica included)."""
    return voters // 2 + 1


def log_up_to_date(candidate: tuple[int, int], mine: tuple[int, int]) -> bool:
    """Raft's vote rule on (last log term, last log index)."""
    return candidate >= mine


class LeaderLease:
    """Follower side: while a leader was heard from within `min_timeout`, this
    replica refuses pre-votes and votes (but for a leadership transfer)."""

    def __init__(self, min_timeout: float) -> None:
        self.min_timeout = min_timeout
        self._heard_at: float | None = None
        self._transfer: tuple[str, int] | None = None  # (candidate, term) announced as a leadership transfer

    def heard_from_leader(self, now: float) -> None:
        self._heard_at = now

    def held(self, now: float, is_leader: bool) -> bool:
        if is_leader:
            return True
        return self._heard_at is not None and now - self._heard_at < self.min_timeout

    def transfer_announced(self, candidate: str, term: int) -> None:
        """The candidate was told by the leader to campaign now (Raft TimeoutNow),
        or gave up on pre-vote after `give_up_rounds`."""
        self._transfer = (candidate, term)

    def grant_pre_vote(
        self, now: float, is_leader: bool, my_term: int, mine: tuple[int, int], term: int, candidate: tuple[int, int]
    ) -> bool:
        """Would this replica vote for a candidate campaigning in `term` with log `candidate`?
        Nothing here changes: a pre-vote neither raises the term nor records a vote."""
        return term >= my_term and log_up_to_date(candidate, mine) and not self.held(now, is_leader)

    def refuse_vote(self, now: float, is_leader: bool, candidate: str, term: int) -> bool:
        """Ignore a real vote request (so that its term does not depose our
        leader) unless it is the leadership transfer the leader asked for."""
        if self._transfer == (candidate, term):
            return False
        return self.held(now, is_leader)


class PreVoteRound:
    """Candidate side: one round of pre-votes per election timeout; a real
    election (raising the term) only once a majority would grant."""

    def __init__(self) -> None:
        self.round = 0
        self.term = 0  # the term a real election would use
        self._granted: set[str] = set()
        self._won_term: int | None = None
        self.rounds_started = 0
        self.rounds_won = 0
        self.rounds_since_leader = 0  # rounds started since a leader was last heard (or we won)

    def start(self, next_term: int, self_id: str, voters: int) -> bool:
        """Begin a round for `next_term`; True if this replica alone is a majority."""
        self.round += 1
        self.rounds_started += 1
        self.rounds_since_leader += 1
        self.term = next_term
        self._granted = {self_id}
        self._won_term = None
        return self._count(voters)

    def granted(self, voter: str, round_: int, term: int, voters: int) -> bool:
        """A grant arrived; True when it completes a majority (once per round)."""
        if round_ != self.round or term != self.term or self._won_term is not None:
            return False
        self._granted.add(voter)
        return self._count(voters)

    def _count(self, voters: int) -> bool:
        if len(self._granted) >= majority(voters):
            self._won_term = self.term
            self.rounds_won += 1
            return True
        return False

    def take_win(self, next_term: int) -> bool:
        """True (once) if a round for `next_term` won: the real election may start."""
        won = self._won_term == next_term
        self._won_term = None
        if won:
            self.rounds_since_leader = 0
        return won

    def gave_up(self, limit: int) -> bool:
        """True once `limit` rounds passed without a leader or a win, and from
        then on until a leader is heard (each campaign raises the term, as
        pysyncobj's do: one term may not be enough to pass the others')."""
        return self.rounds_since_leader >= limit

    def cancel(self) -> None:
        """A leader was heard from (or this replica leads): a win no longer licenses an election."""
        self._won_term = None
        self.rounds_since_leader = 0


class CheckQuorum:
    """Leader side: step down when no majority answered within `quorum_window`.

    Time this replica itself did not run (a tick `stall_gap` late: paused,
    starved, swapping) does not count against the followers: their answers
    to heartbeats we never sent could not have arrived."""

    def __init__(self, quorum_window: float, stall_gap: float) -> None:
        self.quorum_window = quorum_window
        self.stall_gap = stall_gap
        self._replies: dict[str, float] = {}
        self._since: float | None = None  # leading (or running again) since
        self._last_tick: float | None = None
        self.step_downs = 0

    def replied(self, voter: str, now: float) -> None:
        self._replies[voter] = now

    def tick(self, now: float, is_leader: bool, voters: Iterable[str]) -> bool:
        """Every tick; True if this leader must step down now."""
        stalled = self._last_tick is not None and now - self._last_tick > self.stall_gap
        self._last_tick = now
        if not is_leader:
            self._since = None
            return False
        if self._since is None or stalled:
            self._since = now
        if now - self._since < self.quorum_window:
            return False
        others = list(voters)
        heard = 1 + sum(1 for v in others if self._replies.get(v, -1.0) > now - self.quorum_window)
        if heard >= majority(len(others) + 1):
            return False
        self._since = None
        self.step_downs += 1
        return True
