"""Every file in deploy/ validated offline: schemas, the real config loader,
and the consistency between config, ports, probes and environment."""

from __future__ import annotations

import argparse
import configparser
import copy
import json
import shlex

import jsonschema
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from api.auth import check_policy
from store.config import load_config
from tests.deploy.manifests import (
    DEPLOY,
    K8S,
    ROOT,
    compose,
    container,
    k8s_docs,
    k8s_object,
    mounted_config,
    named_port,
    pod_env,
)

K8S_VERSION = "1.30.0"  # the oldest Kubernetes docs/deploy.md supports; also checked against the newest shipped


def test_every_deploy_yaml_parses():
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 7
    for f in files:
        assert list(yaml.safe_load_all(f.read_text())), f


# ---- Kubernetes -----------------------------------------------------------------------
def test_kubernetes_objects_validate_against_the_openapi_schemas():
    kinds = []
    for _path, doc in k8s_docs():
        if doc["kind"] == "Kustomization":
            continue
        for version in (K8S_VERSION, kubernetes_validate.latest_version()):
            kubernetes_validate.validate(doc, version, strict=True)
        kinds.append(doc["kind"])
    assert sorted(kinds) == ["ConfigMap", "PodDisruptionBudget", "Secret", "Service", "Service", "StatefulSet"]


def test_the_validator_really_rejects_mistakes():
    """Guards against a validator that passes everything (e.g. a missing schema)."""
    sts = copy.deepcopy(k8s_object("StatefulSet"))
    sts["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, K8S_VERSION, strict=True)
    sts = copy.deepcopy(k8s_object("StatefulSet"))
    container(sts)["readinesProbe"] = container(sts)["readinessProbe"]  # typo: strict mode refuses it
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files


def test_statefulset_shape():
    sts = k8s_object("StatefulSet")
    spec = sts["spec"]
    assert spec["replicas"] == 3
    assert spec["podManagementPolicy"] == "Parallel"  # OrderedReady would deadlock on quorum
    headless = k8s_object("Service", spec["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    labels = spec["template"]["metadata"]["labels"]
    for svc in (headless, k8s_object("Service", "paramstore")):
        assert svc["spec"]["selector"].items() <= labels.items()
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    pdb = k8s_object("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1 and pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    c = container(sts)
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert named_port(sts, c["readinessProbe"]["httpGet"]["port"]) == 8700
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert [t["metadata"]["name"] for t in spec["volumeClaimTemplates"]] == ["data"]
    env = pod_env(sts, "paramstore-0")
    assert mounts["data"] == env["PARAMSTORE_DATA_DIR"]
    assert env["PARAMSTORE_NODE"] == "paramstore-0"  # from the downward API
    for var in ("PARAMSTORE_RAFT_PASSWORD", "PARAMSTORE_WRITE_TOKENS", "PARAMSTORE_READ_TOKENS"):
        (ref,) = [e for e in c["env"] if e["name"] == var]
        assert "secretKeyRef" in ref["valueFrom"], var  # never a literal in the manifest
    sec = sts["spec"]["template"]["spec"]["securityContext"]
    assert sec["runAsNonRoot"] is True and sec["runAsUser"] != 0


@pytest.mark.parametrize("ordinal", [0, 1, 2])
def test_each_pod_loads_the_configmap_with_the_real_loader(ordinal, tmp_path):
    sts = k8s_object("StatefulSet")
    mount, files = mounted_config(sts)
    (tmp_path / "cluster.toml").write_text(files["cluster.toml"])
    pod = f"{sts['metadata']['name']}-{ordinal}"
    env = pod_env(sts, pod)
    assert env["PARAMSTORE_CONFIG"] == f"{mount}/cluster.toml"
    env["PARAMSTORE_CONFIG"] = str(tmp_path / "cluster.toml")
    cfg = load_config(env=env)
    assert cfg.node.id == pod and len(cfg.nodes) == spec_replicas(sts)
    assert cfg.raft.password == pod_env(sts, pod)["PARAMSTORE_RAFT_PASSWORD"]
    assert cfg.auth.write_tokens and cfg.auth.read_tokens
    check_policy(cfg)  # `paramstore serve` refuses to start off loopback without API tokens
    headless = sts["spec"]["serviceName"]
    assert cfg.node.http.host == f"{pod}.{headless}"  # stable DNS name of this very pod
    # every port the replica binds is declared by the container and the headless Service
    declared = {p["containerPort"] for p in container(sts)["ports"]}
    needed = {cfg.node.http.port, cfg.node.data.port} | {cfg.node.raft_address(k).port for k in range(cfg.shards)}
    assert needed == declared
    svc_ports = {p["port"] for p in k8s_object("Service", headless)["spec"]["ports"]}
    assert needed <= svc_ports


def spec_replicas(sts: dict) -> int:
    return sts["spec"]["replicas"]


# ---- compose -------------------------------------------------------------------------
def compose_schema() -> dict:
    """The compose-spec JSON schema as vendored (offline) by check-jsonschema."""
    from importlib.resources import files

    return json.loads(files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text())


def test_compose_file_validates_against_the_compose_spec():
    doc = compose()
    schema = compose_schema()
    jsonschema.validate(doc, schema)
    broken = copy.deepcopy(doc)
    broken["services"]["paramstore-1"]["restart_policy_typo"] = "always"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


@pytest.mark.parametrize("service", ["paramstore-1", "paramstore-2", "paramstore-3"])
def test_compose_services_load_their_config(service, tmp_path):
    doc = compose()
    svc = doc["services"][service]
    (cfg_ref,) = svc["configs"]
    config_file = DEPLOY / doc["configs"][cfg_ref["source"]]["file"]
    env = {k: str(v) for k, v in svc["environment"].items()}
    assert env["PARAMSTORE_CONFIG"] == cfg_ref["target"]
    assert env["PARAMSTORE_RAFT_PASSWORD"].startswith("${PARAMSTORE_RAFT_PASSWORD:?")  # must be provided
    assert env["PARAMSTORE_WRITE_TOKENS"].startswith("${PARAMSTORE_WRITE_TOKENS:?")
    env.update(
        PARAMSTORE_CONFIG=str(config_file),
        PARAMSTORE_RAFT_PASSWORD="x" * 32,
        PARAMSTORE_WRITE_TOKENS="w" * 32,
        PARAMSTORE_READ_TOKENS="",
    )
    cfg = load_config(env=env)
    check_policy(cfg)
    assert cfg.node.id == service == svc["hostname"]
    assert cfg.node.http.host == service  # peers reach it by its service name
    published = [p.split(":") for p in svc["ports"]]
    assert [int(c) for _, c in published] == [cfg.node.http.port]
    (vol,) = svc["volumes"]
    assert vol.split(":")[1] == env["PARAMSTORE_DATA_DIR"] and vol.split(":")[0] in doc["volumes"]
    assert svc["healthcheck"]["test"][-1].count("/readyz") == 1


# ---- Dockerfile ------------------------------------------------------------------------
def test_dockerfile():
    p = DockerfileParser(str(DEPLOY / "Dockerfile"))
    assert p.baseimage.startswith("python:3.11-slim")
    instr = [(s["instruction"], s["value"]) for s in p.structure if s["instruction"] != "COMMENT"]
    users = [v for i, v in instr if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(i == "HEALTHCHECK" and "/readyz" in v for i, v in instr)
    assert json.loads([v for i, v in instr if i == "ENTRYPOINT"][-1]) == ["paramstore"]
    assert json.loads([v for i, v in instr if i == "CMD"][-1]) == ["serve"]
    assert json.loads([v for i, v in instr if i == "VOLUME"][-1]) == ["/var/lib/paramstore"]
    assert any(i == "RUN" and 'pip install ".[server]"' in v for i, v in instr)  # the client alone cannot serve
    for i, v in instr:  # every COPY source exists in the build context (the repository root)
        if i == "COPY":
            for src in shlex.split(v)[:-1]:
                assert (ROOT / src).exists(), src
    # the image's uid is the one the StatefulSet runs as
    sts = k8s_object("StatefulSet")
    assert int(users[-1].split(":")[0]) == sts["spec"]["template"]["spec"]["securityContext"]["runAsUser"]


# ---- systemd -------------------------------------------------------------------------
def test_systemd_unit_runs_the_real_cli_with_the_example_config(tmp_path):
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(DEPLOY / "systemd" / "paramstore@.service")
    service = unit["Service"]
    assert service["User"] != "root" and service["KillSignal"] == "SIGTERM"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    argv = shlex.split(service["ExecStart"].replace("%i", "n2"))
    assert argv[0].endswith("/paramstore") and argv[1] == "serve"
    parser = argparse.ArgumentParser()
    for flag in ("--config", "--node", "--data-dir"):
        parser.add_argument(flag)
    args = parser.parse_args(argv[2:])
    assert args.config == "/etc/paramstore/cluster.toml" and args.node == "n2"
    assert args.data_dir == "/var/lib/" + service["StateDirectory"].replace("%i", "n2")
    env_example = dict(
        line.split("=", 1)
        for line in (DEPLOY / "systemd" / "env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    cfg = load_config(
        DEPLOY / "systemd" / "cluster.toml",
        env=env_example,
        overrides={"node.id": args.node, "node.data_dir": str(tmp_path)},
    )
    assert cfg.node.id == "n2" and not cfg.all_loopback()
    assert cfg.raft.password and cfg.auth.write_tokens  # both required: the nodes are not on loopback
    check_policy(cfg)
