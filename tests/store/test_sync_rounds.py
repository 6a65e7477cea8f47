"""Synchronous rounds in the state machine (store/sync_rounds.py): the partial
sum, closing by workers and by the leader's RoundClose, refusals, snapshots."""

import numpy as np
import pytest
import torch

from store.commands import Batch, Grad, GradRows, Inline, Put, RoundClose
from store.errors import Conflict, Unprocessable
from store.snapshot import read_snapshot, write_snapshot
from store.state import ShardState


def resolve(ref):
    return ref.data


def put(s, name, arr, **kw):
    return s.apply(Put(name=name, dtype=str(arr.dtype), shape=arr.shape, data=Inline(arr.tobytes()), **kw), resolve)


def grad(s, name, arr, base, **kw):
    cmd = Grad(name=name, dtype=str(arr.dtype), shape=arr.shape, data=Inline(arr.tobytes()), base_version=base, **kw)
    return s.apply(cmd, resolve)


SGD = {"type": "sgd", "lr": 0.1}


def test_the_optimizer_applies_once_to_the_mean_when_all_workers_pushed():
    s = ShardState(0)
    w0 = np.array([1.0, 2.0, 3.0], np.float32)
    put(s, "w", w0, optimizer=SGD, sync={"workers": 3})
    grads = [np.array(g, np.float32) for g in ([0.1, 0.2, 0.3], [1.0, -1.0, 0.5], [0.7, 0.0, -0.2])]
    r1 = grad(s, "w", grads[0], 1)
    assert r1["version"] == 1 and r1["round"] == {"version": 1, "received": 1, "needed": 3, "closed": False}
    assert grad(s, "w", grads[1], 1)["round"]["received"] == 2
    assert s.get("w").value.tobytes() == w0.tobytes()  # nothing applied yet
    r3 = grad(s, "w", grads[2], 1)
    assert r3["version"] == 2 and r3["round"] == {
        "version": 1,
        "received": 3,
        "needed": 3,
        "closed": True,
        "by": "workers",
    }
    # torch: the same sum in the same (log) order, the same division, torch.optim.SGD
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = torch.optim.SGD([p], lr=0.1)
    tg = [torch.from_numpy(g) for g in grads]
    p.grad = (tg[0] + tg[1] + tg[2]) / 3
    opt.step()
    assert s.get("w").value.tobytes() == p.detach().numpy().tobytes()
    assert s.get("w").round is None and s.round_stats["closed"] == 1


def test_backup_workers_close_early_and_late_gradients_are_refused_with_the_round():
    s = ShardState(0)
    put(s, "w", np.zeros(2, np.float32), optimizer=SGD, sync={"workers": 3, "backup_workers": 1})
    grad(s, "w", np.ones(2, np.float32), 1)
    assert grad(s, "w", np.ones(2, np.float32), 1)["version"] == 2
    before = s.get("w")
    with pytest.raises(Conflict) as e:
        grad(s, "w", np.ones(2, np.float32), 1)  # the backup worker's, too late
    assert e.value.extra == {"current_version": 2, "round": {"version": 2, "received": 0, "needed": 2}}
    with pytest.raises(Conflict):
        grad(s, "w", np.ones(2, np.float32), 3)  # from the future
    with pytest.raises(Conflict):
        grad(s, "w", np.ones(2, np.float32), None)  # a sync tensor needs the base version
    assert s.get("w") is before and s.round_stats["late_refused"] == 1


def test_sum_reduce_and_the_timeout_close_with_what_arrived():
    s = ShardState(0)
    put(s, "w", np.zeros(2, np.float32), optimizer=SGD, sync={"workers": 4, "reduce": "sum", "round_timeout": 2})
    grad(s, "w", np.array([1, 2], np.float32), 1)
    grad(s, "w", np.array([3, 4], np.float32), 1)
    assert s.apply(RoundClose(rounds=(("w", 7),)), resolve) == {"closed": []}  # not the open round: ignored
    out = s.apply(RoundClose(rounds=(("w", 1), ("gone", 1))), resolve)
    assert out["closed"][0]["round"] == {"version": 1, "received": 2, "needed": 4, "closed": True, "by": "timeout"}
    assert s.get("w").version == 2 and s.get("w").value.tolist() == pytest.approx([-0.4, -0.6])
    assert s.round_stats == {"closed": 1, "timed_out": 1, "late_refused": 0}
    assert s.apply(RoundClose(rounds=(("w", 2),)), resolve) == {"closed": []}  # no gradient yet: stays open


def test_a_batch_push_adds_to_every_round_or_to_none():
    s = ShardState(0)
    for n in ("a", "b"):
        put(s, n, np.zeros(2, np.float32), optimizer=SGD, sync={"workers": 2})
    ops = tuple(
        Grad(name=n, dtype="float32", shape=(2,), data=Inline(np.ones(2, np.float32).tobytes()), base_version=1)
        for n in ("a", "b")
    )
    s.apply(Batch(ops=ops), resolve)
    assert s.get("a").round.count == s.get("b").round.count == 1
    assert s.get("a").round.opened == s.get("b").round.opened  # the timer closes them together
    bad = (*ops[:1], Grad(name="b", dtype="float32", shape=(2,), data=ops[1].data, base_version=5))
    with pytest.raises(Conflict):
        s.apply(Batch(ops=bad), resolve)
    assert s.get("a").round.count == 1  # all or none
    res = s.apply(Batch(ops=ops), resolve)
    assert [r["version"] for r in res["results"]] == [2, 2]


@pytest.mark.parametrize(
    "sync",
    [
        {"workers": 0},
        {"workers": 2, "backup_workers": 2},
        {"workers": 2, "backup_workers": -1},
        {"workers": True},
        {"workers": 2, "round_timeout": 0},
        {"workers": 2, "round_timeout": float("inf")},
        {"workers": 2, "round_timeout": float("nan")},
        {"workers": 2, "round_timeout": 10**400},
        {"workers": 10**400},
        {"workers": 2, "reduce": "max"},
        {"workers": 2, "colour": "red"},
        [2],
    ],
)
def test_bad_sync_specs_are_refused_and_change_nothing(sync):
    s = ShardState(0)
    with pytest.raises(Unprocessable):
        put(s, "w", np.zeros(2, np.float32), sync=sync)
    assert "w" not in s.tensors


def test_integer_tensors_and_sparse_pushes_are_refused():
    s = ShardState(0)
    with pytest.raises(Unprocessable, match="float"):
        put(s, "i", np.zeros(2, np.int32), sync={"workers": 2})
    put(s, "w", np.zeros((3, 2), np.float32), optimizer=SGD, sync={"workers": 2})
    rows = GradRows(
        name="w",
        dtype="float32",
        row_shape=(2,),
        k=1,
        indices=Inline(np.zeros(1, np.int64).tobytes()),
        values=Inline(np.ones((1, 2), np.float32).tobytes()),
        base_version=1,
    )
    with pytest.raises(Unprocessable, match="synchronous"):
        s.apply(rows, resolve)


def test_a_replace_drops_the_open_round_and_keeps_the_sync_spec():
    s = ShardState(0)
    put(s, "w", np.zeros(2, np.float32), optimizer=SGD, sync={"workers": 2})
    grad(s, "w", np.ones(2, np.float32), 1)
    put(s, "w", np.ones(2, np.float32))
    t = s.get("w")
    assert t.version == 2 and t.round is None and t.sync["workers"] == 2


def test_the_open_round_survives_a_snapshot(tmp_path):
    s = ShardState(0)
    put(s, "w", np.zeros(2, np.float32), optimizer=SGD, sync={"workers": 3, "round_timeout": 5})
    grad(s, "w", np.array([1, 2], np.float32), 1)
    grad(s, "w", np.array([3, 4], np.float32), 1)
    path = tmp_path / "snap.bin"
    write_snapshot(path, s.tensors, s.dedupe, 0, 9, {"entries": [], "cluster": []})
    loaded, _, _ = read_snapshot(path)
    t, u = s.get("w"), loaded.get("w")
    assert u.sync == t.sync and u.round.count == 2 and u.round.opened == t.round.opened
    assert u.round.sum.tobytes() == t.round.sum.tobytes() and "round_sum" not in u.opt_state
    grad(loaded, "w", np.array([5, 6], np.float32), 1)
    grad(s, "w", np.array([5, 6], np.float32), 1)
    assert loaded.get("w").value.tobytes() == s.get("w").value.tobytes()
    assert loaded.get("w").version == 2
