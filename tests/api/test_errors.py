"""The HTTP contract's error table, row by row: status, JSON body, and no
change to stored data."""

import io
import json
import re

import numpy as np
import pytest
from starlette.testclient import TestClient

from tests.helpers.apps import single_node_app

RAW = "application/octet-stream"


def raw_put(client, name, arr, **headers):
    hdrs = {"Content-Type": RAW, "X-Dtype": str(arr.dtype), "X-Shape": ",".join(map(str, arr.shape))}
    hdrs.update({k.replace("_", "-"): v for k, v in headers.items()})
    return client.put(f"/v1/tensors/{name}", content=arr.tobytes(), headers=hdrs)


def assert_error(r, status, code):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["error"] == code and body["detail"], body


@pytest.fixture
def stored(client):
    """A tensor whose value and version must survive every bad request."""
    name = f"keep{np.random.randint(1 << 30)}"
    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert raw_put(client, name, value).status_code == 201
    yield name
    r = client.get(f"/v1/tensors/{name}")
    assert r.status_code == 200 and r.headers["X-Version"] == "1"
    assert np.frombuffer(r.content, np.float32).tolist() == value.ravel().tolist()


def test_create_read_head_replace_delete(client):
    v = np.arange(4, dtype=np.float32)
    r = raw_put(client, "ok", v)
    assert r.status_code == 201 and r.json() == {"name": "ok", "version": 1, "shard": r.json()["shard"]}
    r = client.get("/v1/tensors/ok")
    assert r.headers["X-Dtype"] == "float32" and r.headers["X-Shape"] == "4"
    assert r.headers["ETag"] == '"1"' and np.frombuffer(r.content, np.float32).tolist() == [0, 1, 2, 3]
    h = client.head("/v1/tensors/ok")
    assert h.status_code == 200 and h.headers["X-Version"] == "1" and h.content == b""
    assert client.get("/v1/tensors/ok", headers={"If-None-Match": '"1"'}).status_code == 304
    r = client.get("/v1/tensors/ok", headers={"Accept": "application/x-npy"})
    assert np.load(io.BytesIO(r.content), allow_pickle=False).tolist() == [0, 1, 2, 3]
    r = client.get("/v1/tensors/ok", headers={"Accept": "application/json"})
    assert r.json()["data"] == [0, 1, 2, 3]
    assert raw_put(client, "ok", v + 1, If_Match='"1"').status_code == 200
    buf = io.BytesIO()
    np.save(buf, (v * 2).astype(">f4"))  # big-endian npy is converted
    r = client.put("/v1/tensors/ok", content=buf.getvalue(), headers={"Content-Type": "application/x-npy"})
    assert r.status_code == 200 and r.json()["version"] == 3
    assert client.get("/v1/tensors/ok", headers={"Accept": "application/json"}).json()["data"] == [0, 2, 4, 6]
    assert any(t["name"] == "ok" for t in client.get("/v1/tensors").json())
    assert client.delete("/v1/tensors/ok", headers={"If-Match": '"3"'}).json()["deleted"] is True
    assert_error(client.get("/v1/tensors/ok"), 404, "not_found")


def test_json_body_and_grad(client):
    r = client.put(
        "/v1/tensors/j",
        json={"dtype": "float32", "shape": [2], "data": [1, 2]},
        headers={"X-Optimizer": '{"type": "sgd", "lr": 1.0}'},
    )
    assert r.status_code == 201
    r = client.post(
        "/v1/tensors/j/grad", content=np.ones(2, np.float32).tobytes(), headers={"Content-Type": RAW}
    )  # dtype and shape default to the tensor's
    assert r.status_code == 200 and r.json()["version"] == 2
    assert client.get("/v1/tensors/j", headers={"Accept": "application/json"}).json()["data"] == [0, 1]


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Dtype": "float32"},  # missing X-Shape
        {"X-Shape": "2,3"},  # missing X-Dtype
        {"X-Dtype": "float32", "X-Shape": "2,x"},  # malformed shape
        {"X-Dtype": "float32", "X-Shape": "2,3", "If-Match": "abc"},
        {"X-Dtype": "float32", "X-Shape": "2,3", "If-None-Match": '"3"'},
        {"X-Dtype": "float32", "X-Shape": "2,3", "X-Optimizer": "{not json"},
        {"X-Dtype": "float32", "X-Shape": "2,3", "X-Request-Id": "bad id with spaces"},
    ],
)
def test_400_malformed_headers(client, stored, headers):
    r = client.put(f"/v1/tensors/{stored}", content=b"\0" * 24, headers={"Content-Type": RAW, **headers})
    assert_error(r, 400, "invalid_request")


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Dtype": "float32", "X-Shape": "2," + "9" * 10_000},
        {"X-Dtype": "x" * 10_000, "X-Shape": "2,3"},
        {"X-Dtype": "float32", "X-Shape": "2,3", "X-Optimizer": "{" + '"a":' * 3_000},
    ],
    ids=["shape", "dtype", "optimizer"],
)
def test_an_error_does_not_echo_kilobytes_of_input(client, stored, headers, caplog):
    r = client.put(f"/v1/tensors/{stored}", content=b"\0" * 24, headers={"Content-Type": RAW, **headers})
    assert 400 <= r.status_code < 500, r.text[:500]
    assert len(r.json()["detail"]) <= 450, len(r.json()["detail"])
    assert all(len(rec.getMessage()) < 1000 for rec in caplog.records)


@pytest.mark.parametrize("name", ["..", ".hidden", "a b", "x%01y", "a%2Fb", "-x", "a" * 300])
def test_400_bad_tensor_names(client, name):
    r = client.put(
        f"/v1/tensors/{name}", content=b"\0" * 4, headers={"Content-Type": RAW, "X-Dtype": "float32", "X-Shape": "1"}
    )
    assert r.status_code in (400, 404), r.status_code  # a path the router cannot match is a 404
    assert r.json()["error"] in ("invalid_request", "not_found")


def test_400_bad_query(client, stored):
    assert_error(client.get(f"/v1/tensors/{stored}?consistency=eventual"), 400, "invalid_request")
    assert_error(client.get(f"/v1/tensors/{stored}?min_version=-1"), 400, "invalid_request")


def test_404_unknown_tensor(client):
    assert_error(client.get("/v1/tensors/nope"), 404, "not_found")
    assert_error(
        client.post(
            "/v1/tensors/nope/grad",
            content=b"\0" * 4,
            headers={"Content-Type": RAW, "X-Dtype": "float32", "X-Shape": "1"},
        ),
        404,
        "not_found",
    )
    assert_error(client.delete("/v1/tensors/nope"), 404, "not_found")


def test_409_stale_push(client):
    assert raw_put(client, "stale", np.zeros(1, np.float32), X_Max_Staleness="0").status_code == 201
    ok = client.post(
        "/v1/tensors/stale/grad",
        content=np.ones(1, np.float32).tobytes(),
        headers={"Content-Type": RAW, "X-Base-Version": "1"},
    )
    assert ok.status_code == 200
    r = client.post(
        "/v1/tensors/stale/grad",
        content=np.ones(1, np.float32).tobytes(),
        headers={"Content-Type": RAW, "X-Base-Version": "1"},
    )
    assert_error(r, 409, "conflict")
    assert r.json()["current_version"] == 2


def test_412_preconditions(client, stored):
    r = raw_put(client, stored, np.zeros((2, 3), np.float32), If_None_Match="*")
    assert_error(r, 412, "precondition_failed")
    assert r.json()["current_version"] == 1
    r = raw_put(client, stored, np.zeros((2, 3), np.float32), If_Match='"7"')
    assert_error(r, 412, "precondition_failed")
    assert_error(client.delete(f"/v1/tensors/{stored}", headers={"If-Match": '"9"'}), 412, "precondition_failed")


def test_413_body_over_limit(client, stored):
    big = np.zeros((1 << 20) // 4 + 1, np.float32)
    assert_error(raw_put(client, stored, big), 413, "payload_too_large")

    def chunks():
        for _ in range(40):
            yield b"\0" * 65536

    r = client.put(
        f"/v1/tensors/{stored}",
        content=chunks(),
        headers={"Content-Type": RAW, "X-Dtype": "float32", "X-Shape": str(40 * 16384)},
    )
    assert_error(r, 413, "payload_too_large")


def test_415_unsupported_content_type(client, stored):
    r = client.put(f"/v1/tensors/{stored}", content=b"abc", headers={"Content-Type": "text/csv"})
    assert_error(r, 415, "unsupported_media_type")


def test_406_unacceptable(client, stored):
    assert_error(client.get(f"/v1/tensors/{stored}", headers={"Accept": "text/html"}), 406, "not_acceptable")


@pytest.mark.parametrize(
    "headers, body",
    [
        ({"X-Dtype": "complex64", "X-Shape": "2,3"}, b"\0" * 48),  # unsupported dtype
        ({"X-Dtype": "float32", "X-Shape": "2,3"}, b"\0" * 20),  # size mismatch
        ({"X-Dtype": "float32", "X-Shape": "3,2"}, b"\0" * 24),  # shape change on replace
        ({"X-Dtype": "int32", "X-Shape": "2,3"}, b"\0" * 24),  # dtype change on replace
        ({"X-Dtype": "float32", "X-Shape": "2,3"}, np.full(6, np.nan, np.float32).tobytes()),
        ({"X-Dtype": "float32", "X-Shape": "100000,100000,100000"}, b"\0" * 24),  # no allocation first
        ({"X-Dtype": "float32", "X-Shape": "2,3", "X-Optimizer": '{"type":"sgd","lr":0.1,"bogus":1}'}, b"\0" * 24),
        ({"X-Dtype": "float32", "X-Shape": "2,3", "X-Optimizer": '{"type":"sgd","lr":-1}'}, b"\0" * 24),
    ],
)
def test_422_unprocessable(client, stored, headers, body):
    r = client.put(f"/v1/tensors/{stored}", content=body, headers={"Content-Type": RAW, **headers})
    assert_error(r, 422, "unprocessable")


def test_422_nonfinite_gradient_and_npy_object(client, stored):
    r = client.post(
        f"/v1/tensors/{stored}/grad",
        content=np.full((2, 3), np.inf, np.float32).tobytes(),
        headers={"Content-Type": RAW},
    )
    assert_error(r, 422, "unprocessable")
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    r = client.put(f"/v1/tensors/{stored}", content=buf.getvalue(), headers={"Content-Type": "application/x-npy"})
    assert r.status_code in (400, 422)


def test_400_truncated_npy(client, stored):
    r = client.put(
        f"/v1/tensors/{stored}", content=b"\x93NUMPY\x01\x00garbage", headers={"Content-Type": "application/x-npy"}
    )
    assert_error(r, 400, "invalid_request")


def test_503_without_a_leader(tmp_path):
    """A replica whose only peer never starts has no quorum: 503 + Retry-After."""
    app = single_node_app(tmp_path, nodes=2, limits={"request_timeout": 1.0})
    with TestClient(app) as c:
        assert_error(c.get("/readyz"), 503, "unavailable")
        r = raw_put(c, "w", np.zeros(2, np.float32))
        assert r.status_code == 503, r.text
        assert r.headers["Retry-After"] and r.json()["error"] in ("timeout", "unavailable")
        r = c.get("/v1/tensors/w?consistency=linearizable&timeout=0.5")
        assert r.status_code == 503
        r = c.get("/v1/tensors/w?min_version=1&timeout=0.2")
        assert r.status_code == 503


def test_long_poll_and_min_version(client):
    raw_put(client, "lp", np.zeros(1, np.float32))
    r = client.get("/v1/tensors/lp?wait_version_gt=1&timeout=0.2")
    assert r.status_code == 304 and r.headers["X-Version"] == "1"
    # A version already newer than asked answers at once, even with no time to wait.
    r = client.get("/v1/tensors/lp?wait_version_gt=0&timeout=0")
    assert r.status_code == 200 and r.headers["X-Version"] == "1"
    r = client.get("/v1/tensors/lp?min_version=1")
    assert r.status_code == 200
    r = client.get("/v1/tensors/lp?consistency=linearizable")
    assert r.status_code == 200 and r.headers["X-Version"] == "1"


def test_health_cluster(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    status = client.get("/v1/cluster").json()
    assert status["node"] == "n0" and len(status["shards"]) == 2
    assert all(s["leader"] == "n0" and s["role"] == "leader" for s in status["shards"])


def test_json_scalar_keeps_its_shape(client):
    r = client.put("/v1/tensors/scalar", json={"dtype": "float32", "shape": [], "data": 2.5})
    assert r.status_code == 201
    r = client.get("/v1/tensors/scalar")
    assert r.headers["X-Shape"] == "" and np.frombuffer(r.content, np.float32).tolist() == [2.5]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[1]",
        b"{bad",
        b'{"id": "n9"}',
        b'{"id": "n9", "http": "h:1", "raft": "h:2", "data": "h:x"}',
        b'{"id": "n9", "http": "h:1", "raft": "h:2", "data": "h:3", "shards": "a"}',
    ],
)
def test_bad_member_additions_are_400_and_change_nothing(client, body):
    before = client.get("/v1/cluster").json()
    r = client.post("/v1/cluster/members", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_request" and r.json()["detail"]
    after = client.get("/v1/cluster").json()
    assert [s["replicas"] for s in after["shards"]] == [s["replicas"] for s in before["shards"]]


def test_removing_a_shards_last_member_is_refused(client):
    r = client.delete("/v1/cluster/members/n0")
    assert r.status_code == 409, r.text
    assert "last member" in r.json()["detail"]
    r = client.delete("/v1/cluster/members/nobody")
    assert r.status_code == 200 and {s["status"] for s in r.json()["shards"]} == {"not a member"}


def _quoted_input(detail: str, before: str, after: str) -> str:
    """The input a detail quotes between our words `before` and `after`
    (which must be whole), without the cut marker."""
    assert detail.startswith(before) and detail.endswith(after), detail
    middle = detail[len(before) : len(detail) - len(after)]
    cut = re.fullmatch(r"(.*)\.\.\. \((\d+) bytes\)", middle, re.S)
    assert cut is not None and int(cut.group(2)) > 10_000, middle[-80:]  # the 10 KB were cut
    return cut.group(1)


@pytest.mark.parametrize(
    "send, before, after",
    [
        (
            lambda c, n: c.post(
                f"/v1/tensors/{n}/grad",
                content=b"\0" * 24,
                headers={"Content-Type": RAW, "X-Base-Version": "7" * 5_000 + "x" * 5_000},
            ),
            f"X-Base-Version: expected an integer in [0, {2**63 - 1}], got ",
            "",
        ),
        (  # 10 KB of UTF-8 on the wire: 200 bytes is ~100 characters of it
            lambda c, n: raw_put(c, n, np.zeros((2, 3), np.float32), X_Staleness_Policy=b"\xc3\xa9" * 5_000),
            "X-Staleness-Policy: ",
            " is not one of reject, scale",
        ),
        (
            lambda c, n: raw_put(c, n, np.zeros((2, 3), np.float32), X_Optimizer=json.dumps({"type": "é" * 5_000})),
            "optimizer.type: ",
            " is not one of ",
        ),
        (
            lambda c, n: c.put(f"/v1/tensors/{n}", json={"dtype": "x" * 10_000, "shape": [2, 3], "data": [0] * 6}),
            "dtype ",
            " is not supported (supported: ",
        ),
    ],
    ids=["header", "utf8-header", "json-in-header", "json-body"],
)
def test_an_error_quotes_at_most_200_bytes_of_its_input_and_all_of_its_words(client, stored, send, before, after):
    r = send(client, stored)
    assert 400 <= r.status_code < 500, r.text[:300]
    detail = r.json()["detail"]
    if after == " is not one of ":  # the list of optimizers follows: keep the check independent of it
        after = detail[detail.index(after) :]
        assert after.endswith("adagrad") or "sgd" in after, detail[-200:]
    if after == " is not supported (supported: ":
        after = detail[detail.index(after) :]
        assert after.endswith(")") and "float32" in after, detail[-200:]
    quoted = _quoted_input(detail, before, after)
    assert len(quoted.encode()) <= 200, len(quoted.encode())


def test_tensor_list_pages(client):
    for name in ("pg.a", "pg.b", "pg.c"):
        raw_put(client, name, np.zeros(1, np.float32))
    names = [d["name"] for d in client.get("/v1/tensors?after=pg.&limit=2").json()]
    assert names == ["pg.a", "pg.b"]
    rest = [d["name"] for d in client.get("/v1/tensors", params={"after": names[-1]}).json()]
    assert rest[0] == "pg.c" and all(n > "pg.b" for n in rest)
    assert_error(client.get("/v1/tensors?limit=0"), 400, "invalid_request")
