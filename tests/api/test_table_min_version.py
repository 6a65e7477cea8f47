"""`min_version` lookups of a table on one real replica (two shards): the
wait per shard part, both spellings of the versions, and the 4xx answers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save
from starlette.testclient import TestClient

from paramstore._tables import min_version_param
from tests.helpers.apps import single_node_app
from tests.waiting import wait_until

ST = "application/x-safetensors"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    app = single_node_app(tmp_path_factory.mktemp("tables_min_version"))
    with TestClient(app) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, 15, "single replica ready")
        assert c.put("/v1/tables/mv", json={"dim": 2, "optimizer": {"type": "sgd", "lr": 1.0}}).status_code == 201
        yield c


def push(client: TestClient, ids: list[int]) -> dict[str, Any]:
    body = save({"ids": np.array(ids, np.int64), "grads": np.ones((len(ids), 2), np.float32)})
    r = client.post("/v1/tables/mv:push", content=body, headers={"Content-Type": ST})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def lookup(client: TestClient, ids: list[int], **params: Any) -> Any:
    return client.post("/v1/tables/mv:lookup", params=params, json={"ids": ids}, headers={"Accept": "application/json"})


def versions(client: TestClient) -> list[int]:
    shards = client.get("/v1/tables/mv").json()["shards"]
    return [shards[str(s)]["version"] for s in range(2)]


def test_versions_reached_answer_at_once_in_both_spellings(client: TestClient) -> None:
    answer = push(client, list(range(10)))  # both shards
    now = versions(client)
    assert all(now)
    for spelling in (min_version_param(answer), min_version_param(now), ",".join(map(str, now)), "0"):
        r = lookup(client, [1], min_version=spelling, timeout=5)
        assert r.status_code == 200, (spelling, r.text)


def test_a_version_not_reached_waits_then_expires(client: TestClient) -> None:
    ahead = versions(client)
    ahead[1] += 5
    r = lookup(client, [1], min_version=f"1:{ahead[1]}", timeout=0.3)
    assert r.status_code == 408 and r.json()["error"], r.text
    r = lookup(client, [1], min_version=",".join(map(str, ahead)), timeout=0.3)
    assert r.status_code == 408, r.text


def test_a_waiting_lookup_returns_the_push_it_waited_for(client: TestClient) -> None:
    ids = list(range(20, 60))
    before = lookup(client, ids).json()["rows"]
    now = versions(client)
    want = {s: v + 1 for s, v in enumerate(now)}  # the next push touches both parts
    got: list[Any] = []
    waiter = threading.Thread(
        target=lambda: got.append(lookup(client, ids, min_version=min_version_param(want), timeout=10))
    )
    waiter.start()
    assert not got, "answered before the version it waits for existed"
    push(client, ids)
    waiter.join(15)
    assert got and got[0].status_code == 200, got
    assert np.allclose(np.array(got[0].json()["rows"]), np.array(before) - 1.0)


@pytest.mark.parametrize(
    ("value", "status"),
    [("1,2,3", 422), ("x", 422), ("-1", 422), ("2:5", 422), ("0:1,", 422), ("1:99999999999999999999", 422)],
)
def test_bad_min_version_is_422(client: TestClient, value: str, status: int) -> None:
    r = lookup(client, [1], min_version=value, timeout=0.2)
    assert r.status_code == status, (value, r.text)
    assert r.json()["error"] and r.json()["detail"]


def test_min_version_of_an_absent_table_is_404(client: TestClient) -> None:
    r = client.post("/v1/tables/nosuch:lookup", params={"min_version": "0:1", "timeout": 5}, json={"ids": [1]})
    assert r.status_code == 404, r.text
