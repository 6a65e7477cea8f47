"""paramstore in ten lines: run a cluster (`paramstore dev`), then this script; it needs only
`pip install paramstore` (the client)."""

import os

import numpy as np

from paramstore import Client

with Client(os.environ.get("PARAMSTORE_URLS", "http://127.0.0.1:8700")) as ps:
    ps.create("quickstart.w", np.zeros(4, np.float32), optimizer={"type": "sgd", "lr": 0.1}, exist_ok=True)
    w, version = ps.pull("quickstart.w")  # a read-only numpy array and its version
    new = ps.push_grad("quickstart.w", np.ones(4, np.float32), base_version=version)  # w -= 0.1 * grad
    print(f"version {version} -> {new}:", ps.pull("quickstart.w")[0])
