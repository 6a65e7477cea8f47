"""api/fastpath.py serves gradient pushes without FastAPI's routing, inside
the app's middleware stack: it must answer exactly like the documented route
does, errors, auth and metrics included, and middleware added to the app must
run for it."""

import numpy as np
import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from api.app import create_app
from api.fastpath import GradFastPath
from store.config import config_from_mapping
from tests.helpers.apps import raw_config, single_node_app
from tests.waiting import wait_until

RAW = {"Content-Type": "application/octet-stream"}


def without_fast_path(app: FastAPI) -> FastAPI:
    """A second app on the same store whose gradient pushes take the
    documented route (the router's own dispatch, unwrapped)."""
    store = app.state.store
    plain = create_app(store.cfg, store)
    fast = plain.router.middleware_stack
    assert isinstance(fast, GradFastPath)
    plain.router.middleware_stack = fast.app
    return plain


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    app = single_node_app(tmp_path_factory.mktemp("fast"))
    with TestClient(app) as fast:
        wait_until(lambda: fast.get("/readyz").status_code == 200, 15, "single replica ready")
        w = np.zeros(4, np.float32).tobytes()
        r = fast.put(
            "/v1/tensors/w",
            content=w,
            headers={**RAW, "X-Dtype": "float32", "X-Shape": "4", "X-Optimizer": '{"type": "sgd", "lr": 1.0}'},
        )
        assert r.status_code == 201, r.text
        yield fast, TestClient(without_fast_path(app))


def _grad(values=(1, 2, 3, 4), dtype=np.float32):
    return np.asarray(values, dtype).tobytes()


CASES = [
    ("ok", "w", _grad(), RAW),
    ("unknown tensor", "nope", _grad(), RAW),
    ("wrong size", "w", _grad((1, 2, 3)), RAW),
    ("unsupported type", "w", b"{}", {"Content-Type": "text/plain"}),
    ("bad base version", "w", _grad(), {**RAW, "X-Base-Version": "soon"}),
    ("bad if-match", "w", _grad(), {**RAW, "If-Match": "x"}),
    ("stale if-match", "w", _grad(), {**RAW, "If-Match": '"999"'}),
    ("too large", "w", b"\0" * ((1 << 20) + 4), RAW),
    ("nan", "w", _grad((1, np.nan, 0, 0)), RAW),
    ("bad name", "w%20x", _grad(), RAW),
]


@pytest.mark.parametrize("label,name,body,headers", CASES, ids=[c[0] for c in CASES])
def test_fast_path_answers_like_the_route(both, label, name, body, headers):
    fast, plain = both
    a = fast.post(f"/v1/tensors/{name}/grad", content=body, headers=headers)
    b = plain.post(f"/v1/tensors/{name}/grad", content=body, headers=headers)
    assert a.status_code == b.status_code, (a.text, b.text)
    assert a.headers["content-type"] == b.headers["content-type"] == "application/json"
    ja, jb = a.json(), b.json()
    if a.status_code == 200:
        assert jb["version"] == ja["version"] + 1  # both applied, one after the other
        assert a.headers["etag"] == f'"{ja["version"]}"' and a.headers["x-version"] == str(ja["version"])
        ja.pop("version"), jb.pop("version")
    else:
        assert a.status_code in (400, 404, 412, 413, 415, 422), a.text
    assert ja == jb


def test_fast_path_applies_the_gradient_and_counts_it(both):
    fast, _ = both
    before = np.frombuffer(fast.get("/v1/tensors/w").content, np.float32).copy()
    r = fast.post("/v1/tensors/w/grad", content=_grad((1, 1, 1, 1)), headers={**RAW, "X-Request-Id": "fast-1"})
    assert r.status_code == 200
    again = fast.post("/v1/tensors/w/grad", content=_grad((1, 1, 1, 1)), headers={**RAW, "X-Request-Id": "fast-1"})
    assert again.json()["duplicate"] is True and again.json()["version"] == r.json()["version"]
    after = np.frombuffer(fast.get("/v1/tensors/w").content, np.float32)
    np.testing.assert_array_equal(after, before - 1)  # sgd, lr 1, applied once
    metrics = fast.get("/metrics").text
    line = next(
        ln
        for ln in metrics.splitlines()
        if ln.startswith("paramstore_http_requests_total{")
        and 'route="/v1/tensors/{name}/grad"' in ln
        and 'status="200"' in ln
    )
    assert float(line.rsplit(" ", 1)[1]) >= 2
    assert 'paramstore_http_request_bytes_total{method="POST",route="/v1/tensors/{name}/grad"}' in metrics


def test_fast_path_enforces_tokens(tmp_path):
    cfg = config_from_mapping(
        raw_config(tmp_path, auth={"read_tokens": ["reader-tok"], "write_tokens": ["writer-tok"]})
    )
    with TestClient(create_app(cfg)) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, 15, "replica ready")
        auth = {"Authorization": "Bearer writer-tok"}
        assert (
            c.put(
                "/v1/tensors/w", content=_grad(), headers={**RAW, **auth, "X-Dtype": "float32", "X-Shape": "4"}
            ).status_code
            == 201
        )
        r = c.post("/v1/tensors/w/grad", content=_grad(), headers=RAW)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        assert r.headers["www-authenticate"].startswith("Bearer")
        r = c.post("/v1/tensors/w/grad", content=_grad(), headers={**RAW, "Authorization": "Bearer reader-tok"})
        assert r.status_code == 403
        assert c.get("/v1/tensors/w", headers=auth).headers["x-version"] == "1"  # nothing applied
        assert c.post("/v1/tensors/w/grad", content=_grad(), headers={**RAW, **auth}).status_code == 200


def test_gradient_pushes_skip_the_routes(both):
    fast, _ = both
    stack = fast.app.router.middleware_stack
    assert isinstance(stack, GradFastPath)
    routed = []
    dispatch = stack.app

    async def spy(scope, receive, send) -> None:
        routed.append((scope["method"], scope["path"]))
        await dispatch(scope, receive, send)

    stack.app = spy
    try:
        assert fast.post("/v1/tensors/w/grad", content=_grad((0, 0, 0, 0)), headers=RAW).status_code == 200
        assert fast.post("/v1/tensors/w/grad", content=b"{}", headers={"Content-Type": "text/plain"}).status_code == 415
        assert fast.get("/v1/tensors/w").status_code == 200
    finally:
        stack.app = dispatch
    assert routed == [("GET", "/v1/tensors/w")]


class Tagging:
    """A pure ASGI middleware as an operator might add (tracing, rate limits):
    notes each request and tags each response."""

    def __init__(self, app, seen: list) -> None:
        self.app = app
        self.seen = seen

    async def __call__(self, scope, receive, send) -> None:
        async def tagged(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-tagged", b"1")]}
            await send(message)

        await self.app(scope, receive, tagged)
        if scope["type"] == "http":
            self.seen.append((scope["method"], getattr(scope.get("route"), "path", None)))


def test_middleware_added_to_the_app_runs_on_gradient_pushes(tmp_path):
    app = single_node_app(tmp_path)
    seen: list = []
    app.add_middleware(Tagging, seen=seen)
    with TestClient(app) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, 15, "single replica ready")
        assert (
            c.put("/v1/tensors/m", content=_grad(), headers={**RAW, "X-Dtype": "float32", "X-Shape": "4"}).status_code
            == 201
        )
        seen.clear()
        ok = c.post("/v1/tensors/m/grad", content=_grad(), headers=RAW)
        refused = c.post("/v1/tensors/m/grad", content=b"{}", headers={"Content-Type": "text/plain"})
    assert ok.status_code == 200 and ok.headers["x-tagged"] == "1"
    assert refused.status_code == 415 and refused.headers["x-tagged"] == "1"
    assert refused.json()["error"] == "unsupported_media_type"
    assert seen == [("POST", "/v1/tensors/{name}/grad")] * 2
