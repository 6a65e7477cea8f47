"""Table configuration and ID validation: every bad value is a 422 naming its field."""

from __future__ import annotations

import numpy as np
import pytest

from store.errors import Unprocessable
from store.tables.ids import ids_from_json, table_keys
from store.tables.spec import check_name, parse_spec


def test_defaults_and_round_trip() -> None:
    spec = parse_spec({"dim": 8})
    assert (spec.dtype, spec.id_dtype, spec.initializer.type, spec.optimizer.type) == (
        "float32",
        "int64",
        "zeros",
        "sgd",
    )
    full = parse_spec(
        {
            "dim": 16,
            "dtype": "bfloat16",
            "id_dtype": "uint64",
            "initializer": {"type": "normal", "std": 0.02, "seed": 7},
            "optimizer": {"type": "ftrl", "lr": 0.1, "l1": 0.5, "lr_power": -0.25},
            "admission": {"min_count": 3, "width": 1024, "depth": 2},
            "eviction": {"ttl_versions": 100},
            "max_staleness": 4,
        }
    )
    assert parse_spec(full.to_json()) == full
    assert full.to_json()["optimizer"]["lr_power"] == -0.25


BAD = [
    ("dim", {"dim": 0}),
    ("dim", {"dim": "8"}),
    ("dim", {}),
    ("dtype", {"dim": 4, "dtype": "int8"}),
    ("id_dtype", {"dim": 4, "id_dtype": "int32"}),
    ("initializer.type", {"dim": 4, "initializer": {"type": "xavier"}}),
    ("initializer.std", {"dim": 4, "initializer": {"type": "normal", "std": -1}}),
    ("initializer.bound", {"dim": 4, "initializer": {"type": "uniform", "bound": float("nan")}}),
    ("initializer (zeros)", {"dim": 4, "initializer": {"type": "zeros", "std": 1}}),
    ("initializer.seed", {"dim": 4, "initializer": {"type": "zeros", "seed": -1}}),
    ("optimizer.type", {"dim": 4, "optimizer": {"type": "adamax"}}),
    ("optimizer.type", {"dim": 4, "optimizer": {"type": [None]}}),
    ("initializer.type", {"dim": 4, "initializer": {"type": {"a": 1}}}),
    ("optimizer.lr", {"dim": 4, "optimizer": {"type": "sgd", "lr": 0}}),
    ("optimizer.lr", {"dim": 4, "optimizer": {"type": "sgd", "lr": True}}),
    ("optimizer (sgd)", {"dim": 4, "optimizer": {"type": "sgd", "momentum": 0.9}}),
    ("optimizer.eps", {"dim": 4, "optimizer": {"type": "adagrad", "eps": 0}}),
    ("optimizer.betas", {"dim": 4, "optimizer": {"type": "sparse_adam", "betas": [0.9, 1.0]}}),
    ("optimizer.lr_power", {"dim": 4, "optimizer": {"type": "ftrl", "lr_power": 0.5}}),
    ("optimizer.l1", {"dim": 4, "optimizer": {"type": "ftrl", "l1": -0.1}}),
    ("admission.min_count", {"dim": 4, "admission": {"min_count": 0}}),
    ("admission.width", {"dim": 4, "admission": {"min_count": 2, "width": 1 << 30}}),
    ("admission", {"dim": 4, "admission": {"min_count": 2, "decay": 0.5}}),
    ("eviction", {"dim": 4, "eviction": {}}),
    ("eviction.max_rows", {"dim": 4, "eviction": {"max_rows": 0}}),
    ("table config", {"dim": 4, "shape": [4]}),
    ("table config", [4]),
]


@pytest.mark.parametrize("field,raw", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_config_names_the_field(field: str, raw: object) -> None:
    with pytest.raises(Unprocessable) as e:
        parse_spec(raw)
    assert e.value.detail.startswith(field), e.value.detail


def test_names() -> None:
    assert check_name("user_ids.v2-a") == "user_ids.v2-a"
    for bad in ("", "a/b", "a b", "x" * 201, "é"):
        with pytest.raises(Unprocessable):
            check_name(bad)


def test_keys_keep_the_bits_of_int64_ids() -> None:
    keys = table_keys(np.array([-1, 0, 2**63 - 1]), "int64")
    assert keys.dtype == np.uint64 and keys.tolist() == [2**64 - 1, 0, 2**63 - 1]
    assert table_keys(np.array([2**64 - 1], dtype=np.uint64), "uint64").tolist() == [2**64 - 1]
    assert table_keys(np.array([5], dtype=np.int32), "uint64").tolist() == [5]


def test_ids_from_json() -> None:
    assert ids_from_json([1, -2]).dtype == np.int64
    assert ids_from_json([1, 2**64 - 1]).dtype == np.uint64
    for bad in ([1.5], ["1"], [True], [2**64], [-(2**63) - 1], [-1, 2**63], {"a": 1}):
        with pytest.raises(Unprocessable):
            ids_from_json(bad)


PINNED_SHARDS = [0, 1, 0]


def test_ids_spread_over_shards_stably() -> None:
    from store.tables.ids import shard_of_keys, split_by_shard

    keys = np.arange(100_000, dtype=np.uint64)
    owner = shard_of_keys(keys, 3)
    counts = np.bincount(owner, minlength=3)
    assert counts.min() > 32_000  # about a third each
    # pinned: clients and replicas of every version must agree
    assert shard_of_keys(np.array([0, 1, 2**64 - 1], dtype=np.uint64), 3).tolist() == PINNED_SHARDS
    parts = split_by_shard(keys[:1000], 3)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(1000))
    for s, pos in parts.items():
        assert (owner[pos] == s).all() and (np.diff(pos) > 0).all()
