"""Batch pulls and pushes as safetensors; sparse row pushes and row pulls."""

import json

import numpy as np
from safetensors.numpy import load, save

ST = "application/x-safetensors"


def create(client, name, arr, optimizer='{"type": "sgd", "lr": 1.0}'):
    r = client.put(
        f"/v1/tensors/{name}",
        content=arr.tobytes(),
        headers={
            "Content-Type": "application/octet-stream",
            "X-Dtype": str(arr.dtype),
            "X-Shape": ",".join(map(str, arr.shape)),
            "X-Optimizer": optimizer,
        },
    )
    assert r.status_code in (200, 201), r.text


def test_batch_push_and_pull(client):
    names = [f"bp{i}" for i in range(6)]
    for n in names:
        create(client, n, np.zeros(3, np.float32))
    body = save({n: np.full(3, i, np.float32) for i, n in enumerate(names)})
    r = client.post("/v1/grads:batch", content=body, headers={"Content-Type": ST})
    assert r.status_code == 200, r.text
    assert r.json()["versions"] == {n: 2 for n in names}
    r = client.get("/v1/tensors:batch", params={"names": ",".join(names), "consistency": "linearizable"})
    assert r.status_code == 200 and r.headers["content-type"] == ST
    arrays = load(r.content)
    assert [arrays[n][0] for n in names] == [-i for i in range(6)]


def test_batch_push_is_atomic_within_a_shard(client):
    create(client, "ok1", np.zeros(2, np.float32))
    body = save({"ok1": np.ones(2, np.float32), "missing1": np.ones(2, np.float32)})
    r = client.post("/v1/grads:batch", content=body, headers={"Content-Type": ST})
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    from store.placement import shard_for

    if shard_for("ok1", 2) == shard_for("missing1", 2):  # same Raft entry: nothing applied
        assert client.get("/v1/tensors/ok1").headers["X-Version"] == "1"


def test_batch_bad_input(client):
    r = client.post("/v1/grads:batch", content=b"garbage", headers={"Content-Type": ST})
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    r = client.post("/v1/grads:batch", content=b"{}", headers={"Content-Type": "application/json"})
    assert r.status_code == 415
    r = client.post(
        "/v1/grads:batch",
        content=save({"x": np.ones(1, np.float32)}),
        headers={"Content-Type": ST, "X-Base-Versions": "{bad"},
    )
    assert r.status_code == 400
    assert client.get("/v1/tensors:batch", params={"names": "nope"}).status_code == 404


def test_sparse_rows_push_and_row_pull(client):
    create(client, "emb", np.zeros((1000, 8), np.float32))
    idx = np.array([5, 9, 5], np.int64)
    vals = np.ones((3, 8), np.float32)
    r = client.post(
        "/v1/tensors/emb/grad-rows",
        content=save({"indices": idx, "values": vals}),
        headers={"Content-Type": ST, "X-Base-Version": "1"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 2
    r = client.get("/v1/tensors/emb", params={"rows": "5,9,0"})
    assert r.status_code == 200 and r.headers["X-Shape"] == "3,8" and r.headers["X-Version"] == "2"
    rows = np.frombuffer(r.content, np.float32).reshape(3, 8)
    assert rows[:, 0].tolist() == [-2, -1, 0]
    full = np.frombuffer(client.get("/v1/tensors/emb").content, np.float32).reshape(1000, 8)
    assert np.count_nonzero(full) == 16


def test_sparse_rows_bad_input(client):
    create(client, "emb2", np.zeros((10, 2), np.float32))
    bad = [
        ({"indices": np.array([1], np.int64)}, 400),
        ({"indices": np.array([1], np.int32), "values": np.ones((1, 2), np.float32)}, 422),
        ({"indices": np.array([1, 2], np.int64), "values": np.ones((1, 2), np.float32)}, 422),
        ({"indices": np.array([99], np.int64), "values": np.ones((1, 2), np.float32)}, 422),
        ({"indices": np.array([1], np.int64), "values": np.ones((1, 3), np.float32)}, 422),
    ]
    for parts, status in bad:
        r = client.post("/v1/tensors/emb2/grad-rows", content=save(parts), headers={"Content-Type": ST})
        assert r.status_code == status, (parts.keys(), r.status_code, r.text)
        assert r.json()["error"]
    assert client.get("/v1/tensors/emb2", params={"rows": "1,x"}).status_code == 400
    assert client.get("/v1/tensors/emb2", params={"rows": "10"}).status_code == 422
    assert client.get("/v1/tensors/emb2").headers["X-Version"] == "1"


def test_batch_pull_min_versions(client):
    create(client, "mv", np.zeros(2, np.float32))
    r = client.get("/v1/tensors:batch", params={"names": "mv"}, headers={"X-Min-Versions": '{"mv": 1}'})
    assert r.status_code == 200 and json.loads(load_meta(r.content)["versions"]) == {"mv": 1}
    r = client.get("/v1/tensors:batch", params={"names": "mv", "timeout": 0.2}, headers={"X-Min-Versions": '{"mv": 5}'})
    assert r.status_code == 408 and r.json()["error"] == "wait_timeout"  # the caller's wait, not the server
    r = client.get("/v1/tensors:batch", params={"names": "mv"}, headers={"X-Min-Versions": '{"mv": -1}'})
    assert r.status_code == 400


def load_meta(body: bytes) -> dict:
    n = int.from_bytes(body[:8], "little")
    return json.loads(body[8 : 8 + n])["__metadata__"]
