"""A 64 MB tensor is created, pushed and read back with no leader election."""

import numpy as np
import pytest

from tests.cluster.harness import wait_version_everywhere

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]


def test_64mb_tensor_round_trip_without_elections(make_cluster):
    c = make_cluster()
    terms_before = {n: c.terms(n) for n in c.ids}
    n = 16 << 20  # 16 Mi float32 = 64 MiB
    value = np.random.default_rng(4).standard_normal(n).astype(np.float32)
    r = c.put("n2", "big", value, headers={"X-Optimizer": '{"type":"sgd","lr":0.5}'})
    assert r.status_code == 201, r.text
    grad = np.ones(n, np.float32)
    r = c.grad("n3", "big", grad)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 2
    wait_version_everywhere(c, "big", 2, timeout=60)
    expected = value - np.float32(0.5) * grad
    for nid in c.ids:
        got, version = c.get(nid, "big")
        assert version == 2
        assert np.array_equal(got, expected)
    assert {n: c.terms(n) for n in c.ids} == terms_before, "a leader election happened"
