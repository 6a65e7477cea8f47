"""`paramstore plan --measure` against real replicas: rates measured, placement read, probe removed."""

from __future__ import annotations

import json

import pytest

from api.cli import main

pytestmark = pytest.mark.cluster


def test_measure_uses_the_clusters_rates_and_placement(make_cluster, capsys: pytest.CaptureFixture[str]) -> None:
    c = make_cluster(replicas=3, shards=2)
    urls = ",".join(c.urls[n] for n in c.ids)
    argv = ["plan", "--params", "1e8", "--workers", "4", "--measure", urls, "--measure-mb", "8", "--json"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    job = doc["job"]
    assert (job["nodes"], job["shards"], job["replication"]) == (3, 2, 3)
    # Loopback: anything from a few MB/s (a loaded machine) up is plausible; zero or absurd is a bug.
    assert 1e6 < job["push_bandwidth"] < 1e11 and 1e6 < job["pull_bandwidth"] < 1e11
    assert sum(job["lead_shares"]) == pytest.approx(1.0)
    assert job["host_shares"] == pytest.approx([1.0, 1.0, 1.0])  # replication 3 on 3 nodes
    leaders = {c.status(c.ids[0])["shards"][k]["leader"] for k in range(2)}
    busiest = max(job["lead_shares"])
    assert busiest == pytest.approx(1.0 if len(leaders) == 1 else 0.5)
    # The pull phase is the measured pull rate at work: the busiest leader serves its share of 4 pulls.
    expected_pull = max(4e8, 4 * 4e8 * busiest) / job["pull_bandwidth"] + 2 * job["latency"]
    assert doc["ps"]["pull"] == pytest.approx(expected_pull)
    assert "measured at" in doc["notes"][0]
    names = [t["name"] for t in c.http.get(c.urls["n1"] + "/v1/tensors").json()]
    assert not [n for n in names if n.startswith("_plan_probe_")]  # the probe is deleted
