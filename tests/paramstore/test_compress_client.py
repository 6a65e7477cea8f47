"""Compressed pulls and pushes through the client on the real 3-replica cluster:
wire dtypes decode to float32, narrowed pushes apply what was sent, top-k with
error feedback loses no gradient mass."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid

import numpy as np
import pytest

from paramstore import Client
from paramstore._codecs import from_bfloat16, to_bfloat16
from tests.paramstore.devcluster import ROOT, DevCluster

pytestmark = pytest.mark.cluster
rng = np.random.default_rng(1414)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def test_pull_and_pull_many_decode_each_wire_dtype(ps: Client) -> None:
    a = rng.standard_normal((16, 8)).astype(np.float32)
    b = (rng.standard_normal(10) * 100).astype(np.float32)
    na, nb = unique("cpa"), unique("cpb")
    ps.create(na, a)
    ps.create(nb, b)
    got, version = ps.pull(na, wire_dtype="float16")
    assert version == 1 and got.dtype == np.float32 and got.shape == (16, 8)
    assert np.array_equal(got, a.astype(np.float16).astype(np.float32))
    got, _ = ps.pull(na, wire_dtype="bfloat16")
    assert np.array_equal(got, from_bfloat16(to_bfloat16(a)))
    got, _ = ps.pull(na, wire_dtype="int8")
    scales = np.abs(a).max(axis=1) / 127
    assert got.dtype == np.float32 and (np.abs(got - a) <= scales[:, None] / 2 * 1.0001).all()
    many = ps.pull_many([na, nb], wire_dtype="int8")
    assert np.array_equal(many[na][0], got) and many[nb][1] == 1
    assert np.abs(many[nb][0] - b).max() <= np.abs(b).max() / 127 / 2 * 1.0001
    many = ps.pull_many([na, nb], wire_dtype="bfloat16")
    assert np.array_equal(many[nb][0], from_bfloat16(to_bfloat16(b)))
    with pytest.raises(ValueError, match="float8"):
        ps.pull(na, wire_dtype="float8")


@pytest.mark.parametrize("wire_dtype", ["float16", "bfloat16", "int8"])
def test_narrow_push_applies_the_widened_gradient(ps: Client, wire_dtype: str) -> None:
    name = unique("cpush")
    value = rng.standard_normal((6, 5)).astype(np.float32)
    ps.create(name, value, optimizer={"type": "sgd", "lr": 1.0})
    g = rng.standard_normal((6, 5)).astype(np.float32)
    assert ps.push_grad(name, g, wire_dtype=wire_dtype) == 2
    got, _ = ps.pull(name)
    if wire_dtype == "float16":
        assert np.array_equal(got, value - g.astype(np.float16).astype(np.float32))
    elif wire_dtype == "bfloat16":
        assert np.array_equal(got, value - from_bfloat16(to_bfloat16(g)))
    else:
        scales = np.abs(g).max(axis=1) / 127
        assert (np.abs((value - got) - g) <= scales[:, None] / 2 * 1.0001 + 1e-6).all()


def test_push_grads_in_wire_dtypes(ps: Client) -> None:
    a, b = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(7).astype(np.float32)
    na, nb = unique("cba"), unique("cbb")
    ps.create(na, a, optimizer={"type": "sgd", "lr": 1.0})
    ps.create(nb, b, optimizer={"type": "sgd", "lr": 1.0})
    ga, gb = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(7).astype(np.float32)
    assert ps.push_grads({na: ga, nb: gb}, wire_dtype="float16") == {na: 2, nb: 2}
    assert np.array_equal(ps.pull(na)[0], a - ga.astype(np.float16).astype(np.float32))
    ps.push_grads({na: ga, nb: gb}, wire_dtype="int8")
    got = ps.pull(nb)[0]
    want = b - gb.astype(np.float16).astype(np.float32) - gb
    assert np.abs(got - want).max() <= np.abs(gb).max() / 127 / 2 * 1.0001 + 1e-6


def test_partitioned_tensor_pulls_and_pushes_compressed(ps: Client) -> None:
    name = unique("cpart")
    value = rng.standard_normal((12, 5)).astype(np.float32)
    ps.create(name, value, optimizer={"type": "sgd", "lr": 1.0}, partitions=3)
    got, version = ps.pull(name, wire_dtype="bfloat16")  # whole, even though the client knows the parts
    assert version == 1 and np.array_equal(got, from_bfloat16(to_bfloat16(value)))
    g = rng.standard_normal((12, 5)).astype(np.float32)
    assert ps.push_grad(name, g, compress="topk:0.05") == 2  # 3 entries, every part advances
    assert ps.push_grad(name, g, wire_dtype="float16") == 3
    now, _ = ps.pull(name)  # through the parts
    residual = ps.residual(name)
    assert residual is not None
    np.testing.assert_allclose((value - now) + residual, g + g.astype(np.float16).astype(np.float32), atol=1e-6)


def test_sync_step_with_topk_pushes_and_narrow_pulls(ps: Client) -> None:
    name = unique("csync")
    value = rng.standard_normal(50).astype(np.float32)
    ps.create(name, value, optimizer={"type": "sgd", "lr": 1.0}, sync={"workers": 1})
    g = rng.standard_normal(50).astype(np.float32)
    new = ps.sync_step({name: g}, {name: 1}, compress="topk:0.1", pull_dtype="float16")
    got, version = new[name]
    assert version == 2
    residual = ps.residual(name)
    assert residual is not None and np.count_nonzero(residual) == 45
    applied = value - (g - residual)  # the round of one worker applied the 5 entries sent
    assert np.array_equal(got, applied.astype(np.float16).astype(np.float32))


def test_topk_error_feedback_loses_no_gradient_mass(ps: Client) -> None:
    name = unique("topk")
    value = np.zeros((20, 25), np.float32)
    ps.create(name, value, optimizer={"type": "sgd", "lr": 1.0})
    total = np.zeros_like(value, dtype=np.float64)
    before = value
    for step in range(20):
        g = rng.standard_normal(value.shape).astype(np.float32)
        total += g
        ps.push_grad(name, g, compress="topk:0.02", wire_dtype="float16" if step % 2 else None)
        now, version = ps.pull(name)
        assert version == step + 2
        assert np.count_nonzero(now != before) <= 10  # 2% of 500 entries per push
        before = now
    residual = ps.residual(name)
    assert residual is not None
    sent = -before.astype(np.float64)  # sgd with lr 1: value = -(sum of what was applied)
    np.testing.assert_allclose(sent + residual, total, rtol=0, atol=1e-4)


def test_bad_topk_fraction_sends_nothing(ps: Client) -> None:
    name = unique("topkbad")
    ps.create(name, np.zeros(4, np.float32), optimizer={"type": "sgd", "lr": 1.0})
    for bad in ("topk:0", "topk:1.5", "topk:-0.1", "topk:x", "random:0.1"):
        with pytest.raises(ValueError):
            ps.push_grad(name, np.ones(4, np.float32), compress=bad)
    assert ps.pull(name)[1] == 1 and ps.residual(name) is None


def test_table_lookup_and_row_push_in_wire_dtypes(ps: Client) -> None:
    name = unique("ctab").replace("-", "_")
    ps.create_table(
        name, dim=8, initializer={"type": "normal", "std": 1.0, "seed": 5}, optimizer={"type": "sgd", "lr": 1.0}
    )
    ids = np.array([3, 77, 1 << 50], np.int64)
    plain = ps.lookup(name, ids)
    assert np.array_equal(ps.lookup(name, ids, wire_dtype="float16"), plain.astype(np.float16).astype(np.float32))
    assert np.array_equal(ps.lookup(name, ids, wire_dtype="bfloat16"), from_bfloat16(to_bfloat16(plain)))
    got = ps.lookup(name, ids, wire_dtype="int8")
    assert (np.abs(got - plain) <= np.abs(plain).max(axis=1, keepdims=True) / 127 / 2 * 1.0001).all()
    g = rng.standard_normal((3, 8)).astype(np.float32)
    ps.push_rows(name, ids, g, wire_dtype="bfloat16")
    after = ps.lookup(name, ids, consistency="linearizable")
    np.testing.assert_allclose(after, plain - from_bfloat16(to_bfloat16(g)), rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        ps.push_rows(name, ids, g, wire_dtype="int8")


def test_torch_helpers_pull_and_push_compressed(ps: Client) -> None:
    import torch

    from paramstore import torch as pt

    prefix = unique("cnet") + "."
    torch.manual_seed(0)
    net = torch.nn.Linear(40, 30)
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    pt.create_module(ps, net, optimizer={"type": "sgd", "lr": 1.0}, prefix=prefix)
    versions = pt.load_module(ps, net, prefix=prefix, wire_dtype="bfloat16")
    assert torch.equal(net.weight, start["weight"].bfloat16().float())  # torch's own rounding
    net(torch.randn(4, 40)).pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    new = pt.push_module_grads(ps, net, prefix=prefix, base_versions=versions, compress="topk:0.1")
    assert set(new.values()) == {2}
    weight = ps.pull(prefix + "weight")[0]
    changed = np.count_nonzero(weight != start["weight"].numpy())
    assert changed == 120  # 10% of 1200
    residual = ps.residual(prefix + "weight")
    assert residual is not None
    sent = start["weight"].numpy() - weight
    np.testing.assert_allclose(sent + residual, grads["weight"].numpy(), rtol=0, atol=1e-6)


@pytest.mark.skipif(not os.environ.get("PARAMSTORE_LONG_TESTS"), reason="~40 s; set PARAMSTORE_LONG_TESTS=1")
def test_train_digits_with_float16_pulls_and_topk_pushes(cluster: DevCluster) -> None:
    """The README's compressed run, shortened: 2 workers x 80 steps."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PARAMSTORE_URLS=",".join(cluster.urls))
    args = ["--workers", "2", "--steps", "80", "--pull-dtype", "float16", "--compress", "topk:0.01"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_digits.py"), *args, "--prefix", unique("cdigits")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "pulls float16, pushes topk:0.01" in out
    m = re.search(r"final: test accuracy ([0-9.]+)", out)
    assert m and float(m.group(1)) >= 0.90, out
