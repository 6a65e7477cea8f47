"""The hottest request, `POST /v1/tensors/{name}/grad`, without FastAPI's
routing and dependency solving.

Every trainer sends it every step. Served as a FastAPI route, a 1 KB push
spent more of a replica's CPU in route matching, dependency solving, a
`Request` and a `JSONResponse` than in the handler (bench.profile). So
`GradFastPath` sits between the router and its routes: it serves this one
path itself and hands everything else to the routes. It is still inside the
app's whole middleware stack (auth, metrics, error handlers, and any
middleware added later run for it as for every route), it sets the scope's
`route` and `path_params` as the router would, and its errors propagate to
the same exception handlers (api/errors.py). The push itself is
`tensors.apply_grad`, the code the documented route runs too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from store.interface import StoreAPI

from . import tensors, wire

PREFIX, SUFFIX = "/v1/tensors/", "/grad"
TEMPLATE = PREFIX + "{name}" + SUFFIX  # the documented route's path


def grad_target(scope: Scope) -> str | None:
    """The tensor name if `scope` is a gradient push this module serves."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return None
    path = scope["path"]
    if not path.endswith(SUFFIX) or not path.startswith(PREFIX):
        return None
    name = path[len(PREFIX) : -len(SUFFIX)]
    return name if name and "/" not in name else None  # what the {name} route would match


class GradFastPath:
    def __init__(self, app: ASGIApp, store: StoreAPI, route: APIRoute) -> None:
        self.app = app  # the router's own dispatch
        self.store = store
        self.route = route
        self.limit = store.cfg.limits.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = grad_target(scope)
        if name is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route  # what the router sets on a match (metrics label by it)
        scope["endpoint"] = self.route.endpoint
        scope["path_params"] = {"name": name}
        headers: dict[str, str] = {}
        for key, value in reversed(scope["headers"]):  # the first of repeated headers wins, like Starlette
            headers[key.decode("latin-1")] = value.decode("latin-1")

        async def chunks() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect()
                yield message.get("body", b"")
                if not message.get("more_body", False):
                    return

        result = await tensors.apply_grad(
            self.store,
            name,
            headers,
            lambda forward: wire.read_stream(headers.get("content-length"), chunks(), self.limit, forward),
        )
        body = tensors.written_body(result)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-length", str(len(body)).encode()),
                    (b"content-type", b"application/json"),
                    *((k.lower().encode(), v.encode()) for k, v in tensors.written_headers(result).items()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def install(app: FastAPI, store: StoreAPI) -> None:
    """Put the fast path in front of the routes of `app` (which includes
    `tensors.router`): inside the router, so inside every middleware."""
    route = next(r for r in tensors.router.routes if isinstance(r, APIRoute) and r.endpoint is tensors.push_grad)
    if route.path != TEMPLATE or route.methods != {"POST"}:
        raise RuntimeError(f"api/fastpath.py serves POST {TEMPLATE}, but the route is {route.methods} {route.path}")
    app.router.middleware_stack = GradFastPath(app.router.middleware_stack, store, route)
