"""store/elections.py: the pre-vote, leader-lease and check-quorum rules, without Raft."""

from __future__ import annotations

from store.elections import CheckQuorum, LeaderLease, PreVoteRound, log_up_to_date, majority

MIN = 0.6


def test_majority_counts_this_replica():
    assert [majority(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]


def test_log_rule_compares_term_first_then_index():
    assert log_up_to_date((3, 10), (3, 10))
    assert log_up_to_date((4, 1), (3, 10))
    assert not log_up_to_date((3, 9), (3, 10))
    assert not log_up_to_date((2, 99), (3, 10))


def test_a_replica_that_heard_a_leader_recently_refuses_pre_votes():
    lease = LeaderLease(MIN)
    lease.heard_from_leader(100.0)
    assert not lease.grant_pre_vote(100.5, False, 5, (5, 10), 6, (5, 10))
    # the lease runs out after the minimum election timeout without a heartbeat
    assert lease.grant_pre_vote(100.0 + MIN + 1e-6, False, 5, (5, 10), 6, (5, 10))


def test_a_leader_refuses_pre_votes_and_votes():
    lease = LeaderLease(MIN)
    assert not lease.grant_pre_vote(1.0, True, 5, (5, 10), 6, (5, 10))
    assert lease.refuse_vote(1.0, True, "c:1", 6)


def test_pre_vote_needs_an_up_to_date_log_and_a_term_not_behind():
    lease = LeaderLease(MIN)  # never heard a leader
    assert lease.grant_pre_vote(1.0, False, 5, (5, 10), 6, (5, 10))
    assert lease.grant_pre_vote(1.0, False, 5, (5, 10), 5, (5, 10)), "a term equal to ours may still win"
    assert not lease.grant_pre_vote(1.0, False, 5, (5, 10), 4, (5, 10)), "a term behind ours"
    assert not lease.grant_pre_vote(1.0, False, 5, (5, 10), 6, (5, 9)), "a shorter log"
    assert not lease.grant_pre_vote(1.0, False, 5, (5, 10), 6, (4, 20)), "an older last term"


def test_votes_are_refused_in_the_lease_except_for_the_announced_transfer():
    lease = LeaderLease(MIN)
    lease.heard_from_leader(10.0)
    assert lease.refuse_vote(10.1, False, "c:1", 6)
    lease.transfer_announced("c:1", 6)
    assert not lease.refuse_vote(10.1, False, "c:1", 6)
    assert lease.refuse_vote(10.1, False, "d:1", 6), "another candidate"
    assert lease.refuse_vote(10.1, False, "c:1", 7), "another term"
    assert not lease.refuse_vote(10.0 + MIN + 1e-6, False, "d:1", 7), "the lease ran out"


def test_a_pre_vote_round_wins_with_a_majority_once():
    r = PreVoteRound()
    assert not r.start(6, "a", 3)
    assert not r.granted("b", r.round, 5, 3), "a grant for another term"
    assert not r.granted("b", r.round - 1, 6, 3), "a grant from an older round"
    assert r.granted("b", r.round, 6, 3)
    assert not r.granted("c", r.round, 6, 3), "counted once"
    assert not r.take_win(7), "a win is for its own term only"
    assert not r.take_win(6), "a win taken by a check for another term is gone"
    r.start(6, "a", 3)
    r.granted("b", r.round, 6, 3)
    assert r.take_win(6)
    assert not r.take_win(6), "taken once"
    assert (r.rounds_started, r.rounds_won) == (2, 2)


def test_duplicate_grants_from_one_voter_do_not_make_a_majority():
    r = PreVoteRound()
    r.start(3, "a", 5)
    assert not r.granted("b", r.round, 3, 5)
    assert not r.granted("b", r.round, 3, 5)
    assert r.granted("c", r.round, 3, 5)


def test_hearing_a_leader_cancels_a_win():
    r = PreVoteRound()
    r.start(2, "a", 3)
    r.granted("b", r.round, 2, 3)
    r.cancel()
    assert not r.take_win(2)


def test_after_enough_unanswered_rounds_a_replica_campaigns_anyway():
    r = PreVoteRound()
    for _ in range(4):
        r.start(2, "a", 3)
        assert not r.gave_up(5)
    r.cancel()  # a leader was heard: count again from zero
    for _ in range(4):
        r.start(2, "a", 3)
    assert not r.gave_up(5)
    r.start(2, "a", 3)
    assert r.gave_up(5)
    assert r.gave_up(5), "every election timeout from then on, as pysyncobj"
    r.cancel()
    assert not r.gave_up(5), "until a leader is heard"
    for _ in range(5):
        r.start(2, "a", 3)
    r.granted("b", r.round, 2, 3)
    assert r.take_win(2) and not r.gave_up(5), "or a round won"


def test_a_single_replica_wins_its_own_round():
    r = PreVoteRound()
    assert r.start(2, "a", 1)
    assert r.take_win(2)


def _run(q: CheckQuorum, start: float, end: float, voters: list[str], replies: dict[str, float]) -> float | None:
    """Tick every 10 ms from start to end; the time of the step-down, if any.
    replies: voter -> time after which it stops answering."""
    t = start
    while t <= end:
        for v, until in replies.items():
            if t < until:
                q.replied(v, t)
        if q.tick(t, True, voters):
            return t
        t = round(t + 0.01, 6)
    return None


def test_a_leader_with_a_majority_stays():
    q = CheckQuorum(1.2, 0.15)
    assert _run(q, 0.0, 10.0, ["b", "c"], {"b": 1e9, "c": 0.5}) is None, "one follower of two is enough"


def test_a_leader_without_a_majority_steps_down_within_one_window():
    q = CheckQuorum(1.2, 0.15)
    down = _run(q, 0.0, 10.0, ["b", "c"], {"b": 3.0, "c": 3.0})
    assert down is not None and 3.0 + 1.2 - 0.02 <= down <= 3.0 + 1.2 + 0.02
    assert q.step_downs == 1


def test_a_new_leader_gets_a_whole_window():
    q = CheckQuorum(1.2, 0.15)
    assert q.tick(0.0, False, ["b", "c"]) is False
    down = _run(q, 5.0, 10.0, ["b", "c"], {})
    assert down is not None and abs(down - 6.2) < 0.02, "counted from becoming leader, not from start"


def test_time_this_leader_did_not_run_does_not_count_against_followers():
    q = CheckQuorum(1.2, 0.15)
    assert _run(q, 0.0, 2.0, ["b", "c"], {"b": 1e9, "c": 1e9}) is None
    # paused for 3 s: the first tick after it must not step down
    assert q.tick(5.0, True, ["b", "c"]) is False
    q.replied("b", 5.05)
    assert _run(q, 5.06, 8.0, ["b", "c"], {"b": 1e9}) is None


def test_a_follower_never_steps_down():
    q = CheckQuorum(1.2, 0.15)
    assert not any(q.tick(t / 10, False, ["b", "c"]) for t in range(100))
