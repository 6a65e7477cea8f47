import pytest
from starlette.testclient import TestClient

from tests.helpers.apps import single_node_app
from tests.waiting import wait_until


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """One real single-replica store (pysyncobj with no peers) behind the app."""
    app = single_node_app(tmp_path_factory.mktemp("api"))
    with TestClient(app) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, 15, "single replica ready")
        yield c
