"""Every failure the store reports is one of these types.

`api/errors.py` maps each type (and the few the HTTP layer adds) to an HTTP
status in one place; `code` is the stable machine-readable name that goes
into error bodies.
"""

from __future__ import annotations

from typing import Any

ECHO_BYTES = 200  # the most of its input an error message quotes


def echo(value: object, limit: int = ECHO_BYTES) -> str:
    """`value` (input being refused) as an error message quotes it: its repr,
    cut to `limit` bytes of UTF-8 (whole characters), so that an answer or a
    log line never echoes kilobytes; the message's own words stay whole."""
    text = repr(value)
    raw = text.encode("utf-8", "backslashreplace")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", "ignore") + f"... ({len(raw)} bytes)"


class StoreError(Exception):
    code = "store_error"

    def __init__(self, detail: str, **extra: object) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.code, "detail": self.detail, **self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreError:
        """Rebuild an error recorded in replicated state (idempotent retries)."""
        kind = _BY_CODE.get(d.get("error", ""), StoreError)
        extra = {k: v for k, v in d.items() if k not in ("error", "detail")}
        return kind(str(d.get("detail", "")), **extra)


class InvalidRequest(StoreError):
    """Malformed input: a header or parameter that cannot be parsed."""

    code = "invalid_request"


class NotFound(StoreError):
    code = "not_found"


class AlreadyExists(StoreError):
    code = "already_exists"


class PreconditionFailed(StoreError):
    """If-Match / If-None-Match did not hold; carries `current_version`."""

    code = "precondition_failed"


class Conflict(StoreError):
    """A version conflict that is not a precondition, e.g. a too-stale push."""

    code = "conflict"


class Unprocessable(StoreError):
    """Well-formed but wrong: dtype, shape, size mismatch, non-finite values."""

    code = "unprocessable"


class Unavailable(StoreError):
    """No leader reachable, or the replica is not ready, within the deadline."""

    code = "unavailable"

    def __init__(self, detail: str, retry_after: float = 1.0, **extra: object) -> None:
        super().__init__(detail, **extra)
        self.retry_after = retry_after


class Timeout(Unavailable):
    """The operation's outcome is unknown: it may still be applied later."""

    code = "timeout"


class NotHosted(StoreError):
    """The tensor's shard is not hosted on this replica; carries `hosts`."""

    code = "not_hosted"


class Gone(StoreError):
    """What was asked for is no longer kept (a delta since a version older
    than the table's change log); carries `oldest_version`."""

    code = "gone"


class ConfigError(StoreError):
    code = "config_error"


class CorruptData(StoreError):
    code = "corrupt_data"


_RECORDED: tuple[type[StoreError], ...] = (  # every type the store raises; recorded outcomes are rebuilt by code
    StoreError,
    InvalidRequest,
    NotFound,
    AlreadyExists,
    PreconditionFailed,
    Conflict,
    Unprocessable,
    Unavailable,
    Timeout,
    NotHosted,
    Gone,
    ConfigError,
    CorruptData,
)
_BY_CODE = {cls.code: cls for cls in _RECORDED}
