"""Delta export over HTTP on one real replica (two shards):
GET /v1/tables/{name}/delta, `paramstore export --follow` and
paramstore.ServingTable rebuilding the table from its files."""

from __future__ import annotations

import io
import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load, save
from starlette.testclient import TestClient

from api import ops_cli
from paramstore import ServingTable
from paramstore._serving import export_metadata
from tests.helpers.apps import single_node_app
from tests.waiting import wait_until

ST = "application/x-safetensors"
_names = itertools.count()


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    app = single_node_app(tmp_path_factory.mktemp("delta"))
    with TestClient(app) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, 15, "single replica ready")
        yield c


def create(client: TestClient, **config: Any) -> str:
    name = f"exp{next(_names)}"
    config.setdefault("dim", 3)
    r = client.put(f"/v1/tables/{name}", json=config)
    assert r.status_code == 201, r.text
    return name


def push(client: TestClient, name: str, ids: Any, seed: int = 0) -> None:
    ids = np.asarray(ids, dtype=np.int64)
    dim = client.get(f"/v1/tables/{name}").json()["config"]["dim"]
    grads = np.random.default_rng(seed).normal(size=(len(ids), dim)).astype(np.float32)
    r = client.post(f"/v1/tables/{name}:push", content=save({"ids": ids, "grads": grads}), headers={"Content-Type": ST})
    assert r.status_code == 200, r.text


def export(client: TestClient, name: str, directory: Path) -> str:
    out = io.StringIO()
    argv = ["export", "--table", name, "--follow", str(directory), "--once", "--url", "", "--no-progress"]
    assert ops_cli.main(argv, http=client, out=out) == 0
    return out.getvalue()


def store_rows(client: TestClient, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Every stored row (IDs sorted) as the store has it now: a full export."""
    r = client.get(f"/v1/tables/{name}/delta", params={"since": "0"})
    assert r.status_code == 200, r.text
    got = load(r.content)
    order = np.argsort(got["ids"])
    return got["ids"][order], got["rows"][order]


def assert_same(table: ServingTable, client: TestClient, name: str) -> None:
    ids, rows = store_rows(client, name)
    assert table.ids().tobytes() == ids.tobytes()
    assert table.lookup(ids).tobytes() == rows.tobytes()
    looked_up = client.post(f"/v1/tables/{name}:lookup", json={"ids": ids.tolist()}, headers={"Accept": ST})
    assert load(looked_up.content)["rows"].tobytes() == rows.tobytes()


def test_base_plus_deltas_rebuild_the_table_with_updates_and_evictions(client: TestClient, tmp_path: Path) -> None:
    name = create(client, dim=4, eviction={"max_rows": 6}, optimizer={"type": "rowwise_adagrad", "lr": 0.1})
    push(client, name, range(8))
    printed = export(client, name, tmp_path)
    assert "base" in printed
    rng = np.random.default_rng(3)
    for i in range(6):
        push(client, name, rng.integers(0, 30, 7), seed=i)
        export(client, name, tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) >= 4 and all(f.endswith((".safetensors", ".done")) for f in files)
    assert [f[:-5] for f in files if f.endswith(".done")] == [f[:-12] for f in files if f.endswith(".safetensors")]
    table = ServingTable.load(tmp_path)
    assert_same(table, client, name)
    assert table.version == client.get(f"/v1/tables/{name}").json()["version"]
    info = client.get(f"/v1/tables/{name}").json()
    assert info["evicted"] > 0 and len(table) == info["rows"]
    assert not table.contains([10**12]).any()  # never exported: absent, not an initial value
    assert table.lookup([10**12], default=-1.0).tolist() == [[-1.0] * 4]


def test_a_delta_names_changed_rows_and_evicted_ids_and_its_cursor(client: TestClient) -> None:
    name = create(client, eviction={"max_rows": 1})
    push(client, name, [1, 2, 3, 4])  # max_rows is per shard part: one row stays in each
    r = client.get(f"/v1/tables/{name}/delta", params={"since": "0"})
    meta_full = r.headers["x-version"]
    assert len(meta_full.split(",")) == 2 and r.headers["x-table-version"] == "2"
    push(client, name, [5, 6, 7, 8, 9])
    r = client.get(f"/v1/tables/{name}/delta", params={"since": meta_full})
    assert r.status_code == 200
    got = load(r.content)
    assert len(got["ids"]) == 2 and set(got["removed"]) | set(got["ids"]) >= set(
        load(client.get(f"/v1/tables/{name}/delta", params={"since": "0"}).content)["ids"]
    )
    assert r.headers["x-version"] == "2,2" and r.headers["x-table-version"] == "4"
    again = client.get(f"/v1/tables/{name}/delta", params={"since": "2,2"})
    assert load(again.content)["ids"].size == 0 and again.headers["x-version"] == "2,2"


def test_a_long_poll_answers_when_a_push_lands_and_304_when_nothing_does(client: TestClient) -> None:
    name = create(client)
    push(client, name, [1, 2])
    cursor = client.get(f"/v1/tables/{name}/delta", params={"since": "0"}).headers["x-version"]
    started = time.monotonic()
    r = client.get(f"/v1/tables/{name}/delta", params={"since": cursor, "wait": 1, "timeout": 0.3})
    assert r.status_code == 304 and r.headers["x-version"] == cursor
    assert time.monotonic() - started >= 0.3
    answers: list[Any] = []
    poll = threading.Thread(
        target=lambda: answers.append(
            client.get(f"/v1/tables/{name}/delta", params={"since": cursor, "wait": 1, "timeout": 30})
        )
    )
    started = time.monotonic()
    poll.start()
    push(client, name, [77])
    poll.join(30)
    assert answers and answers[0].status_code == 200, answers
    assert time.monotonic() - started < 20  # the push ended the wait, not the timeout
    assert load(answers[0].content)["ids"].tolist() == [77]


def test_since_older_than_the_change_log_is_410_with_the_oldest_version(client: TestClient, tmp_path: Path) -> None:
    name = create(client, delta_versions=2)
    push(client, name, [1, 2, 3])
    cursor = client.get(f"/v1/tables/{name}/delta", params={"since": "0"}).headers["x-version"]
    export(client, name, tmp_path)
    for i in range(4):
        push(client, name, [1, 2, 3, 10 + i], seed=i)
    r = client.get(f"/v1/tables/{name}/delta", params={"since": cursor})
    assert r.status_code == 410, r.text
    body = r.json()
    assert body["error"] == "gone" and body["oldest_version"] == "3,3"
    assert client.get(f"/v1/tables/{name}/delta", params={"since": "3,3"}).status_code == 200
    # the exporter meets the same 410 and writes a fresh base instead of skipping changes
    assert "fresh base" in export(client, name, tmp_path)
    bases = [p for p in tmp_path.glob("*.safetensors") if export_metadata(p)["kind"] == "full"]
    assert len(bases) == 2
    assert_same(ServingTable.load(tmp_path), client, name)


@pytest.mark.parametrize("since", ["-1", "abc", "1.5", "", "1,x", "1,2,3", " 1", "99999999999999999999"])
def test_a_bad_since_is_422_and_changes_nothing(client: TestClient, since: str) -> None:
    name = create(client)
    push(client, name, [5])
    before = client.get(f"/v1/tables/{name}").json()
    r = client.get(f"/v1/tables/{name}/delta", params={"since": since})
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "unprocessable" and "since" in r.json()["detail"]
    assert client.get(f"/v1/tables/{name}").json() == before


def test_delta_of_an_unknown_table_is_404_and_since_is_required(client: TestClient) -> None:
    assert client.get("/v1/tables/nosuch/delta", params={"since": "0"}).status_code == 404
    assert client.get("/v1/tables/nosuch/delta", params={"since": "1,1"}).status_code == 404
    r = client.get(f"/v1/tables/{create(client)}/delta")
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"


def test_a_serving_table_refreshes_when_new_done_files_appear(client: TestClient, tmp_path: Path) -> None:
    name = create(client, dtype="bfloat16")
    push(client, name, [1, 2])
    export(client, name, tmp_path)
    table = ServingTable.load(tmp_path, refresh_every=0.05)
    try:
        before = table.lookup([1, 2, 3])
        assert table.contains([1, 2, 3]).tolist() == [True, True, False]
        push(client, name, [2, 3], seed=9)
        export(client, name, tmp_path)
        wait_until(lambda: bool(table.contains([3])[0]), 10, "the serving table picked up the new delta")
        after = table.lookup([1, 2, 3])
        assert after[0].tobytes() == before[0].tobytes() and after[1].tobytes() != before[1].tobytes()
        assert table.ids().tolist() == [1, 2, 3]
        r = client.post(f"/v1/tables/{name}:lookup", json={"ids": [1, 2, 3]}, headers={"Accept": "application/json"})
        assert after.dtype == np.float32  # bfloat16 rows are served as the float32 values they hold
        assert after.tobytes() == np.array(r.json()["rows"], dtype=np.float32).tobytes()
    finally:
        table.close()


def test_a_serving_table_needs_a_finished_base(tmp_path: Path) -> None:
    (tmp_path / "00000000000000000001.safetensors").write_bytes(b"partial")  # no .done marker yet
    with pytest.raises(FileNotFoundError):
        ServingTable.load(tmp_path)


def test_a_dense_tensor_is_exported_whole_at_each_new_version(client: TestClient, tmp_path: Path) -> None:
    name = f"dense{next(_names)}"
    first = np.arange(6, dtype=np.float32).reshape(2, 3)
    r = client.put(f"/v1/tensors/{name}", json={"dtype": "float32", "shape": [2, 3], "data": first.tolist()})
    assert r.status_code == 201, r.text
    argv = ["export", "--tensor", name, "--follow", str(tmp_path), "--once", "--url", "", "--no-progress"]
    assert ops_cli.main(argv, http=client, out=io.StringIO()) == 0
    assert ops_cli.main(argv, http=client, out=io.StringIO()) == 0  # nothing new: no file
    second = first * 2
    r = client.put(f"/v1/tensors/{name}", json={"dtype": "float32", "shape": [2, 3], "data": second.tolist()})
    assert r.status_code == 200, r.text
    assert ops_cli.main(argv, http=client, out=io.StringIO()) == 0
    files = sorted(tmp_path.glob("*.safetensors"))
    assert [f.name for f in files] == ["00000000000000000001.safetensors", "00000000000000000002.safetensors"]
    assert all(f.with_suffix(".done").exists() for f in files)
    assert load(files[0].read_bytes())[name].tobytes() == first.tobytes()
    assert load(files[1].read_bytes())[name].tobytes() == second.tobytes()
    assert export_metadata(files[1])["version"] == "2"
