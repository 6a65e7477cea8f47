"""GET /metrics: Prometheus text that moves with the traffic and the Raft state."""

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from tests.waiting import wait_until

OCTET = {"Content-Type": "application/octet-stream"}


def scrape(client) -> dict[tuple[str, tuple], float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples, name, **labels) -> float:
    """Sum over every series of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= set(lbl))


def test_metrics_move_with_traffic(client):
    shard = client.put(
        "/v1/tensors/metrics_w",
        content=np.zeros(1000, "<f4").tobytes(),
        headers={**OCTET, "X-Dtype": "float32", "X-Shape": "1000", "X-Optimizer": '{"type": "adam", "lr": 0.01}'},
    ).json()["shard"]
    before = scrape(client)
    route = "/v1/tensors/{name}/grad"
    for _ in range(5):
        r = client.post("/v1/tensors/metrics_w/grad", content=np.ones(1000, "<f4").tobytes(), headers=OCTET)
        assert r.status_code == 200
    assert client.get("/v1/tensors/metrics_w").status_code == 200
    assert client.get("/v1/tensors/nope_metrics").status_code == 404
    after = scrape(client)
    s, node = str(shard), "n0"

    # requests by route template and status, never by concrete path
    grads = ("paramstore_http_requests_total", dict(method="POST", route=route, status="200"))
    assert value(after, grads[0], **grads[1]) - value(before, grads[0], **grads[1]) == 5
    assert value(after, "paramstore_http_requests_total", method="GET", route="/v1/tensors/{name}", status="404") >= 1
    assert not any("metrics_w" in str(lbl) for _, lbl in after)
    hist = "paramstore_http_request_duration_seconds_count"
    assert (
        value(after, hist, method="POST", route=route, status="200")
        - value(before, hist, method="POST", route=route, status="200")
        == 5
    )
    assert value(after, "paramstore_http_request_duration_seconds_sum", method="POST", route=route, status="200") > 0
    # bytes in (5 x 4000-byte bodies) and out (the 4000-byte GET)
    bin_ = "paramstore_http_request_bytes_total"
    assert value(after, bin_, method="POST", route=route) - value(before, bin_, method="POST", route=route) == 20_000
    assert value(after, "paramstore_http_response_bytes_total", method="GET", route="/v1/tensors/{name}") >= 4000

    # per shard Raft and applier figures
    lbl = dict(node=node, shard=s)
    for name in (
        "paramstore_shard_commit_index",
        "paramstore_shard_applied_index",
        "paramstore_shard_applied_commands_total",
        "paramstore_shard_log_entries",
    ):
        assert value(after, name, **lbl) >= value(before, name, **lbl) + 5, name
    assert value(after, "paramstore_shard_apply_seconds_total", **lbl) > value(
        before, "paramstore_shard_apply_seconds_total", **lbl
    )
    assert value(after, "paramstore_shard_role", role="leader", **lbl) == 1  # a single replica leads
    assert value(after, "paramstore_shard_role", role="follower", **lbl) == 0
    assert value(after, "paramstore_shard_term", **lbl) >= 1
    assert value(after, "paramstore_shard_leader_changes_total", **lbl) >= 1
    assert value(after, "paramstore_shard_has_leader", **lbl) == 1
    assert value(after, "paramstore_shard_tensors", **lbl) >= 1
    # value + Adam's exp_avg and exp_avg_sq
    assert value(after, "paramstore_shard_bytes", **lbl) >= 3 * 4000
    assert ("paramstore_shard_snapshots_total", tuple(sorted(lbl.items()))) in after
    assert ("paramstore_shard_last_snapshot_duration_seconds", tuple(sorted(lbl.items()))) in after
    assert value(after, "paramstore_ready", node=node) == 1


def test_unmatched_paths_share_one_label(client):
    for i in range(3):
        assert client.get(f"/no/such/path/{i}").status_code == 404
    samples = scrape(client)
    assert value(samples, "paramstore_http_requests_total", method="GET", route="<unmatched>", status="404") >= 3
    assert not any("/no/such" in str(lbl) for _, lbl in samples)


def test_snapshot_figures_move(client):
    r = client.put(
        "/v1/tensors/metrics_snap",
        content=np.zeros(64, "<f4").tobytes(),
        headers={**OCTET, "X-Dtype": "float32", "X-Shape": "64"},
    )
    lbl = dict(node="n0", shard=str(r.json()["shard"]))
    before = value(scrape(client), "paramstore_shard_snapshots_total", **lbl)
    # the same trigger the store uses when payload bytes pile up
    client.app.state.store.shards[int(lbl["shard"])].replica.forceLogCompaction()
    after = wait_until(
        lambda: (lambda s: s if value(s, "paramstore_shard_snapshots_total", **lbl) > before else None)(scrape(client)),
        15,
        "a snapshot counted",
    )
    assert value(after, "paramstore_shard_last_snapshot_duration_seconds", **lbl) > 0
    assert value(after, "paramstore_shard_last_snapshot_bytes", **lbl) > 256
