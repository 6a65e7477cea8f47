"""GET/PUT /v1/checkpoint: one safetensors file with every tensor, restorable."""

import json

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

OCTET = {"Content-Type": "application/octet-stream"}


def put(client, name, arr, optimizer=None, **headers):
    hd = {**OCTET, "X-Dtype": str(arr.dtype), "X-Shape": ",".join(map(str, arr.shape)), **headers}
    if optimizer:
        hd["X-Optimizer"] = json.dumps(optimizer)
    r = client.put(f"/v1/tensors/{name}", content=np.ascontiguousarray(arr).tobytes(), headers=hd)
    assert r.status_code in (200, 201), r.text
    return r.json()["version"]


def grad(client, name, arr):
    r = client.post(f"/v1/tensors/{name}/grad", content=arr.tobytes(), headers=OCTET)
    assert r.status_code == 200, r.text
    return r.json()["version"]


def get(client, name):
    r = client.get(f"/v1/tensors/{name}")
    assert r.status_code == 200, r.text
    shape = tuple(int(d) for d in r.headers["X-Shape"].split(",") if d)
    return np.frombuffer(r.content, r.headers["X-Dtype"]).reshape(shape), int(r.headers["X-Version"])


def meta_of(body: bytes) -> dict:
    n = int.from_bytes(body[:8], "little")
    return json.loads(body[8 : 8 + n])["__metadata__"]


@pytest.fixture(scope="module")
def saved(client):
    """A few tensors with different optimizers, some pushed, and a checkpoint of them."""
    rng = np.random.default_rng(0)
    values = {
        "ck.fc1.weight": rng.standard_normal((16, 8)).astype("<f4"),
        "ck.fc1.bias": np.zeros(16, "<f4"),
        "ck.steps": np.array(7, "<i8"),
        "ck.half": np.arange(6, dtype="<f2"),
    }
    put(client, "ck.fc1.weight", values["ck.fc1.weight"], {"type": "adam", "lr": 0.01})
    put(client, "ck.fc1.bias", values["ck.fc1.bias"], {"type": "sgd", "lr": 0.1, "momentum": 0.9})
    put(client, "ck.steps", values["ck.steps"])
    put(client, "ck.half", values["ck.half"])
    for _ in range(3):
        grad(client, "ck.fc1.weight", np.ones((16, 8), "<f4"))
        grad(client, "ck.fc1.bias", np.ones(16, "<f4"))
    r = client.get("/v1/checkpoint")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-safetensors"
    assert "attachment" in r.headers["content-disposition"]
    assert int(r.headers["content-length"]) == len(r.content)
    return r.content


def test_checkpoint_holds_values_versions_specs_and_state(client, saved):
    arrays = st_load(saved)
    meta = json.loads(meta_of(saved)["paramstore"])
    assert meta["format"] == "paramstore.checkpoint" and meta["format_version"] == 1
    assert meta["state"] is True and meta["shards"] == [0, 1] and meta["cluster_shards"] == 2
    for name in ("ck.fc1.weight", "ck.fc1.bias", "ck.steps", "ck.half"):
        live, version = get(client, name)
        np.testing.assert_array_equal(arrays[name], live)
        assert arrays[name].dtype == live.dtype and arrays[name].shape == live.shape
        d = meta["tensors"][name]
        assert d["version"] == version and d["dtype"] == str(live.dtype) and d["shape"] == list(live.shape)
    w = meta["tensors"]["ck.fc1.weight"]
    assert w["version"] == 4 and w["optimizer"]["type"] == "adam" and w["optimizer"]["lr"] == 0.01
    assert sorted(w["state_arrays"]) == ["exp_avg", "exp_avg_sq"] and w["state_scalars"]["step"] == 3
    assert arrays["ck.fc1.weight/exp_avg"].shape == (16, 8)
    # after three pushes of ones, Adam's first moment is 1 - 0.9**3 everywhere
    np.testing.assert_allclose(arrays["ck.fc1.weight/exp_avg"], 1 - 0.9**3, rtol=1e-5)
    b = meta["tensors"]["ck.fc1.bias"]
    assert b["optimizer"]["momentum"] == 0.9 and b["state_arrays"] == ["momentum_buffer"]
    assert meta["tensors"]["ck.steps"]["state_arrays"] == []
    assert json.loads(meta_of(saved)["versions"])["ck.fc1.weight"] == 4


def test_checkpoint_without_state(client, saved):
    r = client.get("/v1/checkpoint", params={"state": 0})
    assert r.status_code == 200
    arrays = st_load(r.content)
    assert not [k for k in arrays if "/" in k]
    assert "ck.fc1.weight" in arrays
    meta = json.loads(meta_of(r.content)["paramstore"])
    assert meta["state"] is False and meta["tensors"]["ck.fc1.weight"]["state_arrays"] == []


def test_checkpoint_loads_into_a_torch_state_dict(client, saved, tmp_path):
    torch = pytest.importorskip("torch")  # a dev dependency: installed in CI, so this never skips there
    from safetensors.torch import load_file

    path = tmp_path / "ck.safetensors"
    path.write_bytes(saved)
    loaded = load_file(str(path))
    model = torch.nn.Linear(8, 16)
    model.load_state_dict({"weight": loaded["ck.fc1.weight"], "bias": loaded["ck.fc1.bias"]})
    live, _ = get(client, "ck.fc1.weight")
    assert torch.equal(model.weight.detach(), torch.from_numpy(live.copy()))
    assert loaded["ck.half"].dtype == torch.float16 and loaded["ck.steps"].dtype == torch.int64
    assert loaded["ck.fc1.weight/exp_avg_sq"].shape == (16, 8)


def test_restore_creates_missing_and_skips_existing(client, saved):
    _, version = get(client, "ck.fc1.weight")
    assert client.delete("/v1/tensors/ck.fc1.bias").status_code == 200
    r = client.put("/v1/checkpoint", content=saved, headers={"Content-Type": "application/x-safetensors"})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["created"] == ["ck.fc1.bias"]
    assert {s["name"] for s in doc["skipped"]} == {"ck.fc1.weight", "ck.steps", "ck.half"}
    assert doc["failed"] == [] and doc["state_restored"] == ["ck.fc1.bias"]
    bias, bias_version = get(client, "ck.fc1.bias")
    np.testing.assert_array_equal(bias, st_load(saved)["ck.fc1.bias"])
    assert bias_version == 1
    listed = {t["name"]: t for t in client.get("/v1/tensors").json()}
    assert listed["ck.fc1.bias"]["optimizer"]["type"] == "sgd"
    assert listed["ck.fc1.bias"]["optimizer"]["momentum"] == 0.9
    assert get(client, "ck.fc1.weight")[1] == version  # untouched


def test_restore_replace_honours_checkpoint_versions(client, saved):
    arrays = st_load(saved)
    meta = json.loads(meta_of(saved)["paramstore"])
    v_half = get(client, "ck.half")[1]
    assert v_half == meta["tensors"]["ck.half"]["version"]
    put(client, "ck.steps", np.array(99, "<i8"))  # changed since the checkpoint
    r = client.put("/v1/checkpoint", params={"mode": "replace", "if_match": "checkpoint"}, content=saved)
    assert r.status_code == 412, r.text
    doc = r.json()
    assert doc["error"] == "precondition_failed" and "not restored" in doc["detail"]  # the usual error shape
    failed = {f["name"]: f for f in doc["failed"]}
    assert failed["ck.steps"]["error"] == "precondition_failed"
    assert "ck.half" in doc["replaced"]
    assert get(client, "ck.steps")[0] == 99
    # unconditional replace: every value back to the checkpoint, versions keep rising
    r = client.put("/v1/checkpoint", params={"mode": "replace"}, content=saved)
    assert r.status_code == 200, r.text
    for name in ("ck.steps", "ck.half", "ck.fc1.weight"):
        live, version = get(client, name)
        np.testing.assert_array_equal(live, arrays[name])
        assert version > meta["tensors"][name]["version"]


def test_restore_a_plain_safetensors_file(client):
    body = st_save({"plain.a": np.arange(4, dtype="<f4"), "plain.b": np.ones((2, 2), "<f8")})
    r = client.put("/v1/checkpoint", content=body)
    assert r.status_code == 200, r.text
    assert r.json()["created"] == ["plain.a", "plain.b"]
    a, _ = get(client, "plain.a")
    np.testing.assert_array_equal(a, np.arange(4, dtype="<f4"))
    listed = {t["name"]: t for t in client.get("/v1/tensors").json()}
    assert listed["plain.b"]["optimizer"] == {"type": "assign"} and listed["plain.b"]["dtype"] == "float64"


def test_restore_reports_unsupported_tensors_and_restores_the_rest(client):
    body = st_save({"mixed.ok": np.ones(3, "<f4"), "mixed.bytes": np.zeros(3, np.uint8)})
    r = client.put("/v1/checkpoint", content=body)
    assert r.status_code == 422, r.text
    doc = r.json()
    assert doc["created"] == ["mixed.ok"]
    assert [(f["name"], f["error"]) for f in doc["failed"]] == [("mixed.bytes", "unprocessable")]
    assert client.get("/v1/tensors/mixed.bytes").status_code == 404


def test_restore_rejects_garbage(client):
    r = client.put("/v1/checkpoint", content=b"not a safetensors file at all")
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    r = client.put("/v1/checkpoint", params={"if_match": "checkpoint"}, content=st_save({"x": np.zeros(1, "<f4")}))
    assert r.status_code == 400
    r = client.put("/v1/checkpoint", content=b"x", headers={"Content-Type": "application/json"})
    assert r.status_code == 415
    # nothing is left behind in the staging directory
    tmp = client.app.state.store.data_dir / "checkpoint-tmp"
    assert list(tmp.iterdir()) == []


def test_partial_placement_saves_hosted_shards_and_skips_the_others(tmp_path):
    """replication 1 of 2 nodes: n0 hosts shard 0 only (n1 is never started)."""
    from starlette.testclient import TestClient

    from api.app import create_app
    from store.config import config_from_mapping
    from store.placement import shard_for
    from tests.helpers.apps import cluster_secret
    from tests.ports import free_range
    from tests.waiting import wait_until

    base = free_range(16)
    cfg = config_from_mapping(
        {
            "cluster": {"shards": 2, "replication": 1},
            "nodes": [
                {"id": f"n{i}", "http": f"127.0.0.1:{base + 8 * i}", "raft": f"127.0.0.1:{base + 8 * i + 1}"}
                for i in range(2)
            ],
            "node": {"id": "n0", "data_dir": str(tmp_path / "n0")},
            "raft": {"password": cluster_secret()},
            "limits": {"request_timeout": 1.5},
        }
    )
    here = next(f"p{i}" for i in range(100) if shard_for(f"p{i}", 2) == 0)
    elsewhere = next(f"p{i}" for i in range(100) if shard_for(f"p{i}", 2) == 1)
    with TestClient(create_app(cfg)) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, 15, "n0 ready")
        put(c, here, np.ones(2, "<f4"))
        r = c.get("/v1/checkpoint")
        assert r.status_code == 200
        meta = json.loads(meta_of(r.content)["paramstore"])
        assert meta["shards"] == [0] and meta["cluster_shards"] == 2
        body = st_save({here: np.ones(2, "<f4"), elsewhere: np.ones(2, "<f4")})
        r = c.put("/v1/checkpoint", content=body)
        assert r.status_code == 200, r.text
        (skip_here, skip_elsewhere) = sorted(r.json()["skipped"], key=lambda d: d["name"] != here)
        assert skip_here["reason"] == "exists"
        assert skip_elsewhere["reason"] == "not_hosted" and skip_elsewhere["hosts"] == [cfg.nodes[1].url]


def test_checkpoint_file_edge_cases_read_back_with_safetensors(client, tmp_path):
    """Empty and 0-d tensors, every dtype the store holds: the streamed file
    is read back by safetensors (numpy and torch) with exact shapes and bytes."""
    from safetensors.torch import load_file

    values = {
        "edge.empty": np.zeros((0, 3), "<f4"),
        "edge.scalar64": np.array(2.5, "<f8"),
        "edge.i32": np.arange(5, dtype="<i4"),
        "edge.f16": np.full((2, 2), 0.5, "<f2"),
    }
    for name, v in values.items():
        r = client.put(
            f"/v1/tensors/{name}",
            content=v.tobytes(),
            headers={**OCTET, "X-Dtype": str(v.dtype), "X-Shape": ",".join(map(str, v.shape))},
        )
        assert r.status_code in (200, 201), (name, r.text)
    r = client.get("/v1/checkpoint")
    assert r.status_code == 200
    arrays = st_load(r.content)
    path = tmp_path / "edge.safetensors"
    path.write_bytes(r.content)
    tensors = load_file(str(path))
    for name, v in values.items():
        assert arrays[name].shape == v.shape and arrays[name].dtype == v.dtype, name
        assert arrays[name].tobytes() == v.tobytes(), name
        assert tuple(tensors[name].shape) == v.shape, name
    assert (8 + int.from_bytes(r.content[:8], "little")) % 8 == 0  # data 8-byte aligned


def test_restore_brings_back_optimizer_state(client):
    rng = np.random.default_rng(7)
    w0 = rng.standard_normal((4, 3)).astype(np.float32)
    r = client.put(
        "/v1/tensors/os.w",
        content=w0.tobytes(),
        headers={
            "Content-Type": "application/octet-stream",
            "X-Dtype": "float32",
            "X-Shape": "4,3",
            "X-Optimizer": '{"type": "adam", "lr": 0.05}',
        },
    )
    assert r.status_code == 201
    grads = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(4)]

    def push(name, g):
        assert (
            client.post(
                f"/v1/tensors/{name}/grad", content=g.tobytes(), headers={"Content-Type": "application/octet-stream"}
            ).status_code
            == 200
        )

    for g in grads[:2]:
        push("os.w", g)
    saved = client.get("/v1/checkpoint").content
    for g in grads[2:]:
        push("os.w", g)
    expected, _ = get(client, "os.w")
    assert client.delete("/v1/tensors/os.w").status_code == 200
    doc = client.put("/v1/checkpoint", content=saved).json()
    assert "os.w" in doc["created"] and "os.w" in doc["state_restored"]
    for g in grads[2:]:  # the same pushes after the restore land on the same bytes
        push("os.w", g)
    got, _ = get(client, "os.w")
    assert got.tobytes() == expected.tobytes()


def test_a_checkpoint_body_over_the_limit_is_refused_as_it_arrives(tmp_path):
    from starlette.testclient import TestClient

    from tests.helpers.apps import single_node_app
    from tests.waiting import wait_until

    app = single_node_app(tmp_path, limits={"max_checkpoint_bytes": 64 << 10})
    staged = tmp_path / "n0" / "checkpoint-tmp"

    def chunked():  # no Content-Length: counted as it arrives
        for _ in range(1 << 10):
            yield b"\0" * (16 << 10)

    with TestClient(app) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, 15, "single replica ready")
        r = c.put("/v1/checkpoint", content=chunked())
        assert r.status_code == 413 and r.json()["error"] == "payload_too_large", r.text
        r = c.put("/v1/checkpoint", content=b"\0" * ((64 << 10) + 1))
        assert r.status_code == 413, r.text
        assert list(staged.iterdir()) == []
        small = st_save({"ck.small": np.ones(4, "<f4")})
        r = c.put("/v1/checkpoint", content=small)
        assert r.status_code == 200 and r.json()["created"] == ["ck.small"], r.text
