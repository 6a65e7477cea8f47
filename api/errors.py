"""The one place where errors become HTTP statuses and JSON bodies, and the
errors only the HTTP layer raises (credentials, media types, body size, the
caller's own waits)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Match

from store import errors as e
from store.refusals import clip

log = logging.getLogger(__name__)


class HttpError(e.StoreError):
    """A refusal only the HTTP layer makes. Never replicated; answered with
    the same JSON body as the store's errors."""


class WaitExpired(HttpError):
    """A wait the request itself asked for (min_version, X-Min-Versions, a
    barrier within the caller's `timeout`) ran out. Not 503: the server is
    fine, the caller's condition did not hold in the caller's time."""

    code = "wait_timeout"


class Unauthorized(HttpError):
    """No valid credentials (HTTP 401 with WWW-Authenticate)."""

    code = "unauthorized"


class Forbidden(HttpError):
    """Valid credentials without the needed scope (a read token writing)."""

    code = "forbidden"


class UnsupportedMediaType(HttpError):
    code = "unsupported_media_type"


class NotAcceptable(HttpError):
    code = "not_acceptable"


class PayloadTooLarge(HttpError):
    code = "payload_too_large"


STATUS: dict[type[e.StoreError], int] = {
    e.InvalidRequest: 400,
    Unauthorized: 401,
    Forbidden: 403,
    e.NotFound: 404,
    NotAcceptable: 406,
    e.AlreadyExists: 409,
    e.Conflict: 409,
    e.Gone: 410,
    e.PreconditionFailed: 412,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    e.Unprocessable: 422,
    WaitExpired: 408,
    e.Unavailable: 503,
    e.Timeout: 503,
    e.CorruptData: 500,
}


def status_of(err: e.StoreError) -> int:
    for cls in type(err).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


# Where an error's detail quotes the input it refuses, the quote is cut to
# 200 bytes (store.errors.echo); this is only the backstop for a detail that
# quotes more than once or through an exception's text.
MAX_DETAIL = 2000


def error_response(err: e.StoreError, request: Request | None = None, extra: dict[str, Any] | None = None) -> Response:
    """The HTTP answer for `err`; `extra` adds fields to the JSON body (e.g.
    the partial results of a batch)."""
    hosts = err.extra.get("hosts") if isinstance(err, e.NotHosted) else None
    if request is not None and isinstance(hosts, list) and hosts:  # NotHosted names its hosts' URLs
        target = str(hosts[0]).rstrip("/") + request.url.path
        if request.url.query:
            target += "?" + request.url.query
        return RedirectResponse(target, status_code=307)
    status = status_of(err)
    fields: dict[str, Any] = {"status": status}
    if request is not None:
        fields.update(path=request.url.path, request_id=request.headers.get("x-request-id"))
    detail = clip(err.detail, MAX_DETAIL)
    if status >= 500 and not isinstance(err, e.Unavailable):
        log.error("internal error: %s", detail, extra=fields)
    elif status == 503:
        log.warning("unavailable: %s", detail, extra=fields)
    headers = {}
    if isinstance(err, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="paramstore"'
    if isinstance(err, e.Unavailable):
        headers["Retry-After"] = str(max(1, round(err.retry_after)))
    return JSONResponse({**err.to_dict(), "detail": detail, **(extra or {})}, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(e.StoreError)
    async def _store_error(request: Request, exc: e.StoreError) -> Response:
        return error_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg')}")
        detail = clip("; ".join(parts), MAX_DETAIL)
        return JSONResponse({"error": e.InvalidRequest.code, "detail": detail}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(request)
        detail = clip(str(exc.detail), MAX_DETAIL)
        return JSONResponse({"error": code, "detail": detail}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        return disconnect_response(request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        return unexpected_error_response(request, exc)


def allowed_methods(request: Request) -> str:
    """Every method some route serves at this path: Starlette's 405 names
    only the first route whose path matched."""
    methods: set[str] = set()
    for route in _leaf_routes(request.app.router.routes):
        match, _ = route.matches({**request.scope, "method": "\0"})
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


def _leaf_routes(routes: list[BaseRoute]) -> Iterator[BaseRoute]:
    """FastAPI >= 0.130 keeps an included router's routes behind a wrapper
    (our routers are included without a prefix, so their paths are the app's)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _leaf_routes(inner.routes)
        else:
            yield route


def disconnect_response(request: Request) -> Response:
    """The client left (or api/slow_clients.py cut it off) mid-body: nobody
    reads this answer, and it is not a server error."""
    log.info("client disconnected during %s %s", request.method, request.url.path)
    return JSONResponse({"error": e.InvalidRequest.code, "detail": "client disconnected"}, status_code=400)


def unexpected_error_response(request: Request, exc: Exception) -> Response:
    """A bug: logged with its traceback, answered as a JSON 500."""
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    detail = clip(f"{type(exc).__name__}: {exc}", MAX_DETAIL)
    return JSONResponse({"error": "internal", "detail": detail}, status_code=500)
