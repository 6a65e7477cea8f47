"""api/ depends on store/ through one typed interface, `StoreAPI`
(store/interface.py), which `Store` implements."""

import ast
import inspect
from pathlib import Path

import pytest

from store.config import config_from_mapping
from store.interface import StoreAPI
from store.node import Store
from tests.helpers.apps import cluster_secret
from tests.ports import free_range

API = Path(__file__).resolve().parents[2] / "api"
COMPOSITION_ROOTS = {"app.py", "server.py"}  # they build the Store that the rest only calls
STORE_INTERNALS = {
    "store.raft",
    "store.applier",
    "store.shardhost",
    "store.routing",
    "store.staging",
    "store.member_admin",
    "store.joining",
    "store.status",
}
INTERNAL_ATTRIBUTES = {"applier", "replica", "routing", "staging", "admin", "peer_client", "datapath"}


def interface_members() -> list[str]:
    return sorted(n for n in vars(StoreAPI) if not n.startswith("_"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    base = free_range(8)
    cfg = config_from_mapping(
        {
            "cluster": {"shards": 2, "replication": 1},
            "nodes": [{"id": "n0", "http": f"127.0.0.1:{base}", "raft": f"127.0.0.1:{base + 1}"}],
            "node": {"id": "n0", "data_dir": str(tmp_path_factory.mktemp("boundary"))},
            "raft": {"password": cluster_secret()},
        }
    )
    s = Store(cfg)  # built, not started: nothing here needs Raft
    yield s
    s.close()


def test_store_has_every_interface_member_with_the_same_signature(store):
    members = interface_members()
    assert {"capture", "shard_stats", "hosted_shards", "write", "status"} <= set(members)
    for name in members:
        declared = inspect.getattr_static(StoreAPI, name)
        assert hasattr(store, name), f"Store lacks {name}"
        if isinstance(declared, property):
            assert not callable(getattr(store, name)), name
            continue
        want = inspect.signature(declared)
        got = inspect.signature(getattr(Store, name))
        assert [(p.name, p.kind, p.default) for p in got.parameters.values()] == [
            (p.name, p.kind, p.default) for p in want.parameters.values()
        ], name
        assert got.return_annotation == want.return_annotation, name


def test_the_interface_reports_hosted_shards_without_internals(store):
    assert store.hosted_shards() == [0, 1]
    assert store.shard_stats() == []  # replicas not started: nothing to report yet
    assert [s["shard"] for s in store.status()["shards"]] == [0, 1]


def _api_modules():
    return sorted(p for p in API.glob("*.py"))


@pytest.mark.parametrize("path", _api_modules(), ids=lambda p: p.name)
def test_api_reaches_the_store_only_through_the_interface(path):
    tree = ast.parse(path.read_text())
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module in STORE_INTERNALS or (node.module == "store.node" and path.name not in COMPOSITION_ROOTS):
                problems.append(f"line {node.lineno}: imports {node.module}")
            if node.module == "store":
                problems += [
                    f"line {node.lineno}: imports store.{a.name}"
                    for a in node.names
                    if f"store.{a.name}" in STORE_INTERNALS
                ]
        if not isinstance(node, ast.Attribute):
            continue
        base = ast.unparse(node.value)
        if node.attr in INTERNAL_ATTRIBUTES:
            problems.append(f"line {node.lineno}: {base}.{node.attr}")
        elif node.attr == "shards" and base.split(".")[-1] in ("store", "the_store"):
            problems.append(f"line {node.lineno}: {base}.shards (use hosted_shards())")
        elif node.attr == "state" and base.split(".")[-1] != "app":
            problems.append(f"line {node.lineno}: {base}.state (only app.state is api/'s own)")
    assert not problems, f"{path.name} reaches into store internals: {problems}"
