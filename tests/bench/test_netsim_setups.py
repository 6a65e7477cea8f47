"""bench.netsim --compress: the setups it parses and the plan figures it puts beside them (no root needed)."""

from __future__ import annotations

import argparse
from dataclasses import replace

import pytest

from bench.netsim.__main__ import job_of, parse_setup, setup_prediction
from paramstore.plan import PlanError, ps_timing


@pytest.mark.parametrize(
    ("text", "label", "push_kw", "pull", "plan"),
    [
        ("none", "none", {}, None, ("none", "none")),
        ("float16", "float16", {"wire_dtype": "float16"}, "float16", ("float16", "float16")),
        ("int8", "int8", {"wire_dtype": "int8"}, "int8", ("int8", "int8")),
        ("topk:0.01", "topk:0.01", {"compress": "topk:0.01"}, None, ("topk:0.01", "none")),
        ("topk:0.01/float16", "topk:0.01/float16", {"compress": "topk:0.01"}, "float16", ("topk:0.01", "float16")),
        ("float16/none", "float16/none", {"wire_dtype": "float16"}, None, ("float16", "none")),
    ],
)
def test_setups(text: str, label: str, push_kw: dict[str, str], pull: str | None, plan: tuple[str, str]) -> None:
    s = parse_setup(text)
    assert (s.label, s.push_kw, s.pull_wire_dtype, (s.plan_push, s.plan_pull)) == (label, push_kw, pull, plan)
    assert parse_setup(s.label) == s  # the label saved in the results parses back to the same setup


@pytest.mark.parametrize("text", ["gzip", "float16/topk:0.01", "topk:2", "none/zstd"])
def test_bad_setups_are_refused(text: str) -> None:
    with pytest.raises(PlanError):
        parse_setup(text)


def test_prediction_takes_the_push_phase_of_one_option_and_the_pull_phase_of_the_other() -> None:
    args = argparse.Namespace(params=1e7, tensors=15, workers=4, rate=100.0)
    run = {
        "nodes": 3,
        "shards": 3,
        "replication": 3,
        "lead_shares": [1 / 3] * 3,
        "host_shares": [1.0] * 3,
        "measured_push": 5e6,
        "measured_pull": 11e6,
    }
    q = setup_prediction(run, args, parse_setup("topk:0.01/float16"))
    job = job_of(run, args)
    assert q["push"] == pytest.approx(ps_timing(replace(job, compress="topk:0.01")).push)
    assert q["pull"] == pytest.approx(ps_timing(replace(job, compress="float16")).pull)
    assert q["total"] == pytest.approx(q["push"] + q["pull"])
    assert q["worker_bytes"] == pytest.approx(10_000_000 // 15 * 15 * (0.01 * 12 + 2))
