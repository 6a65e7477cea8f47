"""Embedding tables in GET/PUT /v1/checkpoint: IDs, rows, optimizer state and
last-update versions of every table part, streamed out and restored; a
restored table then trains exactly like the original."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save
from starlette.testclient import TestClient

from tests.helpers.apps import single_node_app
from tests.waiting import wait_until

ST = "application/x-safetensors"
TABLES = {
    "ck_adam": {"dim": 4, "optimizer": {"type": "sparse_adam", "lr": 0.05}, "eviction": {"max_rows": 40}},
    "ck_bf16": {"dim": 3, "dtype": "bfloat16", "id_dtype": "uint64", "optimizer": {"type": "rowwise_adagrad"}},
    "ck_sgd": {"dim": 2, "initializer": {"type": "normal", "std": 0.1, "seed": 4}},
}


def app_client(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[TestClient]:
    with TestClient(single_node_app(tmp_path_factory.mktemp(name))) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, 15, "single replica ready")
        yield c


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    yield from app_client(tmp_path_factory, "ck_source")


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    yield from app_client(tmp_path_factory, "ck_target")


def push(client: TestClient, name: str, ids: np.ndarray, seed: int) -> None:
    dim = TABLES[name]["dim"]
    grads = np.random.default_rng(seed).normal(size=(len(ids), dim)).astype(np.float32)
    body = save({"ids": ids, "grads": grads})
    r = client.post(f"/v1/tables/{name}:push", content=body, headers={"Content-Type": ST})
    assert r.status_code == 200, r.text


def ids_for(name: str, rng: np.random.Generator) -> np.ndarray:
    ids = rng.integers(0, 60, 24)
    return ids.astype(np.uint64) * np.uint64(2**40) if name == "ck_bf16" else ids.astype(np.int64) - 30


def header(body: bytes) -> dict[str, Any]:
    n = int.from_bytes(body[:8], "little")
    return json.loads(body[8 : 8 + n])


def table_bytes(body: bytes) -> dict[str, bytes]:
    """Every table entry's bytes, by key."""
    head = header(body)
    start = 8 + int.from_bytes(body[:8], "little")
    return {
        k: body[start + v["data_offsets"][0] : start + v["data_offsets"][1]]
        for k, v in head.items()
        if k.startswith("@table/")
    }


@pytest.fixture(scope="module")
def saved(source: TestClient) -> bytes:
    rng = np.random.default_rng(1)
    for name, config in TABLES.items():
        assert source.put(f"/v1/tables/{name}", json=config).status_code == 201
        for step in range(6):
            push(source, name, ids_for(name, rng), seed=step)
    r = source.get("/v1/checkpoint")
    assert r.status_code == 200, r.text
    assert int(r.headers["content-length"]) == len(r.content)
    return r.content


def test_a_checkpoint_holds_every_table_part_with_its_state(source: TestClient, saved: bytes) -> None:
    meta = json.loads(header(saved)["__metadata__"]["paramstore"])
    assert sorted(meta["tables"]) == sorted(TABLES)
    for name in TABLES:
        info = source.get(f"/v1/tables/{name}").json()
        d = meta["tables"][name]
        assert d["config"] == info["config"]
        assert {s: p["version"] for s, p in d["parts"].items()} == {s: p["version"] for s, p in info["shards"].items()}
        assert sum(p["rows"] for p in d["parts"].values()) == info["rows"] > 0
        assert d["state"] == (name != "ck_sgd")  # sgd keeps no optimizer state
    entries = table_bytes(saved)
    assert "@table/ck_adam/0/state" in entries and "@table/ck_sgd/0/state" not in entries
    # the rows are the stored ones: compare with a lookup
    ids = np.frombuffer(entries["@table/ck_adam/1/ids"], dtype="<i8")
    rows = np.frombuffer(entries["@table/ck_adam/1/rows"], dtype="<f4").reshape(-1, 4)
    r = source.post("/v1/tables/ck_adam:lookup", json={"ids": ids.tolist()}, headers={"Accept": "application/json"})
    assert np.array(r.json()["rows"], dtype=np.float32).tobytes() == rows.tobytes()


def test_restoring_gives_the_same_tables_that_then_train_identically(
    source: TestClient, target: TestClient, saved: bytes
) -> None:
    r = target.put("/v1/checkpoint", content=saved, headers={"Content-Type": ST})
    assert r.status_code == 200, r.text
    report = r.json()
    assert sorted(report["tables_created"]) == sorted(TABLES) and not report["failed"]
    again = target.get("/v1/checkpoint").content
    assert table_bytes(again) == table_bytes(saved)  # ids, rows, optimizer state, versions: byte for byte
    got = json.loads(header(again)["__metadata__"]["paramstore"])["tables"]
    want = json.loads(header(saved)["__metadata__"]["paramstore"])["tables"]
    assert got == want  # configs, and each part's version, step and row count
    # the optimizer state (and SparseAdam's step count) is really back: the next push lands alike
    rng = np.random.default_rng(7)
    for name in TABLES:
        ids = ids_for(name, rng)
        for client in (source, target):
            push(client, name, ids, seed=99)
        lookups = [
            c.post(f"/v1/tables/{name}:lookup", json={"ids": ids.tolist()}, headers={"Accept": ST}).content
            for c in (source, target)
        ]
        assert lookups[0] == lookups[1], name


def test_mode_create_skips_existing_tables_and_replace_restores_them(target: TestClient, saved: bytes) -> None:
    r = target.put("/v1/checkpoint", content=saved, headers={"Content-Type": ST})
    assert r.status_code == 200, r.text
    assert sorted(d["name"] for d in r.json()["tables_skipped"]) == sorted(TABLES)
    r = target.put("/v1/checkpoint", params={"mode": "replace"}, content=saved, headers={"Content-Type": ST})
    assert r.status_code == 200, r.text
    assert sorted(r.json()["tables_replaced"]) == sorted(TABLES)
    assert table_bytes(target.get("/v1/checkpoint").content) == table_bytes(saved)


def test_a_table_entry_the_metadata_does_not_describe_is_refused(target: TestClient) -> None:
    body = save({"@table/x/0/ids": np.zeros(2, np.int64)})
    r = target.put("/v1/checkpoint", content=body, headers={"Content-Type": ST})
    assert r.status_code == 400 and "no table" in r.json()["detail"]
    assert "x" not in [t["name"] for t in target.get("/v1/tables").json()]
