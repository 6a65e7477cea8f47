"""Partitioned tensors through the HTTP API of one replica hosting both
shards: create, pull, push, If-Match on the version vector, bad input,
listing, delete."""

import json

import numpy as np
import pytest
from starlette.testclient import TestClient

from tests.helpers.apps import single_node_app
from tests.waiting import wait_until

SGD = json.dumps({"type": "sgd", "lr": 0.5})


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    limits = {"max_partitions": 8, "partition_auto_bytes": 4096, "partition_bytes": 1024}
    app = single_node_app(tmp_path_factory.mktemp("partitioned"), limits=limits)
    with TestClient(app) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, 15, "single replica ready")
        yield c


def raw(arr, **headers):
    return {
        "content": arr.tobytes(),
        "headers": {"X-Dtype": str(arr.dtype), "X-Shape": ",".join(map(str, arr.shape)), **headers},
    }


def pull(c, name, **params):
    r = c.get(f"/v1/tensors/{name}", params=params)
    assert r.status_code == 200, r.text
    shape = tuple(int(d) for d in r.headers["X-Shape"].split(","))
    return np.frombuffer(r.content, r.headers["X-Dtype"]).reshape(shape), r


def test_a_partitioned_tensor_is_created_read_and_listed_whole(client):
    value = np.arange(40, dtype=np.float32).reshape(10, 4)
    r = client.put("/v1/tensors/p1", **raw(value, **{"X-Partitions": "3", "If-None-Match": "*"}))
    assert r.status_code == 201, r.text
    doc = r.json()
    assert doc["versions"] == [1, 1, 1] and doc["version"] == 1
    assert [p["rows"] for p in doc["partitions"]] == [[0, 4], [4, 7], [7, 10]]
    assert len({p["shard"] for p in doc["partitions"]}) == 2  # both shards of the cluster
    got, r = pull(client, "p1")
    assert got.tobytes() == value.tobytes()
    assert r.headers["X-Version"] == "1" and json.loads(r.headers["X-Versions"]) == [1, 1, 1]
    assert r.headers["ETag"] == '"1.1.1"'
    assert [p["rows"] for p in json.loads(r.headers["X-Partitions"])] == [[0, 4], [4, 7], [7, 10]]
    npy = client.get("/v1/tensors/p1", headers={"Accept": "application/x-npy"})
    assert np.load(__import__("io").BytesIO(npy.content)).tobytes() == value.tobytes()
    js = client.get("/v1/tensors/p1", headers={"Accept": "application/json"}).json()
    assert js["data"] == value.tolist() and js["shape"] == [10, 4]
    listed = {t["name"]: t for t in client.get("/v1/tensors").json()}
    assert "p1" in listed and not any("#" in n for n in listed)
    assert listed["p1"]["shape"] == [10, 4] and listed["p1"]["versions"] == [1, 1, 1]
    assert [p["rows"] for p in listed["p1"]["partitions"]] == [[0, 4], [4, 7], [7, 10]]
    assert client.head("/v1/tensors/p1").headers["Content-Length"] == str(value.nbytes)


def test_a_push_applies_to_every_part_as_to_the_whole_tensor(client):
    init = np.random.default_rng(1).standard_normal((7, 3)).astype(np.float32)
    grad = np.random.default_rng(2).standard_normal((7, 3)).astype(np.float32)
    for name, k in (("whole", "1"), ("cut", "4")):
        r = client.put(f"/v1/tensors/{name}", **raw(init, **{"X-Partitions": k, "X-Optimizer": SGD}))
        assert r.status_code == 201, r.text
        r = client.post(f"/v1/tensors/{name}/grad", **raw(grad))
        assert r.status_code == 200, r.text
    assert "X-Versions" not in client.get("/v1/tensors/whole").headers  # X-Partitions: 1 is a whole tensor
    assert r.json()["versions"] == [2, 2, 2, 2] and r.headers["ETag"] == '"2.2.2.2"'
    assert pull(client, "cut")[0].tobytes() == pull(client, "whole")[0].tobytes()
    # a raw body may omit X-Dtype / X-Shape, as for a whole tensor
    r = client.post("/v1/tensors/cut/grad", content=grad.tobytes())
    assert r.status_code == 200 and r.json()["version"] == 3


def test_if_match_compares_the_whole_version_vector(client):
    value = np.ones(6, np.float64)
    client.put("/v1/tensors/vec", **raw(value, **{"X-Partitions": "2"}))
    r = client.post("/v1/tensors/vec/grad", **raw(value, **{"If-Match": '"1.2"'}))
    assert r.status_code == 412 and r.json()["current_versions"] == [1, 1]
    r = client.post("/v1/tensors/vec/grad", **raw(value, **{"If-Match": '"1.1"'}))
    assert r.status_code == 200 and r.json()["versions"] == [2, 2]
    assert client.get("/v1/tensors/vec", headers={"If-None-Match": '"2.2"'}).status_code == 304
    r = client.get("/v1/tensors/vec", params={"min_version": 3, "timeout": 0.2})
    assert r.status_code == 408
    assert client.get("/v1/tensors/vec", params={"min_version": 2, "consistency": "linearizable"}).status_code == 200


@pytest.mark.parametrize(("k", "status"), [("0", 422), ("-2", 422), ("11", 422), ("9", 422), ("x", 400), ("1.5", 400)])
def test_out_of_range_partition_counts_are_refused_with_the_limits_and_create_nothing(client, k, status):
    r = client.put("/v1/tensors/bad", **raw(np.zeros((10, 2), np.float32), **{"X-Partitions": k}))
    assert r.status_code == status, r.text
    if status == 422:
        body = r.json()
        assert body["rows"] == 10 and body["max_partitions"] == 8 and "min(10, 8) = 8" in body["detail"]
    assert client.get("/v1/tensors/bad").status_code == 404


def test_a_push_of_the_wrong_shape_or_with_nan_applies_no_part(client):
    client.put("/v1/tensors/shp", **raw(np.zeros((5, 2), np.float32), **{"X-Partitions": "2"}))
    for bad in (np.zeros((4, 2), np.float32), np.zeros((5, 2), np.float64), np.full((5, 2), np.nan, np.float32)):
        r = client.post("/v1/tensors/shp/grad", **raw(bad))
        assert r.status_code == 422, r.text
    _, r = pull(client, "shp")
    assert json.loads(r.headers["X-Versions"]) == [1, 1]
    r = client.put("/v1/tensors/shp", **raw(np.zeros((5, 2), np.float32), **{"X-Partitions": "3"}))
    assert r.status_code == 422 and "checkpoint" in r.json()["detail"]
    assert (
        client.put("/v1/tensors/shp", **raw(np.zeros((5, 2), np.float32), **{"If-None-Match": "*"})).status_code == 412
    )
    r = client.put("/v1/tensors/shp", **raw(np.ones((5, 2), np.float32)))  # replace: every part
    assert r.status_code == 200 and r.json()["versions"] == [2, 2]
    assert pull(client, "shp")[0].tobytes() == np.ones((5, 2), np.float32).tobytes()


def test_parts_are_read_and_pushed_directly_but_never_created_or_deleted_and_delete_removes_every_part(client):
    client.put("/v1/tensors/gone", **raw(np.arange(4, dtype=np.int64), **{"X-Partitions": "2"}))
    part, r = pull(client, "gone%23p1")  # what the SDK does: '#' escaped
    assert part.tolist() == [2, 3] and r.headers["X-Version"] == "1" and "X-Versions" not in r.headers
    r = client.post("/v1/tensors/gone%23p1/grad", **raw(np.array([5, 6], np.int64)))
    assert r.status_code == 200 and r.json()["version"] == 2
    assert pull(client, "gone")[0].tolist() == [0, 1, 5, 6]
    assert client.put("/v1/tensors/gone%23p1", **raw(np.zeros(2, np.int64))).status_code == 400
    assert client.put("/v1/tensors/gone%23p7", **raw(np.zeros(2, np.int64))).status_code == 400
    assert client.delete("/v1/tensors/gone%23p1").status_code == 400
    assert client.get("/v1/tensors/gone%23p01").status_code == 400
    assert client.post("/v1/tensors/gone/grad", **raw(np.ones(4, np.int64), **{"If-Match": '"1.1"'})).status_code == 412
    r = client.delete("/v1/tensors/gone", headers={"If-Match": '"2.1"'})
    assert r.status_code == 412
    r = client.delete("/v1/tensors/gone", headers={"If-Match": '"1.2"'})
    assert r.status_code == 200 and r.json()["deleted"]
    assert client.get("/v1/tensors/gone").status_code == 404
    assert "gone" not in {t["name"] for t in client.get("/v1/tensors").json()}
    r = client.put("/v1/tensors/gone", **raw(np.zeros(4, np.int64), **{"X-Partitions": "4"}))
    assert r.status_code == 201 and r.json()["versions"] == [1, 1, 1, 1]  # the name is free again


def test_a_checkpoint_holds_partitioned_tensors_whole_and_reloads_them_in_any_number_of_parts(client):
    from safetensors.numpy import load as st_load

    adam = json.dumps({"type": "adam", "lr": 0.01})
    init = np.random.default_rng(5).standard_normal((9, 4)).astype(np.float32)
    g = np.random.default_rng(6).standard_normal((9, 4)).astype(np.float32)
    for name, k in (("ckw", "1"), ("ckp", "3")):
        assert (
            client.put(f"/v1/tensors/{name}", **raw(init, **{"X-Partitions": k, "X-Optimizer": adam})).status_code
            == 201
        )
        for _ in range(2):
            assert client.post(f"/v1/tensors/{name}/grad", **raw(g)).status_code == 200
    r = client.get("/v1/checkpoint")
    assert r.status_code == 200, r.text
    arrays = st_load(r.content)
    assert not any("#" in key for key in arrays)
    n = int.from_bytes(r.content[:8], "little")
    meta = json.loads(json.loads(r.content[8 : 8 + n])["__metadata__"]["paramstore"])
    assert meta["tensors"]["ckp"]["partitions"] == 3 and meta["tensors"]["ckp"]["versions"] == [3, 3, 3]
    assert meta["incomplete"] == []
    for key in ("ckp", "ckp/exp_avg", "ckp/exp_avg_sq"):
        assert arrays[key].tobytes() == arrays[key.replace("ckp", "ckw")].tobytes()  # whole, part for part
    file = r.content

    # reload as recorded (3 parts), then as 2 parts, and the whole tensor as 4 parts
    for asked, parts in ((None, {"ckp": 3}), ({"ckp": 2, "ckw": 4}, {"ckp": 2, "ckw": 4})):
        for name in ("ckp", "ckw"):
            assert client.delete(f"/v1/tensors/{name}").status_code == 200
        params = {"partitions": ",".join(f"{n}:{k}" for n, k in asked.items())} if asked else {}
        r = client.put("/v1/checkpoint", content=file, params=params)
        assert r.status_code == 200, r.text
        assert {"ckp", "ckw"} <= set(r.json()["created"]) and {"ckp", "ckw"} <= set(r.json()["state_restored"])
        for name, k in parts.items():
            _, got = pull(client, name)
            assert len(json.loads(got.headers["X-Versions"])) == k
        # the optimizer state came back too: one more Adam step gives the same bytes, cut or whole
        for name in ("ckp", "ckw"):
            assert client.post(f"/v1/tensors/{name}/grad", **raw(g)).status_code == 200
        assert pull(client, "ckp")[0].tobytes() == pull(client, "ckw")[0].tobytes()
    r = client.put("/v1/checkpoint", content=file, params={"mode": "replace"})
    assert r.status_code == 422 and "repartition" in r.text  # ckp: 2 parts here, 3 in the file
    r = client.put("/v1/checkpoint", content=file, params={"partitions": "ckp:0"})
    assert r.status_code == 422
    assert client.put("/v1/checkpoint", content=file, params={"partitions": "ckp"}).status_code == 400


def test_tensors_over_the_configured_size_are_partitioned_automatically_one_part_per_shard(client):
    big = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)  # 8 KB: over 4 KB, parts of 1 KB, 2 shards
    r = client.put("/v1/tensors/auto", **raw(big, **{"If-None-Match": "*"}))
    assert r.status_code == 201 and r.json()["versions"] == [1, 1]
    assert [p["rows"] for p in r.json()["partitions"]] == [[0, 32], [32, 64]]
    r = client.put("/v1/tensors/auto", **raw(big, **{"If-None-Match": "*"}))
    assert r.status_code == 412 and r.json()["current_version"] == 1  # what create(exist_ok=True) reads
    assert client.put("/v1/tensors/auto", **raw(big, **{"If-Match": "*"})).json()["versions"] == [2, 2]
    small = client.put("/v1/tensors/auto_small", **raw(np.zeros(1000, np.float32)))  # 4,000 bytes
    assert small.status_code == 201 and "versions" not in small.json()
    one = client.put("/v1/tensors/auto_one", **raw(big, **{"X-Partitions": "1"}))  # asked whole
    assert one.status_code == 201 and "versions" not in one.json()
    replaced = client.put("/v1/tensors/auto_one", **raw(big))  # a replace of a whole tensor stays whole
    assert replaced.status_code == 200 and replaced.json()["version"] == 2 and "versions" not in replaced.json()
    for k in ("2", "0"):
        r = client.put("/v1/tensors/auto_one", **raw(big, **{"X-Partitions": k}))
        assert r.status_code == 422, r.text
    assert pull(client, "auto_one")[1].headers["X-Version"] == "2"


def sparse(indices, values):
    from safetensors.numpy import save

    body = save({"indices": np.asarray(indices, np.int64), "values": np.ascontiguousarray(values)})
    return {"content": body, "headers": {"Content-Type": "application/x-safetensors"}}


def test_rows_and_sparse_pushes_of_a_partitioned_tensor_equal_the_whole_tensors(client):
    """?rows= and grad-rows split by part; Adam steps every part once per push
    (the untouched parts get an empty push), so the result is bit-identical to
    the whole tensor's and the version vector stays aligned."""
    adam = json.dumps({"type": "adam", "lr": 0.1})
    init = np.random.default_rng(3).standard_normal((10, 3)).astype(np.float32)
    for name, k in (("rw_whole", "1"), ("rw_cut", "3")):
        r = client.put(f"/v1/tensors/{name}", **raw(init, **{"X-Partitions": k, "X-Optimizer": adam}))
        assert r.status_code == 201, r.text
    rng = np.random.default_rng(4)
    for indices in ([0, 1, 1, 9], [5], [2, 3]):  # the second touches one part only
        values = rng.standard_normal((len(indices), 3)).astype(np.float32)
        for name in ("rw_whole", "rw_cut"):
            r = client.post(f"/v1/tensors/{name}/grad-rows", **sparse(indices, values))
            assert r.status_code == 200, r.text
    assert r.json()["versions"] == [4, 4, 4] and r.headers["ETag"] == '"4.4.4"'
    assert pull(client, "rw_cut")[0].tobytes() == pull(client, "rw_whole")[0].tobytes()
    rows = "9,0,4,4,7"
    got, r = pull(client, "rw_cut", rows=rows)
    assert got.tobytes() == pull(client, "rw_whole", rows=rows)[0].tobytes()
    assert got.shape == (5, 3) and json.loads(r.headers["X-Versions"]) == [4, 4, 4]
    got, r = pull(client, "rw_cut", rows="5")
    assert json.loads(r.headers["X-Versions"]) == [None, 4, None] and r.headers["X-Version"] == "4"
    before = pull(client, "rw_cut")[0]
    for bad in (sparse([10], np.ones((1, 3), np.float32)), sparse([0], np.full((1, 3), np.nan, np.float32))):
        r = client.post("/v1/tensors/rw_cut/grad-rows", **bad)
        assert r.status_code == 422 and "rw_cut" in r.json()["detail"], r.text
    r = client.post("/v1/tensors/rw_cut/grad-rows", **sparse([0], np.ones((1, 3), np.float64)))
    assert r.status_code == 422 and "no part was changed" in r.json()["detail"]
    assert client.get("/v1/tensors/rw_cut", params={"rows": "3,10"}).status_code == 422
    assert pull(client, "rw_cut")[0].tobytes() == before.tobytes()


def test_a_row_long_poll_waits_for_every_part(client):
    init = np.zeros((6, 2), np.float32)
    r = client.put("/v1/tensors/rw_poll", **raw(init, **{"X-Partitions": "2", "X-Optimizer": SGD}))
    assert r.status_code == 201, r.text
    r = client.get("/v1/tensors/rw_poll", params={"rows": "0,5", "wait_version_gt": 1, "timeout": 0})
    assert r.status_code == 304 and json.loads(r.headers["X-Versions"]) == [1, 1], r.text
    assert client.post("/v1/tensors/rw_poll/grad", **raw(np.ones((6, 2), np.float32))).status_code == 200
    got, r = pull(client, "rw_poll", rows="5,0", wait_version_gt=1, timeout=5)
    assert got.tolist() == [[-0.5, -0.5], [-0.5, -0.5]] and json.loads(r.headers["X-Versions"]) == [2, 2]


def test_batch_pushes_and_pulls_take_partitioned_tensors(client):
    from safetensors.numpy import load, save

    init = np.arange(24, dtype=np.float32).reshape(8, 3)
    for name, k in (("bt_cut", "3"), ("bt_whole", "1")):
        r = client.put(f"/v1/tensors/{name}", **raw(init, **{"X-Partitions": k, "X-Optimizer": SGD}))
        assert r.status_code == 201, r.text
    grad = np.ones((8, 3), np.float32)
    body = save({"bt_cut": grad, "bt_whole": grad})
    r = client.post("/v1/grads:batch", content=body, headers={"Content-Type": "application/x-safetensors"})
    assert r.status_code == 200 and r.json()["versions"] == {"bt_cut": 2, "bt_whole": 2}, r.text
    narrow = save({"bt_cut": grad.astype(np.float16)})  # narrowed like any float tensor's gradient
    r = client.post("/v1/grads:batch", content=narrow, headers={"Content-Type": "application/x-safetensors"})
    assert r.status_code == 200 and r.json()["versions"] == {"bt_cut": 3}, r.text
    r = client.get(
        "/v1/tensors:batch",
        params={"names": "bt_cut,bt_whole", "consistency": "linearizable"},
        headers={"X-Min-Versions": json.dumps({"bt_cut": 3, "bt_whole": 2})},
    )
    assert r.status_code == 200, r.text
    got = load(r.content)
    assert got["bt_cut"].tolist() == (init - 1.0).tolist() and got["bt_whole"].tolist() == (init - 0.5).tolist()
    r = client.post(
        "/v1/grads:batch",
        content=save({"bt_cut": np.ones((2, 3), np.float32)}),
        headers={"Content-Type": "application/x-safetensors"},
    )
    assert r.status_code == 422 and "no part was changed" in r.json()["detail"], r.text


def test_a_batch_push_of_a_long_named_partitioned_tensor_with_a_long_request_id_applies_once(client):
    from safetensors.numpy import save

    name = "long_" + "n" * 200
    r = client.put(f"/v1/tensors/{name}", **raw(np.zeros((4, 2), np.float32), **{"X-Partitions": "2"}))
    assert r.status_code == 201, r.text
    body = save({name: np.ones((4, 2), np.float32)})
    headers = {"Content-Type": "application/x-safetensors", "X-Request-Id": "r" * 128}
    for _ in range(2):  # the retry finds each part's recorded outcome
        r = client.post("/v1/grads:batch", content=body, headers=headers)
        assert r.status_code == 200 and r.json()["versions"] == {name: 2}, r.text
