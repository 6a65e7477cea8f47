import pytest
from starlette.testclient import TestClient

from api.app import create_app
from store.config import config_from_mapping
from tests.ports import free_range
from tests.waiting import wait_until


def single_node_app(tmp_path, nodes: int = 1, limits: dict | None = None):
    base = free_range(8 * nodes)
    raw = {
        "cluster": {"shards": 2, "replication": nodes},
        "nodes": [{"id": f"n{i}", "http": f"127.0.0.1:{base + 8 * i}", "raft": f"127.0.0.1:{base + 8 * i + 1}"}
                  for i in range(nodes)],
        "node": {"id": "n0", "data_dir": str(tmp_path / "n0")},
        "limits": {"max_body_bytes": 1 << 20, "request_timeout": 1.5, **(limits or {})},
    }
    return create_app(config_from_mapping(raw))


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """One real single-replica store (pysyncobj with no peers) behind the app."""
    app = single_node_app(tmp_path_factory.mktemp("api"))
    with TestClient(app) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, 15, "single replica ready")
        yield c
