"""A lean route for the hottest request: `POST /v1/tensors/{name}/grad`.

Every trainer sends it every step. Through FastAPI it also pays for matching
every route, solving dependencies, telemetry and the exception middleware.
This ASGI middleware recognises exactly that path, calls the same handler
(`tensors.push_grad`) and answers errors through the same `error_response`;
every other request goes on to FastAPI. Auth and metrics wrap it as before.
"""
from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from store.errors import StoreError

from . import tensors
from .errors import error_response, unexpected_error_response

PREFIX, SUFFIX = "/v1/tensors/", "/grad"


class GradFastPath:
    def __init__(self, app: ASGIApp, routes: list) -> None:
        self.app = app
        # metrics label requests by their route template: keep that identical
        self.route = next(r for r in routes if getattr(r, "endpoint", None) is tensors.push_grad)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] != "POST" or not path.endswith(SUFFIX) \
                or not path.startswith(PREFIX):
            return await self.app(scope, receive, send)
        name = path[len(PREFIX):-len(SUFFIX)]
        if not name or "/" in name:  # not what the {name} route would match either
            return await self.app(scope, receive, send)
        scope["route"] = self.route
        scope["path_params"] = {"name": name}
        request = Request(scope, receive)
        try:
            response = await tensors.push_grad(name, request)
        except StoreError as err:
            response = error_response(err, request)
        except Exception as exc:
            response = unexpected_error_response(request, exc)
        await response(scope, receive, send)
