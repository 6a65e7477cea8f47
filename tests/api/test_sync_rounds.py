"""Synchronous rounds over HTTP (one real replica): X-Sync on create, the
push answers, 409 with the open round, bad specs, round_timeout, metrics."""

import json

import numpy as np
import pytest

from tests.waiting import wait_until

RAW = "application/octet-stream"


def _put(client, name, arr, sync, **headers):
    hdrs = {"Content-Type": RAW, "X-Dtype": str(arr.dtype), "X-Shape": ",".join(map(str, arr.shape)), **headers}
    if sync is not None:
        hdrs["X-Sync"] = sync if isinstance(sync, str) else json.dumps(sync)
    return client.put(f"/v1/tensors/{name}", content=arr.tobytes(), headers=hdrs)


def _grad(client, name, arr, base=None):
    hdrs = {"Content-Type": RAW, "X-Dtype": str(arr.dtype), "X-Shape": ",".join(map(str, arr.shape))}
    if base is not None:
        hdrs["X-Base-Version"] = str(base)
    return client.post(f"/v1/tensors/{name}/grad", content=arr.tobytes(), headers=hdrs)


def _value(client, name):
    r = client.get(f"/v1/tensors/{name}")
    assert r.status_code == 200, r.text
    return np.frombuffer(r.content, np.float32), int(r.headers["X-Version"])


SGD = json.dumps({"type": "sgd", "lr": 0.5})


def test_a_round_applies_the_mean_once_and_refuses_late_gradients(client):
    w0 = np.array([1.0, -1.0], np.float32)
    r = _put(client, "sr.w", w0, {"workers": 3, "backup_workers": 1}, **{"X-Optimizer": SGD})
    assert r.status_code == 201, r.text
    listed = {t["name"]: t for t in client.get("/v1/tensors").json()}
    assert listed["sr.w"]["sync"] == {"workers": 3, "backup_workers": 1, "round_timeout": None, "reduce": "mean"}
    r1 = _grad(client, "sr.w", np.array([1.0, 2.0], np.float32), base=1)
    assert r1.status_code == 200 and r1.json()["round"] == {"version": 1, "received": 1, "needed": 2, "closed": False}
    assert r1.headers["X-Version"] == "1"
    r2 = _grad(client, "sr.w", np.array([3.0, 4.0], np.float32), base=1)
    assert r2.json() == {
        "name": "sr.w",
        "version": 2,
        "shard": 0,
        "round": {"version": 1, "received": 2, "needed": 2, "closed": True, "by": "workers"},
    }
    value, version = _value(client, "sr.w")
    assert version == 2 and value.tolist() == [0.0, -2.5]  # w0 - 0.5 * mean([1, 2], [3, 4])
    late = _grad(client, "sr.w", np.array([5.0, 6.0], np.float32), base=1)  # the backup worker's
    assert late.status_code == 409
    assert late.json()["round"] == {"version": 2, "received": 0, "needed": 2} and late.json()["current_version"] == 2
    for base in (None, 3):
        assert _grad(client, "sr.w", np.ones(2, np.float32), base=base).status_code == 409
    after, version = _value(client, "sr.w")
    assert version == 2 and after.tolist() == value.tolist()  # the refused pushes changed nothing
    metrics = client.get("/metrics").text
    assert _metric(metrics, "paramstore_shard_sync_rounds_closed_total") >= 1
    assert _metric(metrics, "paramstore_shard_sync_late_grads_refused_total") >= 1


@pytest.mark.parametrize(
    "sync,status",
    [
        ({"workers": 0}, 422),
        ({"workers": 2, "backup_workers": 2}, 422),
        ({"workers": 2, "round_timeout": -1}, 422),
        ({"workers": 2, "reduce": "median"}, 422),
        ({"workers": "2"}, 422),
        ("{not json", 400),
    ],
)
def test_bad_sync_specs_are_refused_before_anything_is_stored(client, sync, status):
    r = _put(client, "sr.bad", np.zeros(2, np.float32), sync)
    assert r.status_code == status, r.text
    assert r.json()["error"] in ("invalid_request", "unprocessable") and "sync" in r.json()["detail"].lower()
    assert client.get("/v1/tensors/sr.bad").status_code == 404


def test_sync_needs_a_float_tensor(client):
    r = _put(client, "sr.int", np.zeros(2, np.int32), {"workers": 2})
    assert r.status_code == 422 and "float" in r.json()["detail"]
    assert client.get("/v1/tensors/sr.int").status_code == 404


def test_round_timeout_closes_the_round_with_what_arrived(client):
    w0 = np.array([1.0, 1.0], np.float32)
    assert _put(client, "sr.t", w0, {"workers": 4, "round_timeout": 0.3}, **{"X-Optimizer": SGD}).status_code == 201
    before = _metric(client.get("/metrics").text, "paramstore_shard_sync_rounds_timed_out_total")
    assert _grad(client, "sr.t", np.array([2.0, 4.0], np.float32), base=1).json()["round"]["received"] == 1
    wait_until(lambda: _value(client, "sr.t")[1] == 2, 10, "the leader's timer to close the round")
    assert _value(client, "sr.t")[0].tolist() == [0.0, -1.0]  # the mean of the one gradient that arrived
    assert _metric(client.get("/metrics").text, "paramstore_shard_sync_rounds_timed_out_total") == before + 1


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_rounds_a_batch_push_opened_close_together_on_timeout(client):
    from safetensors.numpy import save

    for name in ("sr.a", "sr.b"):
        r = _put(client, name, np.zeros(2, np.float32), {"workers": 2, "round_timeout": 0.3}, **{"X-Optimizer": SGD})
        assert r.status_code == 201, r.text
    body = save({"sr.a": np.array([1.0, 1.0], np.float32), "sr.b": np.array([2.0, 2.0], np.float32)})
    hdrs = {"Content-Type": "application/x-safetensors", "X-Base-Versions": json.dumps({"sr.a": 1, "sr.b": 1})}
    r = client.post("/v1/grads:batch", content=body, headers=hdrs)
    assert r.status_code == 200 and r.json() == {"versions": {"sr.a": 1, "sr.b": 1}}, r.text
    wait_until(lambda: _value(client, "sr.a")[1] == 2 and _value(client, "sr.b")[1] == 2, 10, "both rounds closed")
    assert _value(client, "sr.a")[0].tolist() == [-0.5, -0.5] and _value(client, "sr.b")[0].tolist() == [-1.0, -1.0]
    stale = client.post("/v1/grads:batch", content=body, headers=hdrs)
    assert stale.status_code == 409 and stale.json()["round"]["version"] == 2


def test_a_checkpoint_keeps_the_sync_settings_but_not_the_open_round(client):
    sync = {"workers": 3, "backup_workers": 1, "round_timeout": 60.0, "reduce": "sum"}
    assert _put(client, "sr.ck", np.ones(2, np.float32), sync, **{"X-Optimizer": SGD}).status_code == 201
    assert _grad(client, "sr.ck", np.ones(2, np.float32), base=1).json()["round"]["received"] == 1
    saved = client.get("/v1/checkpoint")
    assert saved.status_code == 200
    assert client.delete("/v1/tensors/sr.ck").status_code == 200
    r = client.put("/v1/checkpoint", content=saved.content)  # mode=create: creates sr.ck, skips the others
    assert r.status_code == 200 and "sr.ck" in r.json()["created"], r.text
    listed = {t["name"]: t for t in client.get("/v1/tensors").json()}
    assert listed["sr.ck"]["sync"] == sync
    again = _grad(client, "sr.ck", np.ones(2, np.float32), base=listed["sr.ck"]["version"])
    assert again.json()["round"]["received"] == 1  # a checkpoint is model state: no partial round


def test_synchronous_rounds_take_whole_tensors(client):
    r = _put(client, "sr.parts", np.zeros((4, 2), np.float32), {"workers": 2}, **{"X-Partitions": "2"})
    assert r.status_code == 422 and "whole" in r.json()["detail"], r.text
    assert client.get("/v1/tensors/sr.parts").status_code == 404
