"""bench/gloo.py (issue 14's benchmark) runs end to end in a tiny configuration, so it cannot rot."""

import math

import pytest

from bench import gloo

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]


def test_every_setup_runs_and_sync_rounds_compute_what_ddp_computes(tmp_path):
    cfg = gloo.Config(workers=2, steps=2, batch=4, dim_in=16, hidden=32, dim_out=8, eval_samples=64, timeout=240)
    variants = {"async, pull while pushing": ("async", {"async_overlap": True})}
    res = gloo.run(cfg, tmp_path, log=lambda _msg: None, variants=variants)
    ran = res["setups"]
    assert set(ran) == set(gloo.SETUPS), res["notes"]
    assert set(res["variants"]) == set(variants)
    for setup, r in [*ran.items(), *res["variants"].items()]:
        assert r["steps_s"] > 0 and r["worker_mb_per_step"] > 0, (setup, r)
        assert math.isfinite(r["loss"]), (setup, r)
        # the phases are parts of each worker's timed steps, so they cannot add up to more than the wall time
        assert 0 < sum(r["phase_s_per_step"].values()) <= 1 / r["steps_s"] + 1e-9, (setup, r)
    # every worker's sockets moved at least its gradients each step (float32, both directions counted)
    assert ran["sync"]["worker_mb_per_step"] * gloo.MB >= 4 * cfg.params()
    # the same samples, mean of the workers' gradients, one SGD step per round: DDP's arithmetic
    assert ran["sync"]["loss"] == pytest.approx(ran["ddp"]["loss"], rel=1e-5)
    assert ran["async"]["replicas_cpu_s_per_step"] > 0
    table = gloo.markdown(res)
    assert table.count("\n| (") == len(gloo.SETUPS)
    assert "| async, pull while pushing |" in table


def test_topk_warm_up_starts_dense_and_reaches_the_fraction():
    cfg = gloo.Config(topk=0.01, topk_warmup=4)
    assert [gloo.topk_at(cfg, s) for s in range(6)] == [0.25, 0.0625, 0.015625, 0.01, 0.01, 0.01]
    assert gloo.topk_at(gloo.Config(topk=0.01), 0) == 0.01
