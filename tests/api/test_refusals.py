"""Inputs the store used to accept and should refuse (issue 17, item 7,
"accepted where it should refuse"): each is a 4xx with the JSON error body,
and nothing stored changes."""

import json

import numpy as np
import pytest
from safetensors.numpy import save

RAW = "application/octet-stream"
JSON = "application/json"
F32 = {"Content-Type": RAW, "X-Dtype": "float32", "X-Shape": "2"}


def _listing(client) -> dict[str, int]:
    r = client.get("/v1/tensors")
    assert r.status_code == 200
    return {t["name"]: t["version"] for t in r.json()}


def _refused(r, status: int) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] in ("invalid_request", "unprocessable") and body["detail"], body


def _value(client, name: str) -> np.ndarray:
    r = client.get(f"/v1/tensors/{name}")
    assert r.status_code == 200, r.text
    return np.frombuffer(r.content, np.float32)


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "adam", "eps": 0},
        {"type": "adamw", "eps": 0.0},
        {"type": "adagrad", "eps": 0},
        {"type": "sgd", "lr": 1e308},
        {"type": "sgd", "lr": 0.1, "weight_decay": 1e300},
    ],
)
def test_optimizer_settings_that_can_only_give_nan_or_inf_are_422(client, spec):
    before = _listing(client)
    r = client.put("/v1/tensors/rf-opt", content=b"\0" * 8, headers={**F32, "X-Optimizer": json.dumps(spec)})
    _refused(r, 422)
    assert _listing(client) == before


def test_large_but_usable_settings_are_still_accepted(client):
    r = client.put(
        "/v1/tensors/rf-opt-ok",
        content=b"\0" * 8,
        headers={**F32, "X-Optimizer": json.dumps({"type": "sgd", "lr": 1e6})},
    )
    assert r.status_code == 201, r.text


def test_a_step_whose_result_is_not_finite_is_refused(client):
    spec = json.dumps({"type": "sgd", "lr": 1e5})
    r = client.put("/v1/tensors/rf-step", content=b"\0" * 8, headers={**F32, "X-Optimizer": spec})
    assert r.status_code == 201, r.text
    grad = np.array([1e36, 1.0], np.float32).tobytes()  # finite, but lr * grad overflows float32
    r = client.post("/v1/tensors/rf-step/grad", content=grad, headers={"Content-Type": RAW})
    _refused(r, 422)
    assert "NaN or Inf" in r.json()["detail"]
    assert _listing(client)["rf-step"] == 1 and not _value(client, "rf-step").any()
    # the same through the sparse route: nothing is written in place either
    body = save({"indices": np.array([0], np.int64), "values": np.array([1e36], np.float32)})
    r = client.post(
        "/v1/tensors/rf-step/grad-rows", content=body, headers={"Content-Type": "application/x-safetensors"}
    )
    _refused(r, 422)
    assert _listing(client)["rf-step"] == 1 and not _value(client, "rf-step").any()
    # an ordinary step still applies
    r = client.post(
        "/v1/tensors/rf-step/grad", content=np.array([-1e-5, 0], np.float32).tobytes(), headers={"Content-Type": RAW}
    )
    assert r.status_code == 200 and r.json()["version"] == 2, r.text


def test_a_tensor_that_allows_non_finite_values_takes_the_step(client):
    spec = json.dumps({"type": "sgd", "lr": 1e5})
    r = client.put(
        "/v1/tensors/rf-inf", content=b"\0" * 8, headers={**F32, "X-Optimizer": spec, "X-Allow-Nonfinite": "true"}
    )
    assert r.status_code == 201, r.text
    r = client.post(
        "/v1/tensors/rf-inf/grad", content=np.array([1e36, 1.0], np.float32).tobytes(), headers={"Content-Type": RAW}
    )
    assert r.status_code == 200, r.text
    assert np.isinf(_value(client, "rf-inf")[0])


@pytest.mark.parametrize(
    "doc",
    [
        {"data": [[[[[[[[[1.0]]]]]]]]]},  # rank 9 from nesting, no shape sent
        {"dtype": "int32", "data": [1.5, 2]},  # would be truncated to 1
        {"dtype": "int64", "data": [1e300]},
        {"data": [1e300]},  # finite in JSON, Inf as float32
        {"dtype": "int32", "data": [True, 1]},
        {"data": [True, False]},
        {"data": "123"},
        {"data": ["1", "2"]},
        {"data": [[1, 2], [3]]},  # ragged
        {"data": [{"a": 1}]},
    ],
)
def test_json_data_that_is_not_numbers_of_the_dtype_is_422(client, doc):
    before = _listing(client)
    r = client.put("/v1/tensors/rf-json", content=json.dumps(doc), headers={"Content-Type": JSON})
    _refused(r, 422)
    assert _listing(client) == before


@pytest.mark.parametrize("shape", [[2.5], [True], ["2"], "2", [[2]]])
def test_json_shape_must_be_a_list_of_integers(client, shape):
    before = _listing(client)
    r = client.put(
        "/v1/tensors/rf-shape", content=json.dumps({"data": [1, 2], "shape": shape}), headers={"Content-Type": JSON}
    )
    _refused(r, 400)
    assert _listing(client) == before


def test_json_integers_and_numbers_are_still_fine(client):
    r = client.put(
        "/v1/tensors/rf-int",
        content=json.dumps({"dtype": "int32", "data": [[1, -2], [3, 4]]}),
        headers={"Content-Type": JSON},
    )
    assert r.status_code == 201, r.text
    r = client.put(
        "/v1/tensors/rf-float", content=json.dumps({"data": [1, 2.5], "shape": [2]}), headers={"Content-Type": JSON}
    )
    assert r.status_code == 201, r.text
    r = client.put("/v1/tensors/rf-scalar", content=json.dumps({"data": 3}), headers={"Content-Type": JSON})
    assert r.status_code == 201, r.text
    # integral floats are integers (as in JSON Schema)
    doc = {"dtype": "int64", "data": [1.0, 2], "shape": [2.0]}
    r = client.put("/v1/tensors/rf-int-float", content=json.dumps(doc), headers={"Content-Type": JSON})
    assert r.status_code == 201, r.text
    assert client.get("/v1/tensors/rf-int-float", headers={"Accept": JSON}).json()["data"] == [1, 2]


@pytest.mark.parametrize("tag", ['"1', '1"', '"', 'W/"1', '""1"'])
def test_if_match_with_unbalanced_quotes_is_400(client, tag):
    client.put("/v1/tensors/rf-tag", content=b"\0" * 8, headers=F32)
    before = _listing(client)
    r = client.put("/v1/tensors/rf-tag", content=b"\0" * 8, headers={**F32, "If-Match": tag})
    _refused(r, 400)
    assert _listing(client) == before
    r = client.put("/v1/tensors/rf-tag", content=b"\0" * 8, headers={**F32, "If-Match": f'"{before["rf-tag"]}"'})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("keys", [["../x"], ["../x", "rf-good"], ["x/../y"], ["rf-ck/../y", "rf-ck"]])
def test_checkpoint_entries_that_nothing_would_restore_are_400(client, keys):
    before = _listing(client)
    body = save({k: np.zeros(2, np.float32) for k in keys})
    r = client.put("/v1/checkpoint", content=body, headers={"Content-Type": "application/x-safetensors"})
    _refused(r, 400)
    assert _listing(client) == before


def test_membership_changes_of_a_shard_that_does_not_exist_are_404_not_a_redirect(client):
    r = client.delete("/v1/cluster/members/x", params={"shards": "99"}, follow_redirects=False)
    assert r.status_code == 404 and r.json()["error"] == "not_found", r.text
    r = client.post(
        "/v1/cluster/members",
        follow_redirects=False,
        json={"id": "x", "http": "127.0.0.1:1", "raft": "127.0.0.1:2", "data": "127.0.0.1:3", "shards": [2]},
    )
    assert r.status_code == 404 and r.json()["error"] == "not_found", r.text


@pytest.mark.parametrize("shards", [[True], [0.5], "1e400", [1e300], {"0": 1}])
def test_shards_of_a_membership_change_must_be_integers(client, shards):
    body = {"id": "x", "http": "127.0.0.1:1", "raft": "127.0.0.1:2", "data": "127.0.0.1:3", "shards": shards}
    content = json.dumps(body).replace("1e+300", "1e400")
    r = client.post("/v1/cluster/members", content=content, headers={"Content-Type": JSON}, follow_redirects=False)
    _refused(r, 400)
