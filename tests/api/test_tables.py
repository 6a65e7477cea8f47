"""/v1/tables over HTTP on one real replica (two shards): create, look up,
push, describe, delete; and issue 12's bad-input list, row by row: a 4xx JSON
error and nothing changed."""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import save
from safetensors.torch import load as load_torch
from starlette.testclient import TestClient

from store.commands import Inline, TableFence, TablePush
from store.tables.ids import shard_of_keys
from tests.helpers.apps import single_node_app
from tests.waiting import wait_until

ST = "application/x-safetensors"
NPY = "application/x-npy"
MAX_IDS = 1000
_names = itertools.count()


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    app = single_node_app(tmp_path_factory.mktemp("tables"), limits={"table_max_ids": MAX_IDS})
    with TestClient(app) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, 15, "single replica ready")
        yield c


def create(client: TestClient, **config: Any) -> str:
    name = f"emb{next(_names)}"
    config.setdefault("dim", 4)
    r = client.put(f"/v1/tables/{name}", json=config)
    assert r.status_code == 201, r.text
    return name


def push_st(client: TestClient, name: str, ids: np.ndarray, grads: np.ndarray, **headers: str) -> Any:
    return client.post(
        f"/v1/tables/{name}:push", content=save({"ids": ids, "grads": grads}), headers={"Content-Type": ST, **headers}
    )


def lookup_json(client: TestClient, name: str, ids: list[int]) -> list[list[float]]:
    r = client.post(f"/v1/tables/{name}:lookup", json={"ids": ids}, headers={"Accept": "application/json"})
    assert r.status_code == 200, r.text
    return r.json()["rows"]


def assert_error(r: Any, status: int, code: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["error"] == code and body["detail"], body


def snapshot(client: TestClient, name: str) -> tuple[Any, Any]:
    """What must not change: the description and the rows of a few IDs."""
    info = client.get(f"/v1/tables/{name}").json()
    return (info["version"], info["rows"], info["shards"]), lookup_json(client, name, list(range(20)))


def test_create_push_lookup_describe_delete(client: TestClient) -> None:
    name = create(client, optimizer={"type": "sgd", "lr": 1.0}, initializer={"type": "uniform", "bound": 0.5})
    assert name in [t["name"] for t in client.get("/v1/tables").json()]
    start = lookup_json(client, name, [3, 2**40, -5])
    assert all(-0.5 <= v < 0.5 for row in start for v in row) and start[0] != start[1]
    ids = np.array([3, 2**40, -5, 3], dtype=np.int64)
    grads = np.ones((4, 4), np.float32)
    r = push_st(client, name, ids, grads)
    assert r.status_code == 200, r.text
    assert sum(part["rows"] for part in r.json()["shards"].values()) == 3
    after = lookup_json(client, name, [3, 2**40, -5])
    assert np.allclose(np.array(after), np.array(start) - np.array([[2.0] * 4, [1.0] * 4, [1.0] * 4]))
    info = client.get(f"/v1/tables/{name}").json()
    assert info["rows"] == 3 and info["config"]["optimizer"]["type"] == "sgd"
    assert_error(client.delete(f"/v1/tables/{name}", headers={"If-Match": '"99"'}), 412, "precondition_failed")
    r = client.delete(f"/v1/tables/{name}", headers={"If-Match": f'"{info["version"]}"'})
    assert r.status_code == 200, r.text
    assert_error(client.post(f"/v1/tables/{name}:lookup", json={"ids": [1]}), 404, "not_found")


def test_row_formats(client: TestClient) -> None:
    name = create(client, dtype="bfloat16", initializer={"type": "normal", "std": 1.0})
    ids = np.array([1, 2, 3], dtype=np.int64)
    as_json = np.array(lookup_json(client, name, [1, 2, 3]), dtype=np.float32)
    r = client.post(f"/v1/tables/{name}:lookup", content=save({"ids": ids}), headers={"Content-Type": ST})
    rows = load_torch(r.content)["rows"]
    assert r.headers["content-type"] == ST and rows.dtype == torch.bfloat16
    assert np.array_equal(rows.float().numpy(), as_json)
    buf = io.BytesIO()
    np.save(buf, ids)
    r = client.post(f"/v1/tables/{name}:lookup", content=buf.getvalue(), headers={"Content-Type": NPY, "Accept": NPY})
    assert np.array_equal(np.load(io.BytesIO(r.content), allow_pickle=False), as_json)
    r = client.post(
        f"/v1/tables/{name}:lookup?consistency=linearizable", json={"ids": [1]}, headers={"Accept": "application/json"}
    )
    assert r.status_code == 200 and r.json()["rows"][0] == as_json[0].tolist()


def test_uint64_ids(client: TestClient) -> None:
    name = create(client, id_dtype="uint64", optimizer={"type": "sgd", "lr": 1.0})
    ids = np.array([2**64 - 1, 0], dtype=np.uint64)
    assert push_st(client, name, ids, np.ones((2, 4), np.float32)).status_code == 200
    assert lookup_json(client, name, [2**64 - 1, 0, 1]) == [[-1.0] * 4, [-1.0] * 4, [0.0] * 4]


BAD_PUSHES = [
    ("float ids", lambda: save({"ids": np.array([1.0, 2.0]), "grads": np.ones((2, 4), np.float32)}), 422),
    ("row count", lambda: save({"ids": np.array([1, 2]), "grads": np.ones((3, 4), np.float32)}), 422),
    ("dim", lambda: save({"ids": np.array([1, 2]), "grads": np.ones((2, 5), np.float32)}), 422),
    (
        "nan",
        lambda: save({"ids": np.array([1, 2]), "grads": np.array([[1, 1, 1, 1], [np.nan, 0, 0, 0]], np.float32)}),
        422,
    ),
    (
        "inf",
        lambda: save({"ids": np.array([1, 2]), "grads": np.array([[1, 1, 1, 1], [np.inf, 0, 0, 0]], np.float32)}),
        422,
    ),
    ("empty", lambda: save({"ids": np.zeros(0, np.int64), "grads": np.zeros((0, 4), np.float32)}), 422),
    (
        "too many ids",
        lambda: save({"ids": np.arange(MAX_IDS + 1), "grads": np.ones((MAX_IDS + 1, 4), np.float32)}),
        413,
    ),
    ("not safetensors", lambda: b"garbage", 400),
    ("missing grads", lambda: save({"ids": np.array([1])}), 422),
]


@pytest.mark.parametrize("label,body,status", BAD_PUSHES, ids=[b[0] for b in BAD_PUSHES])
def test_bad_push_changes_nothing(client: TestClient, label: str, body: Any, status: int) -> None:
    name = create(client, optimizer={"type": "rowwise_adagrad"})
    assert push_st(client, name, np.arange(10), np.ones((10, 4), np.float32)).status_code == 200
    before = snapshot(client, name)
    r = client.post(f"/v1/tables/{name}:push", content=body(), headers={"Content-Type": ST})
    assert r.status_code == status, r.text
    assert r.json()["error"] and r.json()["detail"]
    assert snapshot(client, name) == before


def test_negative_ids_in_a_uint64_table(client: TestClient) -> None:
    name = create(client, id_dtype="uint64")
    push_st(client, name, np.array([1], dtype=np.uint64), np.ones((1, 4), np.float32))
    before = snapshot(client, name)
    assert_error(push_st(client, name, np.array([1, -1]), np.ones((2, 4), np.float32)), 422, "unprocessable")
    assert_error(client.post(f"/v1/tables/{name}:lookup", json={"ids": [-1]}), 422, "unprocessable")
    assert snapshot(client, name) == before


def test_a_push_is_all_or_nothing_across_shards(client: TestClient) -> None:
    """One NaN row: no shard's part changes, though the other rows are fine."""
    name = create(client, optimizer={"type": "sgd", "lr": 1.0})
    before = snapshot(client, name)
    grads = np.ones((20, 4), np.float32)
    grads[17, 2] = np.nan
    assert_error(push_st(client, name, np.arange(20), grads), 422, "unprocessable")
    assert snapshot(client, name) == before


@pytest.mark.parametrize(
    "config,status",
    [
        ({"dim": 4, "optimizer": {"type": "adamax"}}, 422),
        ({"dim": 4, "optimizer": {"type": "sgd", "lr": -1}}, 422),
        ({"dim": 4, "optimizer": {"type": "ftrl", "lr_power": 1.5}}, 422),
        ({"dim": 0}, 422),
        ({"dim": 4, "dtype": "int8"}, 422),
        ({"dim": 4, "eviction": {}}, 422),
        ([4], 422),
    ],
)
def test_bad_configs(client: TestClient, config: Any, status: int) -> None:
    name = f"bad{next(_names)}"
    assert_error(client.put(f"/v1/tables/{name}", json=config), status, "unprocessable")
    assert_error(client.get(f"/v1/tables/{name}"), 404, "not_found")


def test_names_clash_with_tensors_and_tables(client: TestClient) -> None:
    r = client.put(
        "/v1/tensors/shared",
        content=np.zeros(2, np.float32).tobytes(),
        headers={"Content-Type": "application/octet-stream", "X-Dtype": "float32", "X-Shape": "2"},
    )
    assert r.status_code == 201, r.text
    assert_error(client.put("/v1/tables/shared", json={"dim": 4}), 409, "already_exists")
    assert_error(client.get("/v1/tables/shared"), 404, "not_found")
    name = create(client)
    assert_error(client.put(f"/v1/tables/{name}", json={"dim": 4}), 409, "already_exists")
    r = client.put(
        f"/v1/tensors/{name}",
        content=np.zeros(2, np.float32).tobytes(),
        headers={"Content-Type": "application/octet-stream", "X-Dtype": "float32", "X-Shape": "2"},
    )
    assert_error(r, 409, "already_exists")


def test_absent_table(client: TestClient) -> None:
    assert_error(client.post("/v1/tables/nope:lookup", json={"ids": [1]}), 404, "not_found")
    assert_error(push_st(client, "nope", np.array([1]), np.ones((1, 4), np.float32)), 404, "not_found")
    assert_error(client.get("/v1/tables/nope"), 404, "not_found")
    assert_error(client.delete("/v1/tables/nope"), 404, "not_found")


def test_request_id_applies_once(client: TestClient) -> None:
    name = create(client, optimizer={"type": "sgd", "lr": 1.0})
    for _ in range(2):
        r = push_st(client, name, np.array([1, 2, 3]), np.ones((3, 4), np.float32), **{"X-Request-Id": "once"})
        assert r.status_code == 200, r.text
    assert lookup_json(client, name, [1]) == [[-1.0] * 4]


def test_a_read_token_may_look_up_but_not_push(tmp_path_factory: pytest.TempPathFactory) -> None:
    from api.app import create_app
    from store.config import config_from_mapping
    from tests.helpers.apps import raw_config

    raw = raw_config(
        tmp_path_factory.mktemp("tables-auth"), auth={"read_tokens": ["reader-tok"], "write_tokens": ["writer-tok"]}
    )
    reader, writer = {"Authorization": "Bearer reader-tok"}, {"Authorization": "Bearer writer-tok"}
    with TestClient(create_app(config_from_mapping(raw))) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, 15, "replica ready")
        assert_error(c.put("/v1/tables/t", json={"dim": 2}, headers=reader), 403, "forbidden")
        assert c.put("/v1/tables/t", json={"dim": 2}, headers=writer).status_code == 201
        body = save({"ids": np.array([1]), "grads": np.ones((1, 2), np.float32)})
        assert_error(
            c.post("/v1/tables/t:push", content=body, headers={"Content-Type": ST, **reader}), 403, "forbidden"
        )
        r = c.post("/v1/tables/t:lookup", json={"ids": [1]}, headers={"Accept": "application/json", **reader})
        assert r.status_code == 200 and r.json()["rows"] == [[0.0, 0.0]]
        assert_error(c.post("/v1/tables/t:lookup", json={"ids": [1]}), 401, "unauthorized")


def test_tables_in_metrics(client: TestClient) -> None:
    name = create(client, admission={"min_count": 2})
    push_st(client, name, np.array([1, 2, 2]), np.ones((3, 4), np.float32))
    lookup_json(client, name, [1, 2, 3])
    text = client.get("/metrics").text
    lines = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("paramstore_table") and f'table="{name}"' in line
    }
    key = f'{{node="n0",table="{name}"}}'
    assert lines[f"paramstore_table_rows{key}"] == 1  # ID 2 was pushed twice: admitted
    assert lines[f"paramstore_table_rows_refused_total{key}"] == 1
    assert lines[f"paramstore_table_lookup_rows_total{key}"] == 3
    assert lines[f"paramstore_table_push_rows_total{key}"] == 3
    assert lines[f"paramstore_table_disk_bytes{key}"] > 0
    assert 'paramstore_table_cache_bytes{kind="capacity",node="n0"}' in text
    # the push read IDs 1 and 2 (no rows yet: misses) and wrote row 2 through to the row cache;
    # the lookup then found 2 there and missed 1 and 3
    hit, miss = (f'{{node="n0",result="{r}",table="{name}"}}' for r in ("hit", "miss"))
    assert lines[f"paramstore_table_row_cache_reads_total{hit}"] == 1
    assert lines[f"paramstore_table_row_cache_reads_total{miss}"] == 4


def _on_shard(shard: int, shards: int = 2) -> int:
    keys = np.arange(1, 64, dtype=np.uint64)
    return int(keys[shard_of_keys(keys, shards) == shard][0])


def test_a_conditional_delete_that_races_a_push_deletes_nothing(client: TestClient, monkeypatch: Any) -> None:
    """A push commits on the last shard between the replica's version check and
    that shard's fence: the fences already set are released, the answer is 412
    with the new version, and the table keeps all its parts."""
    name = create(client, optimizer={"type": "sgd", "lr": 1.0})
    assert push_st(client, name, np.array([_on_shard(0), _on_shard(1)]), np.ones((2, 4), np.float32)).status_code == 200
    version = client.get(f"/v1/tables/{name}").json()["version"]
    host = client.app.state.store.tables.host  # type: ignore[attr-defined]
    submit = host.submit_to

    def push_first(shard: int, cmd: Any) -> Any:
        if isinstance(cmd, TableFence) and not cmd.release and shard == 1:
            ids = np.array([_on_shard(1)], "<i8")
            racing = TablePush(name=name, n=1, id_dtype="int64", ids=Inline(ids.tobytes()), grads=Inline(b"\0" * 16))
            submit(shard, racing).result(timeout=10)
        return submit(shard, cmd)

    monkeypatch.setattr(host, "submit_to", push_first)
    r = client.delete(f"/v1/tables/{name}", headers={"If-Match": f'"{version}"'})
    monkeypatch.undo()
    assert_error(r, 412, "precondition_failed")
    assert r.json()["current_version"] == version + 1
    # nothing deleted, and the released fences let pushes through on both shards
    r = push_st(client, name, np.array([_on_shard(0), _on_shard(1)]), np.ones((2, 4), np.float32))
    assert r.status_code == 200, r.text
    assert client.get(f"/v1/tables/{name}").json()["version"] == version + 3


def test_a_fence_left_by_a_stopped_delete_refuses_pushes_until_deleted(client: TestClient) -> None:
    name = create(client)
    host = client.app.state.store.tables.host  # type: ignore[attr-defined]
    host.submit_to(0, TableFence(name=name, version=0)).result(timeout=10)
    before = snapshot(client, name)
    r = push_st(client, name, np.array([_on_shard(0)]), np.ones((1, 4), np.float32))
    assert_error(r, 503, "unavailable")
    assert "being deleted" in r.json()["detail"] and snapshot(client, name) == before
    assert client.delete(f"/v1/tables/{name}").status_code == 200
    assert_error(client.post(f"/v1/tables/{name}:lookup", json={"ids": [1]}), 404, "not_found")
