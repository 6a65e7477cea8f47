"""The hottest request, `POST /v1/tensors/{name}/grad`, without the ASGI stack.

Every trainer sends it every step. Served through FastAPI, a 1 KB push spent
more of a replica's CPU in the layers around the handler (Starlette's error
and telemetry middleware, the metrics and auth middleware with their wrapped
`send`/`receive`, a `Request`, a `JSONResponse`, label lookups) than in the
handler itself (bench.profile). `ParamstoreApp` (api/app.py) hands exactly
this path to `GradFastPath` before FastAPI sees the request. The push itself
is `tensors.apply_grad`, the code the documented route runs too; errors are
answered by `errors.response_for`; the token check and the HTTP metrics are
those of the auth and metrics middleware.
"""
from __future__ import annotations

import time
from typing import Any, AsyncIterator

from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive, Scope, Send

from store.node import Store

from . import tensors, wire
from .auth import TokenPolicy
from .errors import response_for
from .metrics import HttpMetrics

PREFIX, SUFFIX = "/v1/tensors/", "/grad"
TEMPLATE = PREFIX + "{name}" + SUFFIX  # the route's template: metrics label both alike


def grad_target(scope: Scope) -> str | None:
    """The tensor name if `scope` is a gradient push this module serves."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return None
    path = scope["path"]
    if not path.endswith(SUFFIX) or not path.startswith(PREFIX):
        return None
    name = path[len(PREFIX):-len(SUFFIX)]
    return name if name and "/" not in name else None  # what the {name} route would match


class GradFastPath:
    def __init__(self, store: Store, metrics: HttpMetrics, policy: TokenPolicy | None) -> None:
        self.store = store
        self.metrics = metrics
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send, name: str) -> None:
        started = time.perf_counter()
        headers: dict[str, str] = {}
        for key, value in reversed(scope["headers"]):  # the first of repeated headers wins, like Starlette
            headers[key.decode("latin-1")] = value.decode("latin-1")
        received = 0

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal received
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect()
                chunk = message.get("body", b"")
                received += len(chunk)
                yield chunk
                if not message.get("more_body", False):
                    return

        store = self.store
        limit = store.cfg.limits.max_body_bytes
        try:
            if self.policy is not None:
                refusal = self.policy.refusal(headers.get("authorization"), "POST")
                if refusal is not None:
                    raise refusal
            result = await tensors.apply_grad(
                store, name, headers,
                lambda forward: wire.read_stream(headers.get("content-length"), chunks(), limit, forward))
        except Exception as exc:
            response = response_for(exc, Request(scope, receive))
            await response(scope, receive, send)
            self._record(response.status_code, started, received, len(response.body))
            return
        body = tensors.written_body(result)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-length", str(len(body)).encode()), (b"content-type", b"application/json"),
            *((k.lower().encode(), v.encode()) for k, v in tensors.written_headers(result).items())]})
        await send({"type": "http.response.body", "body": body})
        self._record(200, started, received, len(body))

    def _record(self, status: int, started: float, received: int, sent: int) -> None:
        self.metrics.record("POST", TEMPLATE, status, time.perf_counter() - started, received, sent)


def fast_path_for(app: Any) -> GradFastPath:
    """Built once per app from what create_app put in its state."""
    return GradFastPath(app.state.store, app.state.http_metrics, app.state.token_policy)
