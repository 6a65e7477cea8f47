"""The pure state machine: every op, every conflict, version arithmetic."""

from dataclasses import replace

import numpy as np
import pytest

from store.commands import Batch, Delete, Grad, GradRows, Group, Inline, MemberSet, Noop, Put
from store.errors import Conflict, NotFound, PreconditionFailed, Unprocessable
from store.state import ShardState


def inline(arr):
    return Inline(np.ascontiguousarray(arr).tobytes())


def resolve(ref):
    return ref.data


def put_cmd(name, arr, **kw):
    return Put(name=name, dtype=str(arr.dtype), shape=arr.shape, data=inline(arr), **kw)


def grad_cmd(name, arr, **kw):
    return Grad(name=name, dtype=str(arr.dtype), shape=arr.shape, data=inline(arr), **kw)


def put(s, name, arr, **kw):
    return s.apply(put_cmd(name, arr, **kw), resolve)


def grad(s, name, arr, **kw):
    return s.apply(grad_cmd(name, arr, **kw), resolve)


def test_versions_start_at_one_and_rise_by_one():
    s = ShardState(0)
    assert put(s, "w", np.zeros(3, np.float32)) == {"name": "w", "version": 1, "shard": 0, "created": True}
    assert put(s, "w", np.ones(3, np.float32))["version"] == 2
    assert grad(s, "w", np.ones(3, np.float32))["version"] == 3
    assert s.get("w").version == 3


def test_assign_push_replaces_value_and_values_are_read_only():
    s = ShardState(0)
    put(s, "w", np.zeros(3, np.float32))
    grad(s, "w", np.array([1, 2, 3], np.float32))
    v = s.get("w").value
    assert v.tolist() == [1, 2, 3]
    with pytest.raises(ValueError):
        v[0] = 5


def test_sgd_push_applies_learning_rate():
    s = ShardState(0)
    put(s, "w", np.ones(2, np.float32), optimizer={"type": "sgd", "lr": 0.5})
    grad(s, "w", np.array([2, 4], np.float32))
    assert s.get("w").value.tolist() == [0, -1]


def test_create_only_conflicts_and_changes_nothing():
    s = ShardState(0)
    put(s, "w", np.zeros(2, np.float32))
    with pytest.raises(PreconditionFailed) as e:
        put(s, "w", np.ones(2, np.float32), if_none_match=True)
    assert e.value.extra["current_version"] == 1
    assert s.get("w").value.tolist() == [0, 0] and s.get("w").version == 1


def test_if_match_compare_and_set():
    s = ShardState(0)
    put(s, "w", np.zeros(2, np.float32))
    assert put(s, "w", np.ones(2, np.float32), if_match=1)["version"] == 2
    with pytest.raises(PreconditionFailed):
        put(s, "w", np.zeros(2, np.float32), if_match=1)
    with pytest.raises(PreconditionFailed):
        put(s, "new", np.zeros(2, np.float32), if_match=1)
    with pytest.raises(PreconditionFailed):
        put(s, "new", np.zeros(2, np.float32), if_match="*")
    assert s.get("w").version == 2 and "new" not in s.tensors


def test_replace_keeps_dtype_and_shape():
    s = ShardState(0)
    put(s, "w", np.zeros(2, np.float32))
    with pytest.raises(Unprocessable):
        put(s, "w", np.zeros(3, np.float32))
    with pytest.raises(Unprocessable):
        put(s, "w", np.zeros(2, np.float64))
    assert s.get("w").version == 1


def test_nonfinite_refused_unless_allowed():
    s = ShardState(0)
    with pytest.raises(Unprocessable):
        put(s, "w", np.array([1, np.nan], np.float32))
    put(s, "w", np.zeros(2, np.float32))
    with pytest.raises(Unprocessable):
        grad(s, "w", np.array([np.inf, 0], np.float32))
    put(s, "ok", np.array([np.nan], np.float32), allow_nonfinite=True)
    assert np.isnan(s.get("ok").value[0])
    assert s.get("w").version == 1


def test_grad_errors():
    s = ShardState(0)
    with pytest.raises(NotFound):
        grad(s, "missing", np.zeros(2, np.float32))
    put(s, "w", np.zeros(2, np.float32))
    with pytest.raises(Unprocessable):
        grad(s, "w", np.zeros(3, np.float32))
    with pytest.raises(Unprocessable):
        grad(s, "w", np.zeros(2, np.float64))


def test_staleness_reject_and_scale():
    s = ShardState(0)
    put(s, "r", np.zeros(1, np.float32), optimizer={"type": "sgd", "lr": 1.0}, max_staleness=1)
    grad(s, "r", np.ones(1, np.float32), base_version=1)  # -> v2
    grad(s, "r", np.ones(1, np.float32), base_version=1)  # staleness 1: ok -> v3
    with pytest.raises(Conflict) as e:
        grad(s, "r", np.ones(1, np.float32), base_version=1)  # staleness 2 > 1
    assert e.value.extra["current_version"] == 3
    with pytest.raises(Conflict):
        grad(s, "r", np.ones(1, np.float32), base_version=9)  # from the future
    put(s, "s", np.zeros(1, np.float32), optimizer={"type": "sgd", "lr": 1.0}, staleness_policy="scale")
    grad(s, "s", np.ones(1, np.float32), base_version=1)  # staleness 0: full step
    grad(s, "s", np.ones(1, np.float32), base_version=1)  # staleness 1: half step
    assert s.get("s").value.tolist() == [-1.5]


def test_delete_with_if_match():
    s = ShardState(0)
    put(s, "w", np.zeros(1, np.float32))
    with pytest.raises(PreconditionFailed):
        s.apply(Delete(name="w", if_match=7), resolve)
    assert s.apply(Delete(name="w", if_match=1), resolve)["deleted"]
    with pytest.raises(NotFound):
        s.get("w")


def test_request_id_applies_once_and_replays_outcome():
    s = ShardState(0)
    put(s, "w", np.zeros(1, np.float32), optimizer={"type": "sgd", "lr": 1.0})
    first = grad(s, "w", np.ones(1, np.float32), rid="abc")
    again = grad(s, "w", np.ones(1, np.float32), rid="abc")
    assert first["version"] == again["version"] == 2 and again["duplicate"]
    assert s.get("w").value.tolist() == [-1]
    with pytest.raises(PreconditionFailed):
        put(s, "w", np.zeros(1, np.float32), if_match=9, rid="bad")
    with pytest.raises(PreconditionFailed):
        put(s, "w", np.zeros(1, np.float32), if_match=9, rid="bad")


def test_batch_is_all_or_nothing():
    s = ShardState(0)
    put(s, "a", np.zeros(1, np.float32))
    ops = [put_cmd("a", np.ones(1, np.float32)), grad_cmd("missing", np.ones(1, np.float32))]
    with pytest.raises(NotFound):
        s.apply(Batch(ops=tuple(ops)), resolve)
    assert s.get("a").version == 1 and s.get("a").value[0] == 0
    ops[1] = put_cmd("b", np.ones(1, np.float32))
    out = s.apply(Batch(ops=tuple(ops)), resolve)
    assert [r["version"] for r in out["results"]] == [2, 1]


@pytest.mark.parametrize(
    "op",
    [
        GradRows(name="a", dtype="float32", row_shape=(), k=0, indices=Inline(b""), values=Inline(b"")),
        MemberSet(id="n4", http="h:1", raft="r:1", data="d:1"),
        Noop(),
    ],
)
def test_a_batch_refuses_what_cannot_be_part_of_one(op):
    s = ShardState(0)
    put(s, "a", np.zeros(1, np.float32))
    with pytest.raises(Unprocessable, match="cannot be part of a batch"):
        s.apply(Batch(ops=(put_cmd("a", np.ones(1, np.float32)), op)), resolve)
    assert s.get("a").version == 1 and not s.members


def test_unknown_optimizer_field_refused():
    s = ShardState(0)
    with pytest.raises(Unprocessable):
        put(s, "w", np.zeros(1, np.float32), optimizer={"type": "sgd", "lr": 0.1, "bogus": 1})
    with pytest.raises(Unprocessable):
        put(s, "w", np.zeros(1, np.float32), optimizer={"type": "rmsprop"})
    assert "w" not in s.tensors


def rows_cmd(name, idx, vals, **kw):
    idx = np.asarray(idx, np.int64)
    return GradRows(
        name=name,
        k=len(idx),
        dtype=str(vals.dtype),
        row_shape=vals.shape[1:],
        indices=inline(idx),
        values=inline(vals),
        **kw,
    )


def test_grad_rows_touches_only_those_rows_and_sums_duplicates():
    s = ShardState(0)
    table = np.zeros((1000, 4), np.float32)
    put(s, "emb", table, optimizer={"type": "sgd", "lr": 1.0})
    before = s.get("emb").value  # a reader holding the old buffer
    out = s.apply(rows_cmd("emb", [3, 7, 3], np.ones((3, 4), np.float32)), resolve)
    assert out["version"] == 2 and out["rows"] == 2
    now = s.read("emb").value
    assert now[3].tolist() == [-2] * 4 and now[7].tolist() == [-1] * 4
    assert np.count_nonzero(now) == 8
    assert np.count_nonzero(before) == 0  # earlier readers never see in-place writes


def test_grad_rows_adam_state_per_row_and_snapshot_capture_is_a_copy():
    s = ShardState(0)
    put(s, "emb", np.ones((50, 2), np.float32), optimizer={"type": "adam", "lr": 0.1})
    s.apply(rows_cmd("emb", [1], np.ones((1, 2), np.float32)), resolve)
    captured = s.capture()["emb"].value
    s.apply(rows_cmd("emb", [1], np.ones((1, 2), np.float32)), resolve)
    t = s.get("emb")
    assert t.opt_state["exp_avg"].shape == (50, 2) and t.opt_state["step"] == 2
    assert np.count_nonzero(t.opt_state["exp_avg"][2:]) == 0
    assert captured[1, 0] != t.value[1, 0]  # the capture did not move with later pushes
    rows, meta = s.read_rows("emb", np.array([1, 2]))
    assert rows.shape == (2, 2) and meta.version == 3


def test_grad_rows_errors_change_nothing():
    s = ShardState(0)
    put(s, "emb", np.zeros((10, 2), np.float32))
    with pytest.raises(Unprocessable):
        s.apply(rows_cmd("emb", [10], np.ones((1, 2), np.float32)), resolve)
    with pytest.raises(Unprocessable):
        s.apply(rows_cmd("emb", [1], np.ones((1, 3), np.float32)), resolve)
    with pytest.raises(Unprocessable):
        s.apply(rows_cmd("emb", [1], np.full((1, 2), np.nan, np.float32)), resolve)
    assert s.get("emb").version == 1 and not s.get("emb").in_place


def test_scalar_tensors_keep_shape_through_optimizer_and_snapshot(tmp_path):
    from store.snapshot import read_snapshot, write_snapshot

    s = ShardState(0)
    put(s, "lr", np.array(1.0, np.float32), optimizer={"type": "adam"})
    grad(s, "lr", np.array(0.5, np.float32))
    assert s.get("lr").value.shape == () and s.get("lr").opt_state["exp_avg"].shape == ()
    write_snapshot(tmp_path / "s", s.tensors, s.dedupe, 0, 3, {})
    loaded, _, _ = read_snapshot(tmp_path / "s")
    assert loaded.get("lr").value.shape == () and loaded.get("lr").opt_state["exp_avg_sq"].shape == ()


def test_sparse_push_on_a_1m_by_64_table_does_not_copy_the_table():
    import tracemalloc

    s = ShardState(0)
    table = np.zeros((1_000_000, 64), np.float32)  # 256 MB
    put(s, "emb", table, optimizer={"type": "sgd", "lr": 0.1})
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 1_000_000, 1000)
    s.apply(rows_cmd("emb", idx, np.ones((1000, 64), np.float32)), resolve)  # takes ownership once
    tracemalloc.start()
    try:
        for _ in range(3):
            s.apply(rows_cmd("emb", rng.integers(0, 1_000_000, 1000), np.ones((1000, 64), np.float32)), resolve)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"a 1,000-row push allocated {peak >> 20} MB"
    assert s.get("emb").version == 5


def test_put_with_optimizer_state_restores_it():
    s = ShardState(0)
    put(s, "src", np.ones(3, np.float32), optimizer={"type": "adam", "lr": 0.1})
    for _ in range(3):
        grad(s, "src", np.full(3, 0.5, np.float32))
    src = s.get("src")
    cmd = put_cmd(
        "dst",
        src.value,
        optimizer=src.optimizer,
        state_scalars={"step": src.opt_state["step"]},
        state_arrays={k: inline(src.opt_state[k]) for k in ("exp_avg", "exp_avg_sq")},
    )
    s.apply(cmd, resolve)
    grad(s, "src", np.full(3, 0.5, np.float32))
    grad(s, "dst", np.full(3, 0.5, np.float32))
    assert s.get("dst").value.tobytes() == s.get("src").value.tobytes()  # continues identically
    bad = replace(cmd, name="bad", state_arrays={"momentum_buffer": inline(src.value)}, state_scalars={})
    with pytest.raises(Unprocessable):
        s.apply(bad, resolve)
    assert "bad" not in s.tensors


def test_a_group_applies_its_parts_independently_and_each_at_most_once():
    s = ShardState(0)
    one = np.ones(2, np.float32)
    out = s.apply(
        Group(
            cmds=(
                put_cmd("w", one, optimizer={"type": "sgd", "lr": 1.0}, rid="p"),
                grad_cmd("w", one, rid="g1"),
                grad_cmd("w", one, rid="g2", if_match=1),  # stale precondition: fails alone
                grad_cmd("w", one, rid="g1"),  # a retry of g1: not applied twice
                grad_cmd("nope", one, rid="g3"),
                Noop(),
            )
        ),
        resolve,
    )["outcomes"]
    assert out[0]["ok"]["version"] == 1 and out[1]["ok"]["version"] == 2
    assert out[2]["error"] == "precondition_failed"
    assert out[3]["ok"] == dict(out[1]["ok"], duplicate=True)
    assert out[4]["error"] == "not_found" and out[5] == {"ok": {}}
    assert s.tensors["w"].version == 2 and s.tensors["w"].value.tolist() == [0.0, 0.0]
    assert s.changed == {"w"}
