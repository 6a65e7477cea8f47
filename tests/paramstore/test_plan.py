"""paramstore/plan.py against figures computed by hand (docs/network.md has the formulas)."""

from __future__ import annotations

import pytest

from paramstore.plan import (
    Job,
    PlanError,
    allreduce,
    even_shares,
    links,
    nodes_for_worker_links,
    nodes_needed,
    parse_count,
    parse_duration,
    plan,
    ps_timing,
    wire,
)

GBIT = 1e9 / 8


def test_worked_example_7b_64_workers_25_gbit() -> None:
    # 7e9 float32 = 28 GB; 25 Gbit/s = 3.125 GB/s; 3 nodes, 3 shards, every node hosts every shard.
    job = Job(params=7_000_000_000, workers=64, bandwidth=25 * GBIT, step_time=10.0, nodes=3, shards=3, replication=3)
    lk = links(job)
    assert lk.worker_sent == lk.worker_received == 28e9
    # Every node receives every worker's gradient once (as leader of 1/3, follower of 2/3): 64 x 28 GB.
    assert lk.node_received == pytest.approx((1.792e12,) * 3)
    # It leads 1/3: serves 1/3 of 64 pulls and sends 1/3 of 64 gradients to 2 followers: 64 x 28 GB / 3 x 3.
    assert lk.node_sent == pytest.approx((1.792e12,) * 3)
    t = ps_timing(job)
    assert t.push == pytest.approx(1.792e12 / 3.125e9)  # 573.44 s: the node downlink
    assert t.pull == pytest.approx(64 * 28e9 / 3 / 3.125e9)  # 191.15 s: the leaders' pulls
    assert t.total == pytest.approx(573.44 + 191.146667)
    assert t.overlapped == pytest.approx(573.44)
    assert t.bottleneck == "store node downlink (gradients in)"
    ar = allreduce(job)
    assert ar.sent == pytest.approx(2 * 63 / 64 * 28e9)  # 55.125 GB
    assert ar.time == pytest.approx(17.64)
    # Per-node load is 64 x 3 x M / S each way: S = 192 brings it to one model per step, a worker's load.
    assert nodes_for_worker_links(job) == 192
    # Even then a worker pushes 8.96 s, then pulls 8.96 s: over the 10 s step whatever the store.
    assert nodes_needed(job) is None


def test_latency_terms_100m_4_workers_1_gbit() -> None:
    job = Job(params=100_000_000, workers=4, bandwidth=1 * GBIT, latency=0.2e-3, step_time=0.5)
    t = ps_timing(job)
    # push: node downlink 4 x 400 MB = 1.6 GB at 125 MB/s = 12.8 s, plus 4 one-way latencies.
    assert t.push == pytest.approx(12.8 + 4 * 0.2e-3)
    # pull: a leader serves 1/3 of 4 pulls of 400 MB = 533 MB: 4.2667 s, plus 2 latencies.
    assert t.pull == pytest.approx(4 * 4e8 / 3 / 125e6 + 2 * 0.2e-3)
    ar = allreduce(job)
    assert ar.sent == pytest.approx(6e8)  # 2 x 3/4 x 400 MB
    assert ar.time == pytest.approx(4.8 + 6 * 0.2e-3)  # 2(N-1) latency terms


def test_one_worker_needs_no_allreduce() -> None:
    ar = allreduce(Job(params=1000, workers=1, bandwidth=GBIT, latency=1e-3, step_time=1.0))
    assert ar.sent == 0 and ar.time == 0


def test_nodes_needed_hand_computed() -> None:
    # 400 MB model, 4 workers, 10 Gbit/s, replication 1: a worker alone needs 0.32 s each way;
    # S nodes take 4 x 400 MB / S each way: S=2 -> 0.64 + 0.64 s > 1 s; S=3 -> 0.427 + 0.427 s <= 1 s.
    job = Job(params=100_000_000, workers=4, bandwidth=10 * GBIT, step_time=1.0, nodes=1, shards=1, replication=1)
    assert ps_timing(job).total == pytest.approx(2.56)
    assert nodes_needed(job) == 3
    # BytePS's k = n: with replication 1, as many servers as workers carry a worker's load each.
    assert nodes_for_worker_links(job) == 4


def test_uneven_shards_load_the_node_that_leads_two() -> None:
    lead, host = even_shares(3, 4, 1)
    assert lead == host == (0.5, 0.25, 0.25)
    job = Job(params=1000, workers=2, bandwidth=1000.0, step_time=1.0, nodes=3, shards=4, replication=1)
    lk = links(job)
    assert lk.node_received == pytest.approx((8000 * 0.5, 8000 * 0.25, 8000 * 0.25))
    assert ps_timing(job).push == pytest.approx(4.0)  # node 0: 4000 B at 1000 B/s


def test_measured_placement_and_bandwidths_replace_nominal() -> None:
    job = Job(
        params=1000,
        workers=2,
        bandwidth=1e9,
        step_time=1.0,
        nodes=2,
        shards=2,
        replication=2,
        push_bandwidth=1000.0,
        pull_bandwidth=2000.0,
        lead_shares=(1.0, 0.0),
        host_shares=(1.0, 1.0),
    )
    t = ps_timing(job)
    # node 0 leads everything: takes 2 x 4000 B of gradients and sends them on once each.
    assert t.push == pytest.approx(8000 / 1000.0)
    assert t.pull == pytest.approx(8000 / 2000.0)
    assert allreduce(job).time == pytest.approx(2 * 1 / 2 * 4000 / 1e9)  # all-reduce keeps the nominal links


@pytest.mark.parametrize(
    ("compress", "dtype", "push", "pull", "ar"),
    [
        ("none", "float32", 4, 4, 4),
        ("float16", "float32", 2, 2, 2),
        ("bfloat16", "float32", 2, 2, 2),
        ("float16", "bfloat16", 2, 2, 2),  # already 2 bytes: nothing saved
        ("int8", "float32", 1, 1, None),
        ("topk:0.01", "float32", 0.01 * (8 + 4), 4, None),
        ("topk:1", "float16", 8 + 2, 2, None),
    ],
)
def test_compression_bytes_per_parameter(compress: str, dtype: str, push: float, pull: float, ar: float | None) -> None:
    w = wire(compress, dtype)
    assert (w.push, w.pull, w.allreduce) == (pytest.approx(push), pull, ar)


@pytest.mark.parametrize(("compress", "c_push"), [("float16", 2), ("int8", 1), ("topk:0.01", 0.01 * 12)])
def test_compressed_pushes_are_replicated_full_width(compress: str, c_push: float) -> None:
    # 3 nodes, replication 3: each node is the entry of 1/3 (gradients as sent) and
    # a follower of 2/3 (gradients widened to 4 bytes by their entry).
    job = Job(params=1000, workers=2, bandwidth=1000.0, step_time=1.0, compress=compress)
    lk = links(job)
    assert lk.node_received == pytest.approx((2 * 1000 * (c_push / 3 + 2 / 3 * 4),) * 3)
    pull = wire(compress, "float32").pull
    assert lk.node_sent == pytest.approx((2 * 1000 / 3 * (pull + 2 * 4),) * 3)
    assert ps_timing(job).push == pytest.approx(2 * 1000 * (c_push / 3 + 2 / 3 * 4) / 1000.0)


def test_plan_compares_every_option_and_says_which_fits() -> None:
    job = Job(params=100_000_000, workers=4, bandwidth=10 * GBIT, step_time=1.0, nodes=4, shards=4, replication=1)
    p = plan(job)
    assert [o.compress for o in p.options] == ["none", "float16", "bfloat16", "int8", "topk:0.01"]
    by = {o.compress: o for o in p.options}
    assert by["float16"].ps_time == pytest.approx(by["none"].ps_time / 2)
    assert by["int8"].allreduce_time is None
    # 4 nodes, replication 1: 0.32 s each way; overlapped 0.32 s < all-reduce 2 x 3/4 x 0.32 = 0.48 s.
    assert p.ps.overlapped == pytest.approx(0.32)
    assert p.allreduce_time == pytest.approx(0.48)
    assert p.verdict[0].startswith("A parameter server fits better")
    # The search rounds shards up to a multiple of the nodes (6 on 3 nodes): 4 x 400 MB / 3 at 1.25 GB/s
    # = 0.427 s each way, 0.853 s <= 1 s; on 2 nodes 0.64 + 0.64 s > 1 s.
    assert p.to_dict()["nodes_needed"] == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"workers": 0}, "workers must be at least 1"),
        ({"replication": 4}, "replication 4 needs at least as many nodes"),
        ({"bandwidth": 0.0}, "bandwidth must be positive"),
        ({"dtype": "float8"}, "dtype 'float8'"),
        ({"compress": "topk:0"}, "must be in (0, 1]"),
        ({"compress": "topk:x"}, "needs a number"),
        ({"compress": "gzip"}, "expected one of"),
        ({"lead_shares": (1.0,), "host_shares": (1.0,)}, "lead_shares has 1 entries for 3 nodes"),
    ],
)
def test_bad_jobs_are_refused(kwargs: dict, message: str) -> None:
    base = {"params": 10, "workers": 2, "bandwidth": 1.0, "step_time": 1.0}
    with pytest.raises(PlanError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Job(**{**base, **kwargs})


def test_counts_and_durations() -> None:
    assert parse_count("7e9") == parse_count("7B") == parse_count("7_000_000_000") == 7_000_000_000
    assert parse_count("350M") == 350_000_000
    assert parse_duration("50us", 1e-3) == pytest.approx(50e-6)
    assert parse_duration("0.2", 1e-3) == pytest.approx(0.2e-3)  # a bare number is in the given unit
    assert parse_duration("1.5s", 1e-3) == 1.5
    for bad in ("abc", "0.5", "-3", "inf"):
        with pytest.raises(PlanError):
            parse_count(bad)
    with pytest.raises(PlanError):
        parse_duration("-1ms", 1.0)
