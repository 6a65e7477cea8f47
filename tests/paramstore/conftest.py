"""Fixtures of the client tests: one dev cluster shared by every test in this folder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from paramstore import Client
from tests.paramstore.devcluster import DevCluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevCluster]:
    """Session-wide: starting 3 replicas is the slow part; each test uses its own tensor names."""
    c = DevCluster(tmp_path_factory.mktemp("client-cluster"))
    try:
        c.wait_ready()
        yield c
    finally:
        c.close()


@pytest.fixture
def ps(cluster: DevCluster) -> Iterator[Client]:
    with Client(cluster.urls, timeout=5.0, deadline=20.0) as c:
        yield c
