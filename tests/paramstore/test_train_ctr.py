"""examples/train_ctr.py --short against the folder's 3-replica cluster: 4
worker processes train the CTR model through StoreEmbeddingBag and its
held-out AUC must be within 0.02 of the one-process torch reference (the
example exits 1 otherwise)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.paramstore.devcluster import ROOT, DevCluster

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]


def test_ctr_example_short_run_meets_its_auc_check(cluster: DevCluster) -> None:
    run = subprocess.run(
        [sys.executable, "examples/train_ctr.py", "--short", "--urls", ",".join(cluster.urls)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "OK: AUC within" in run.stdout
    assert "store: held-out AUC" in run.stdout and "reference: held-out AUC" in run.stdout
