"""The StatefulSet's own configuration, run for real on loopback.

Each pod's environment is built from the manifests (downward API pod name,
Secret, ConfigMap mount); the pods' stable DNS names are rewritten to
addresses in a random 127.a.b.0/24 block (all of 127/8 is loopback on Linux),
keeping every port the manifests declare. Three replicas must form the
cluster and pass the readiness probe the manifest declares; then the operator
CLI and /metrics are checked against them.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.manifests import ROOT, container, k8s_object, mounted_config, named_port, pod_env
from tests.ports import _free
from tests.waiting import wait_until

pytestmark = pytest.mark.cluster


@dataclass
class Pods:
    urls: dict[str, str]  # pod name -> http://127.a.b.i:8700
    logs: dict[str, Path]  # pod name -> its stdout/stderr
    write_token: str  # from the Secret, as the pods got it
    read_token: str


def _loopback_block() -> str:
    for _ in range(50):
        block = f"127.{random.randrange(1, 255)}.{random.randrange(1, 255)}"
        if all(_free(p, f"{block}.{i + 1}") for i in range(3) for p in (8700, 9700, 9701, 9702, 9703, 9704)):
            return block
    raise RuntimeError("no free loopback block")


@pytest.fixture(scope="module")
def statefulset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sts")
    sts = k8s_object("StatefulSet")
    name, headless, replicas = sts["metadata"]["name"], sts["spec"]["serviceName"], sts["spec"]["replicas"]
    mount, files = mounted_config(sts)
    block = _loopback_block()
    ips = {f"{name}-{i}": f"{block}.{i + 1}" for i in range(replicas)}
    toml = files["cluster.toml"]
    for pod, ip in ips.items():
        toml, n = re.subn(rf"\b{re.escape(pod)}\.{re.escape(headless)}\b", ip, toml)
        assert n == 2, f"{pod}: expected http and raft addresses in the ConfigMap"
    config_dir = tmp / "etc"
    config_dir.mkdir()
    (config_dir / "cluster.toml").write_text(toml)
    args = container(sts)["args"]
    procs, logs = {}, {}
    for pod in ips:
        env = pod_env(sts, pod)
        env["PARAMSTORE_CONFIG"] = env["PARAMSTORE_CONFIG"].replace(mount, str(config_dir))
        env["PARAMSTORE_DATA_DIR"] = str(tmp / pod)  # the PVC
        logs[pod] = tmp / f"{pod}.log"
        with open(logs[pod], "wb") as log:  # the replica writes to its own copy
            procs[pod] = subprocess.Popen(
                [sys.executable, "-m", "api.cli", *args],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            )
    probe = container(sts)["readinessProbe"]["httpGet"]
    port = named_port(sts, probe["port"])
    urls = {pod: f"http://{ip}:{port}" for pod, ip in ips.items()}
    try:
        with httpx.Client(timeout=2) as http:
            for pod, url in urls.items():
                outcome = wait_until(
                    lambda pod=pod, url=url: (
                        "exited" if procs[pod].poll() is not None else http.get(url + probe["path"]).status_code == 200
                    ),
                    40,
                    f"{pod} ready (log: {logs[pod]})",
                )
                assert outcome is True, f"{pod} exited:\n{logs[pod].read_text()[-3000:]}"
        env0 = pod_env(sts, f"{name}-0")
        yield Pods(urls, logs, env0["PARAMSTORE_WRITE_TOKENS"], env0["PARAMSTORE_READ_TOKENS"])
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "160"},
        timeout=60,
    )


def test_pods_form_one_cluster(statefulset):
    with httpx.Client(timeout=2, headers={"Authorization": f"Bearer {statefulset.read_token}"}) as http:
        views = {pod: http.get(url + "/v1/cluster").json() for pod, url in statefulset.urls.items()}
        assert {v["node"] for v in views.values()} == set(statefulset.urls)  # ids from the pod names
        for shard in range(len(views["paramstore-0"]["shards"])):
            leaders = {v["shards"][shard]["leader"] for v in views.values()}
            assert len(leaders) == 1 and leaders.pop() in statefulset.urls
        assert http.get(statefulset.urls["paramstore-1"] + "/healthz").status_code == 200  # the liveness probe


def test_operator_cli_against_the_pods(statefulset, tmp_path):
    url0, url2 = statefulset.urls["paramstore-0"], statefulset.urls["paramstore-2"]
    write, read = ("--token", statefulset.write_token), ("--token", statefulset.read_token)
    denied = cli("status", "--url", url0)  # the Secret's tokens switched authentication on
    assert denied.returncode == 1 and "HTTP 401" in denied.stderr
    status = cli("status", "--url", url0, *read)
    assert status.returncode == 0, status.stderr
    assert "paramstore-2" in status.stdout and "leader" in status.stdout and "unreachable" not in status.stdout
    value = np.linspace(0, 1, 40_000, dtype=np.float32).reshape(200, 200)  # 160 KB: a sideloaded payload
    np.save(tmp_path / "w.npy", value)
    assert "HTTP 403" in cli("put", "live.w", str(tmp_path / "w.npy"), "--url", url0, *read).stderr
    put = cli(
        "put", "live.w", str(tmp_path / "w.npy"), "--url", url0, "--optimizer", '{"type": "sgd", "lr": 0.1}', *write
    )
    assert put.returncode == 0 and "created, version 1" in put.stdout, put.stderr
    got = cli("get", "live.w", "-o", str(tmp_path / "back.npy"), "--url", url2, "--linearizable", *read)
    assert got.returncode == 0, got.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "back.npy"), value)
    saved = cli("checkpoint", "save", str(tmp_path / "ck.safetensors"), "--url", url2, "--no-progress", *read)
    assert saved.returncode == 0, saved.stderr
    from safetensors.numpy import load_file

    np.testing.assert_array_equal(load_file(str(tmp_path / "ck.safetensors"))["live.w"], value)


def test_metrics_agree_across_pods(statefulset):
    roles: dict[str, list[str]] = {}
    with httpx.Client(timeout=2) as http:
        for pod, url in statefulset.urls.items():
            for fam in text_string_to_metric_families(http.get(url + "/metrics").text):
                for s in fam.samples:
                    if s.name == "paramstore_shard_role" and s.value == 1:
                        assert s.labels["node"] == pod
                        roles.setdefault(s.labels["shard"], []).append(s.labels["role"])
    assert len(roles) == 4
    for shard, rs in roles.items():
        assert sorted(rs) == ["follower", "follower", "leader"], (shard, rs)


def test_pods_log_json_lines_with_their_node_id(statefulset):
    elected = 0
    for pod in statefulset.urls:
        lines = [ln for ln in statefulset.logs[pod].read_text().splitlines() if ln.startswith("{")]
        docs = [json.loads(ln) for ln in lines]
        assert docs and all(d["node"] == pod and d["level"] and d["ts"] for d in docs)
        elected += sum("raft state 1 -> 2" in d["msg"] for d in docs)  # candidate -> leader, at INFO
    assert elected >= 4  # one election won per shard
