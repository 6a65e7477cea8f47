"""A trainer's environment has the client and torch, not the server: `api` and
`store` (which keep their import names) and the server's dependencies are
never needed to train against a cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.paramstore.devcluster import ROOT, DevCluster

pytestmark = pytest.mark.cluster

# Runs in a fresh interpreter. The finder makes every server-side module look
# uninstalled, as in `pip install 'paramstore[torch]'` (the server code is on
# PYTHONPATH here, so without it a stray import would silently succeed).
TRAINER = r"""
import importlib.abc, sys

SERVER_ONLY = {"api", "store", "fastapi", "starlette", "uvicorn", "pysyncobj", "cryptography",
               "prometheus_client"}
refused = []

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in SERVER_ONLY:
            refused.append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (a trainer environment)", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())

import numpy as np
import torch

import paramstore
import paramstore.torch
from paramstore import Client, NotFoundError

urls, prefix = sys.argv[1].split(","), sys.argv[2]
with Client(urls, timeout=5.0, deadline=20.0) as ps:
    assert ps.create(prefix + "w", np.zeros(3, np.float32), optimizer={"type": "sgd", "lr": 0.5}) == 1
    assert ps.push_grad(prefix + "w", np.ones(3, np.float32), base_version=1) == 2
    value, version = ps.pull(prefix + "w")
    assert version == 2 and value.tolist() == [-0.5] * 3, (value, version)
    try:
        ps.pull(prefix + "missing")
        raise AssertionError("no NotFoundError")
    except NotFoundError:
        pass

    net = torch.nn.Linear(2, 1)
    paramstore.torch.create_module(ps, net, optimizer={"type": "sgd", "lr": 0.1}, prefix=prefix + "net.")
    versions = paramstore.torch.load_module(ps, net, prefix=prefix + "net.")
    net(torch.ones(1, 2)).sum().backward()
    new = paramstore.torch.push_module_grads(ps, net, prefix=prefix + "net.", base_versions=versions)
    assert new == {prefix + "net.weight": 2, prefix + "net.bias": 2}, new

loaded = sorted(m for m in sys.modules if m.partition(".")[0] in SERVER_ONLY)
assert not loaded, loaded
print("trainer ok; refused imports:", refused)
"""


def test_a_trainer_never_needs_the_server_packages(cluster: DevCluster, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", TRAINER, ",".join(cluster.urls), f"env-{os.getpid()}-"],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "trainer ok; refused imports: []" in proc.stdout, proc.stdout
