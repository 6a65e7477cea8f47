"""Bearer-token authentication with read and write scopes.

Tokens come from the config (`[auth] read_tokens`, `write_tokens`) or the
environment (PARAMSTORE_READ_TOKENS, PARAMSTORE_WRITE_TOKENS, comma-separated).
Every token is compared in constant time. Probes (/healthz, /readyz),
/metrics, the /ui page itself and its (empty) favicon stay open; everything else needs a token: GET/HEAD (and a
table lookup, a POST that only reads) a read or write token, any other method a write token.
"""

from __future__ import annotations

import hmac
import logging

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from store.config import Config
from store.errors import ConfigError, StoreError

from .errors import Forbidden, Unauthorized, error_response

log = logging.getLogger(__name__)

OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/ui", "/favicon.ico")  # /ui holds no data; its fetches send the token
READ_METHODS = ("GET", "HEAD", "OPTIONS")


def check_policy(cfg: Config) -> None:
    """A served replica needs tokens, unless explicitly insecure on loopback."""
    if cfg.auth.enabled:
        return
    if not cfg.auth.insecure_no_auth:
        raise ConfigError(
            "auth.write_tokens: no API tokens configured; set PARAMSTORE_WRITE_TOKENS "
            "(and PARAMSTORE_READ_TOKENS), or auth.insecure_no_auth = true on loopback"
        )
    if not cfg.all_loopback():
        raise ConfigError("auth.insecure_no_auth: only allowed when every node address is loopback")
    log.warning("API authentication is OFF (auth.insecure_no_auth): loopback development only")


def _matches(token: bytes, candidates: tuple[str, ...]) -> bool:
    found = False
    for c in candidates:  # no early exit: time does not depend on which token matched
        found |= hmac.compare_digest(token, c.encode())
    return found


class TokenPolicy:
    def __init__(self, cfg: Config) -> None:
        self.read = cfg.auth.read_tokens
        self.write = cfg.auth.write_tokens

    def refusal(self, authorization: str | None, method: str) -> StoreError | None:
        """Why a request with this Authorization header may not use `method`,
        or None if it may."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return Unauthorized("a bearer token is required (Authorization: Bearer <token>)")
        raw = token.strip().encode()
        can_write = _matches(raw, self.write)
        can_read = can_write or _matches(raw, self.read)
        if not can_read:
            return Unauthorized("the bearer token is not valid")
        if method not in READ_METHODS and not can_write:
            return Forbidden("this token may only read")
        return None


class BearerAuth:
    def __init__(self, app: ASGIApp, cfg: Config) -> None:
        self.app = app
        self.policy = TokenPolicy(cfg)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        err = self.policy.refusal(_authorization(scope), _access(scope["method"], scope["path"]))
        if err is None:
            return await self.app(scope, receive, send)
        await error_response(err, Request(scope))(scope, receive, send)


def _access(method: str, path: str) -> str:
    """The method a request counts as: a table lookup is a POST (its IDs are a
    body) that only reads, so a read token may send it."""
    if method == "POST" and path.startswith("/v1/tables/") and path.endswith(":lookup"):
        return "GET"
    return method


def _authorization(scope: Scope) -> str | None:
    """The first Authorization header, as Starlette's `Headers.get` finds it
    (without building a `Headers` for every request)."""
    key: bytes  # ASGI headers are (bytes, bytes) pairs; declared only for the type checker
    value: bytes
    for key, value in scope["headers"]:
        if key == b"authorization":
            return value.decode("latin-1")
    return None
