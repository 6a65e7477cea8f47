"""One-replica stores for API tests: the raw config and the app around a real store."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from api.app import create_app
from store.config import config_from_mapping
from tests.ports import free_range


def cluster_secret() -> str:
    """A fresh secret for one test's cluster (raft.password: every replica needs one)."""
    return secrets.token_hex(16)


def raw_config(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    """A one-shard, one-replica config mapping on free loopback ports; `extra` replaces whole sections."""
    base = free_range(4)
    raw: dict[str, Any] = {
        "cluster": {"shards": 1, "replication": 1},
        "nodes": [
            {"id": "n1", "http": f"127.0.0.1:{base}", "raft": f"127.0.0.1:{base + 1}", "data": f"127.0.0.1:{base + 2}"}
        ],
        "node": {"id": "n1", "data_dir": str(tmp_path / "data")},
        "raft": {"password": cluster_secret()},
    }
    raw.update(extra)
    return raw


def single_node_app(tmp_path: Path, nodes: int = 1, limits: dict[str, Any] | None = None) -> FastAPI:
    """The app of replica n0 of a `nodes`-node, 2-shard config (the other nodes are never started)."""
    base = free_range(8 * nodes)
    raw = {
        "cluster": {"shards": 2, "replication": nodes},
        "nodes": [
            {"id": f"n{i}", "http": f"127.0.0.1:{base + 8 * i}", "raft": f"127.0.0.1:{base + 8 * i + 1}"}
            for i in range(nodes)
        ],
        "node": {"id": "n0", "data_dir": str(tmp_path / "n0")},
        "raft": {"password": cluster_secret()},
        "limits": {"max_body_bytes": 1 << 20, "request_timeout": 1.5, **(limits or {})},
    }
    return create_app(config_from_mapping(raw))
