"""TableState: lookups, pushes, admission, eviction, replay, snapshots, bad input."""

from __future__ import annotations

import io
import socket
import threading
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch

from store.errors import Conflict, CorruptData, Unprocessable
from store.tables import rowdtype
from store.tables.engine import MemoryBudget, receive_dir, send_dir
from store.tables.initial import initial_rows
from store.tables.spec import parse_spec
from store.tables.table import TableState


def make(tmp_path: Path, name: str = "t", **cfg: Any) -> TableState:
    cfg.setdefault("dim", 4)
    return TableState.create(tmp_path / name, "emb", parse_spec(cfg))


def ids(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


def grads(*rows: list[float]) -> np.ndarray:
    return np.array(rows, dtype=np.float32)


def test_lookup_returns_initial_rows_without_creating_any(tmp_path: Path) -> None:
    t = make(tmp_path, initializer={"type": "normal", "std": 0.1, "seed": 5})
    rows, version = t.lookup(ids(3, -7, 3, 2**62))
    expect = initial_rows(t.spec.initializer, ids(3, -7, 3, 2**62).view(np.uint64), 4)
    assert version == 0 and np.array_equal(rows, expect)
    assert t.rows_stored() == 0 and t.version == 0


def test_push_sums_duplicates_then_steps(tmp_path: Path) -> None:
    t = make(tmp_path, optimizer={"type": "sgd", "lr": 1.0})
    r = t.push(ids(5, 7, 5), grads([1, 1, 1, 1], [3, 3, 3, 3], [2, 0, 0, 0]))
    assert (r.version, r.rows, r.created) == (1, 2, 2)
    rows, version = t.lookup(ids(7, 5, 6))
    assert version == 1
    assert rows.tolist() == [[-3, -3, -3, -3], [-3, -1, -1, -1], [0, 0, 0, 0]]
    assert t.push(ids(5), grads([1, 1, 1, 1])).version == 2
    assert t.lookup(ids(5))[0].tolist() == [[-4, -2, -2, -2]]


def test_replayed_stamp_changes_nothing(tmp_path: Path) -> None:
    t = make(tmp_path, optimizer={"type": "adagrad", "lr": 0.1})
    t.push(ids(1, 2), grads([1, 2, 3, 4], [5, 6, 7, 8]), stamp=10)
    before = t.digest()
    r = t.push(ids(1, 2), grads([1, 2, 3, 4], [5, 6, 7, 8]), stamp=10)
    assert r.duplicate and r.version == 1
    assert t.push(ids(1), grads([1, 1, 1, 1]), stamp=9).duplicate
    assert t.digest() == before
    assert t.push(ids(1), grads([1, 1, 1, 1]), stamp=11).version == 2


BAD_PUSHES = [
    ("float ids", np.array([1.0, 2.0]), np.ones((2, 4), np.float32)),
    ("2-D ids", np.ones((2, 1), np.int64), np.ones((2, 4), np.float32)),
    ("row count", ids(1, 2), np.ones((3, 4), np.float32)),
    ("dim", ids(1, 2), np.ones((2, 5), np.float32)),
    ("nan", ids(1, 2), grads([1, 1, 1, 1], [np.nan, 0, 0, 0])),
    ("inf", ids(1, 2), grads([1, 1, 1, 1], [np.inf, 0, 0, 0])),
    ("empty", ids(), np.ones((0, 4), np.float32)),
    ("int grads", ids(1), np.ones((1, 4), np.int32)),
    ("id above int64", np.array([2**63], dtype=np.uint64), np.ones((1, 4), np.float32)),
]


@pytest.mark.parametrize("label,bad_ids,bad_grads", BAD_PUSHES, ids=[b[0] for b in BAD_PUSHES])
def test_bad_push_is_refused_and_changes_nothing(
    tmp_path: Path, label: str, bad_ids: np.ndarray, bad_grads: np.ndarray
) -> None:
    t = make(tmp_path, optimizer={"type": "sparse_adam"}, admission={"min_count": 2})
    t.push(ids(1, 3), grads([1, 1, 1, 1], [2, 2, 2, 2]))
    before = t.digest()
    with pytest.raises(Unprocessable):
        t.push(bad_ids, bad_grads)
    assert t.digest() == before and t.version == 1


def test_negative_ids_in_uint64_table(tmp_path: Path) -> None:
    t = make(tmp_path, id_dtype="uint64")
    with pytest.raises(Unprocessable, match="negative"):
        t.push(ids(1, -1), np.ones((2, 4), np.float32))
    with pytest.raises(Unprocessable, match="negative"):
        t.lookup(ids(-5))
    big = np.array([2**64 - 1], dtype=np.uint64)
    t.push(big, np.ones((1, 4), np.float32))
    assert t.rows_stored() == 1 and t.lookup(big)[0].shape == (1, 4)


def test_overflowing_update_is_refused(tmp_path: Path) -> None:
    t = make(tmp_path, dtype="float16", optimizer={"type": "sgd", "lr": 1.0})
    before = t.digest()
    with pytest.raises(Unprocessable, match="float16"):
        t.push(ids(1), grads([1e5, 0, 0, 0]))
    assert t.digest() == before


def test_state_survives_reopen_and_continues_identically(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pushes = [(rng.integers(0, 20, 16), rng.normal(0, 1, (16, 4)).astype(np.float32)) for _ in range(10)]
    cfg = {"optimizer": {"type": "sparse_adam", "lr": 0.01}, "initializer": {"type": "uniform", "bound": 0.1}}
    a = make(tmp_path, "a", **cfg)
    b = make(tmp_path, "b", **cfg)
    for i, (k, g) in enumerate(pushes):
        a.push(k, g, stamp=i + 1)
        b.push(k, g, stamp=i + 1)
        if i == 4:
            b.close()
            b = TableState.open(tmp_path / "b")
            assert b.version == 5 and b.meta.step == 5
    assert a.digest() == b.digest()
    assert np.array_equal(a.lookup(np.arange(20))[0], b.lookup(np.arange(20))[0])


def test_admission_counts_pushes_before_creating_a_row(tmp_path: Path) -> None:
    t = make(tmp_path, optimizer={"type": "sgd", "lr": 1.0}, admission={"min_count": 3, "width": 1024})
    for _ in range(2):
        r = t.push(ids(9), grads([1, 1, 1, 1]))
        assert (r.created, r.refused, r.rows) == (0, 1, 0)
        assert t.lookup(ids(9))[0].tolist() == [[0, 0, 0, 0]] and t.rows_stored() == 0
    t.close()
    t = TableState.open(tmp_path / "t")  # counters are persisted with the rows
    r = t.push(ids(9), grads([2, 2, 2, 2]))
    assert (r.created, r.refused, r.rows) == (1, 0, 1)
    assert t.lookup(ids(9))[0].tolist() == [[-2, -2, -2, -2]]  # earlier gradients were dropped
    assert t.meta.refused == 2 and t.meta.admitted == 1


def test_admission_counts_duplicates_in_one_push(tmp_path: Path) -> None:
    t = make(tmp_path, admission={"min_count": 3})
    r = t.push(ids(4, 4, 4, 5), np.ones((4, 4), np.float32))
    assert (r.created, r.refused) == (1, 1)


def test_admission_memory_is_bounded(tmp_path: Path) -> None:
    t = make(tmp_path, admission={"min_count": 100, "width": 4096, "depth": 3})
    for i in range(5):
        t.push(np.arange(i * 5000, (i + 1) * 5000), np.ones((5000, 4), np.float32))
    assert t.sketch is not None and t.sketch.nbytes == 4096 * 3 * 2
    assert t.rows_stored() == 0 and t.meta.refused == 25000


def test_ttl_eviction_by_versions(tmp_path: Path) -> None:
    t = make(tmp_path, optimizer={"type": "sgd", "lr": 1.0}, eviction={"ttl_versions": 2})
    one = grads([1, 1, 1, 1])
    t.push(ids(1), one)  # v1
    t.push(ids(2), one)  # v2
    assert t.push(ids(2), one).evicted == 0  # v3: row 1 is 2 versions old
    r = t.push(ids(2), one)  # v4: row 1 is 3 versions old
    assert r.evicted == 1 and t.rows_stored() == 1
    assert t.lookup(ids(1, 2))[0].tolist() == [[0, 0, 0, 0], [-3, -3, -3, -3]]
    assert t.meta.evicted == 1


def test_max_rows_evicts_least_recently_updated(tmp_path: Path) -> None:
    t = make(tmp_path, eviction={"max_rows": 3})
    one = np.ones((1, 4), np.float32)
    t.push(ids(3, 1, 2), np.ones((3, 4), np.float32))  # v1
    assert t.push(ids(4), one).evicted == 1  # v2: 1 is the oldest (v1, lowest ID)
    first = t.lookup(ids(1, 2, 3, 4))[0][:, 0]
    assert t.rows_stored() == 3 and first.tolist() == [0] + [np.float32(-0.01)] * 3
    t.push(ids(2), one)  # v3
    t.push(ids(5), one)  # v4: 3 (v1) goes
    assert t.lookup(ids(3))[0].tolist() == [[0, 0, 0, 0]]
    assert t.lookup(ids(2))[0][0, 0] == np.float32(-0.01) + np.float32(-0.01)


def random_commands(seed: int, n: int = 40) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = rng.integers(1, 64)
        out.append((rng.zipf(1.3, k) % 500, rng.normal(0, 1, (k, 8)).astype(np.float32)))
    return out


def test_replicas_with_different_clocks_and_memory_agree(tmp_path: Path) -> None:
    """Admission and eviction depend on the pushes only: two state machines fed
    the same pushes with wall clocks a day apart and different memory caps end
    with identical bytes."""
    cfg = {
        "dim": 8,
        "optimizer": {"type": "rowwise_adagrad", "lr": 0.1},
        "admission": {"min_count": 2, "width": 256, "depth": 2},
        "eviction": {"ttl_versions": 10, "max_rows": 40},
    }
    digests = []
    real_time, real_mono = time.time, time.monotonic
    for name, offset, cap in (("a", 0.0, 1 << 30), ("b", 86400.0, 64 << 10)):
        with (
            mock.patch("time.time", lambda offset=offset: real_time() + offset),
            mock.patch("time.monotonic", lambda offset=offset: real_mono() + offset),
        ):
            t = TableState.create(tmp_path / name, "emb", parse_spec(cfg), budget=MemoryBudget(cap))
            evicted = 0
            for i, (k, g) in enumerate(random_commands(7)):
                evicted += t.push(k, g, stamp=i + 1).evicted
            digests.append(t.digest())
            assert evicted > 0 and t.meta.refused > 0 and t.rows_stored() <= 40
    assert digests[0] == digests[1]


def test_staleness(tmp_path: Path) -> None:
    t = make(tmp_path, optimizer={"type": "sgd", "lr": 1.0}, max_staleness=1)
    for _ in range(3):
        t.push(ids(1), np.ones((1, 4), np.float32))
    with pytest.raises(Conflict):
        t.push(ids(1), np.ones((1, 4), np.float32), base_version=1)
    with pytest.raises(Conflict):
        t.push(ids(1), np.ones((1, 4), np.float32), base_version=4)
    assert t.push(ids(1), np.ones((1, 4), np.float32), base_version=2).version == 4
    s = make(tmp_path, "s", optimizer={"type": "sgd", "lr": 1.0}, staleness_policy="scale")
    s.push(ids(1), np.ones((1, 4), np.float32))
    s.push(ids(1), np.ones((1, 4), np.float32), base_version=0)  # one behind: lr halved
    assert s.lookup(ids(1))[0].tolist() == [[-1.5] * 4]


def test_checkpoint_streams_to_another_replica(tmp_path: Path) -> None:
    t = make(
        tmp_path,
        dim=8,
        optimizer={"type": "ftrl", "lr": 0.1, "l1": 0.01},
        admission={"min_count": 2},
        eviction={"max_rows": 100},
    )
    for i, (k, g) in enumerate(random_commands(3, 20)):
        t.push(k, g, stamp=i + 1)
    at_pin = t.digest()
    t.checkpoint(tmp_path / "pinned")
    for i, (k, g) in enumerate(random_commands(4, 5)):  # writes go on while the copy is sent
        t.push(k, g, stamp=100 + i)
    assert t.digest() != at_pin
    a, b = socket.socketpair()
    with a, b:
        sender = threading.Thread(target=lambda: send_dir(tmp_path / "pinned", a))
        sender.start()
        with b.makefile("rb") as stream:
            received = receive_dir(stream, tmp_path / "copy")
        sender.join()
    assert received > 0
    c = TableState.open(tmp_path / "copy")
    assert c.digest() == at_pin and c.version == 20 and c.meta.stamp == 20
    # optimizer state and admission counters came along: both continue identically
    for i, (k, g) in enumerate(random_commands(4, 5)):
        c.push(k, g, stamp=100 + i)
    assert c.digest() == t.digest()


def test_truncated_stream_is_refused(tmp_path: Path) -> None:
    t = make(tmp_path)
    t.push(ids(1), np.ones((1, 4), np.float32))
    t.checkpoint(tmp_path / "pinned")
    with open(tmp_path / "stream", "wb") as f:
        send_dir(tmp_path / "pinned", f)
    data = (tmp_path / "stream").read_bytes()
    with pytest.raises(CorruptData):
        receive_dir(io.BytesIO(data[:-20]), tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    assert receive_dir(io.BytesIO(data), tmp_path / "copy") > 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_rows_update_in_float32(tmp_path: Path, dtype: str) -> None:
    t = make(
        tmp_path, dtype=dtype, optimizer={"type": "adagrad", "lr": 0.1}, initializer={"type": "normal", "std": 1.0}
    )
    rng = np.random.default_rng(1)
    start = rowdtype.decode(t.lookup(np.arange(10))[0], dtype)
    ref_rows, acc = start.copy(), np.zeros_like(start)
    for _ in range(5):
        k = rng.integers(0, 10, 6)
        g = rng.normal(0, 1, (6, 4)).astype(np.float32)
        t.push(k, g)
        summed = np.zeros((10, 4), np.float32)
        np.add.at(summed, k, g)
        hit = np.unique(k)
        acc[hit] += summed[hit] * summed[hit]
        upd = ref_rows[hit].astype(np.float64) - np.float64(np.float32(0.1)) * (
            summed[hit] / (np.sqrt(acc[hit]) + np.float32(1e-10))
        ).astype(np.float64)
        ref_rows[hit] = rowdtype.decode(rowdtype.encode(upd.astype(np.float32), dtype), dtype)
    stored = t.lookup(np.arange(10))[0]
    assert stored.dtype == rowdtype.STORAGE[dtype]
    assert np.array_equal(rowdtype.decode(stored, dtype), ref_rows)


def test_bfloat16_rounding_matches_torch() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, 10000), rng.normal(0, 1e30, 100), [0.0, -0.0, 1e-40, 3.4e38]]).astype(
        np.float32
    )
    ours = rowdtype.encode(x, "bfloat16")
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)
    assert np.array_equal(rowdtype.decode(ours, "bfloat16"), torch.from_numpy(x).to(torch.bfloat16).float().numpy())


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def test_rows_read_stay_within_the_memory_cap(tmp_path: Path) -> None:
    cap = 8 << 20
    t = TableState.create(tmp_path / "big", "emb", parse_spec({"dim": 64}), budget=MemoryBudget(cap))
    n = 200_000  # ~54 MB of records: 6x the cap
    for s in range(0, n, 10_000):
        t.push(np.arange(s, s + 10_000), np.ones((10_000, 64), np.float32))
    t.store.db.flush()
    rng = np.random.default_rng(0)
    t.lookup(rng.integers(0, n, 2000))
    before = rss()
    for _ in range(100):
        t.lookup(rng.integers(0, n, 2000))
    assert t.store.db.property_int_value("rocksdb.block-cache-usage") <= cap
    grown = rss() - before
    assert grown <= cap + (16 << 20), f"RSS grew {grown / 2**20:.1f} MB reading a 54 MB table with an 8 MB cap"


def test_a_reopened_table_reads_through_the_shared_cache(tmp_path: Path) -> None:
    spec = parse_spec({"dim": 64})
    t = TableState.create(tmp_path / "t", "emb", spec, budget=MemoryBudget(8 << 20))
    t.push(np.arange(20_000), np.ones((20_000, 64), np.float32))
    t.store.db.flush()
    t.close()
    budget = MemoryBudget(8 << 20)
    t = TableState.open(tmp_path / "t", budget=budget)
    t.lookup(np.arange(0, 20_000, 7))
    # rocksdict ignored the options of a reopened database: usage stayed 0
    assert budget.usage() > 1 << 20
    assert t.store.cache_hits()[1] > 0  # its statistics are the options' too
    t.close()
