"""Loading deploy/ files, and turning the StatefulSet into a loopback replica set."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"


def k8s_docs() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path, doc))
    return out


def k8s_object(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in k8s_docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(sts: dict) -> dict:
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    return c


def pod_env(sts: dict, pod_name: str) -> dict[str, str]:
    """The environment the StatefulSet gives pod `pod_name`: literal values,
    the downward API's metadata.name, and Secret keys (from secret.yaml)."""
    env = {}
    for e in container(sts).get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
            continue
        src = e["valueFrom"]
        if "fieldRef" in src:
            assert src["fieldRef"]["fieldPath"] == "metadata.name", src
            env[e["name"]] = pod_name
        elif "secretKeyRef" in src:
            ref = src["secretKeyRef"]
            secret = k8s_object("Secret", ref["name"])
            if ref["key"] in secret.get("stringData", {}):
                env[e["name"]] = secret["stringData"][ref["key"]]
            else:
                env[e["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        else:
            raise AssertionError(f"unsupported env source {src}")
    return env


def mounted_config(sts: dict) -> tuple[str, dict[str, str]]:
    """(mount path, {file: text}) of the ConfigMap volume the container mounts."""
    spec = sts["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for m in container(sts)["volumeMounts"]:
        v = volumes.get(m["name"])
        if v and "configMap" in v:
            return m["mountPath"], k8s_object("ConfigMap", v["configMap"]["name"])["data"]
    raise AssertionError("no ConfigMap volume mounted")


def named_port(sts: dict, name: str) -> int:
    for p in container(sts)["ports"]:
        if p["name"] == name:
            return p["containerPort"]
    raise AssertionError(f"no container port named {name}")


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())
