"""The digits trainer keeps training through the loss of a replica."""

import os
import re
import subprocess
import sys

import pytest

from tests.cluster.harness import ROOT
from tests.waiting import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]


def test_training_survives_a_killed_replica(make_cluster):
    c = make_cluster()
    env = dict(os.environ, PYTHONPATH=str(ROOT), PARAMSTORE_URLS=",".join(c.urls.values()))
    trainer = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "examples" / "train_digits.py"),
            "--workers",
            "2",
            "--steps",
            "200",
            "--prefix",
            "kd",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def version():
            r = c.http.head(f"{c.urls['n1']}/v1/tensors/kd.W0")
            return int(r.headers["X-Version"]) if r.status_code == 200 else 0

        wait_until(lambda: version() >= 60, 120, "the trainer's first 60 pushes")
        victim = c.leader_of(c.shard_of("kd.W0"))  # the hardest case: the leader of the weights
        c.kill(victim)
        out, _ = trainer.communicate(timeout=240)
    finally:
        if trainer.poll() is None:
            trainer.kill()
    assert trainer.returncode == 0, out
    m = re.search(r"final: test accuracy ([0-9.]+)", out)
    assert m and float(m.group(1)) >= 0.90, out
    survivors = [n for n in c.ids if n != victim]
    assert c.get(survivors[0], "kd.W0", consistency="linearizable")[1] >= 2 * 200
