"""The exceptions the client raises, one per kind of answer a caller handles differently."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

__all__ = [
    "AuthError",
    "ConflictError",
    "InvalidError",
    "NotFoundError",
    "ParamStoreError",
    "PreconditionFailedError",
    "UnavailableError",
    "error_from",
]


class ParamStoreError(Exception):
    """Any error the store reported; `status`, `code` and `body` are the HTTP answer."""

    def __init__(
        self, detail: str, status: int | None = None, code: str | None = None, body: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(f"{code or 'error'} ({status}): {detail}" if status else detail)
        self.detail = detail
        self.status = status
        self.code = code
        self.body: dict[str, Any] = dict(body or {})


class NotFoundError(ParamStoreError):
    """404: the tensor does not exist."""


class PreconditionFailedError(ParamStoreError):
    """412: If-Match / If-None-Match did not hold."""

    @property
    def current_version(self) -> int | None:
        return self.body.get("current_version")


class ConflictError(ParamStoreError):
    """409: e.g. a gradient staler than the tensor's max_staleness."""

    @property
    def current_version(self) -> int | None:
        return self.body.get("current_version")


class InvalidError(ParamStoreError):
    """400 / 406 / 413 / 415 / 422: the request itself is wrong; retrying will not help."""


class UnavailableError(ParamStoreError):
    """No replica answered usefully before the deadline (the last cause is chained;
    `status` is the last answer's: 503, 408, or None when none answered)."""


class AuthError(ParamStoreError):
    """401 / 403: missing or invalid token, or a read-only token writing."""


_BY_STATUS: dict[int, type[ParamStoreError]] = {
    400: InvalidError,
    401: AuthError,
    403: AuthError,
    404: NotFoundError,
    406: InvalidError,
    409: ConflictError,
    412: PreconditionFailedError,
    413: InvalidError,
    415: InvalidError,
    422: InvalidError,
    408: UnavailableError,
    503: UnavailableError,
}


def error_from(r: httpx.Response) -> ParamStoreError:
    """The typed error for a non-success answer (its JSON error body, if any)."""
    try:
        body = r.json()
        if not isinstance(body, dict):
            body = {}
    except ValueError:
        body = {}
    detail = str(body.get("detail") or r.text[:500] or r.reason_phrase)
    cls = _BY_STATUS.get(r.status_code, ParamStoreError)
    return cls(detail, status=r.status_code, code=body.get("error"), body=body)
