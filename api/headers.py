"""Parsing of the request headers the tensor API understands. Bad values are
InvalidRequest (400) or Unprocessable (422), never a 500."""

from __future__ import annotations

import json
import re
from typing import Any, Literal, overload

from store.errors import InvalidRequest, Unprocessable
from store.optimizers import normalize_spec

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,255}$")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")


def tensor_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidRequest(
            f"tensor name {name!r} is invalid: 1-256 characters of letters, digits and _ . : -, "
            "not starting with . : or -"
        )
    return name


@overload
def version_tag(value: str, header: str, allow_star: Literal[False] = False) -> int: ...
@overload
def version_tag(value: str | None, header: str, allow_star: Literal[False] = False) -> int | None: ...
@overload
def version_tag(value: str | None, header: str, allow_star: bool) -> int | Literal["*"] | None: ...
def version_tag(value: str | None, header: str, allow_star: bool = False) -> int | Literal["*"] | None:
    """'"12"', '12' or W/"12" -> 12; '*' where allowed."""
    if value is None:
        return None
    v = value.strip()
    if allow_star and v == "*":
        return "*"
    if v.startswith("W/"):
        v = v[2:]
    v = v.strip('"')
    if not (v.isascii() and v.isdigit()):  # str.isdigit alone takes '²', which int() refuses
        raise InvalidRequest(f'{header}: expected a version such as "3", got {value!r}')
    return int(v)


def version_tags(value: str | None, header: str) -> list[int] | Literal["*"] | None:
    """If-None-Match on reads: a list of versions or '*'."""
    if value is None:
        return None
    if value.strip() == "*":
        return "*"
    return [version_tag(part, header) for part in value.split(",")]


def integer(value: str | None, header: str, minimum: int = 0) -> int | None:
    if value is None:
        return None
    v = value.strip()
    if not (v.isascii() and v.lstrip("-").isdigit()) or int(v) < minimum:
        raise InvalidRequest(f"{header}: expected an integer >= {minimum}, got {value!r}")
    return int(v)


def boolean(value: str | None, header: str) -> bool | None:
    if value is None:
        return None
    v = value.strip().lower()
    if v in ("1", "true", "yes"):
        return True
    if v in ("0", "false", "no"):
        return False
    raise InvalidRequest(f"{header}: expected true or false, got {value!r}")


def optimizer(value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        spec = json.loads(value)
    except ValueError as e:
        raise InvalidRequest(f"X-Optimizer: not valid JSON ({e})") from None
    return normalize_spec(spec)


def request_id(value: str | None) -> str | None:
    if value is None:
        return None
    if not REQUEST_ID_RE.match(value):
        raise InvalidRequest("X-Request-Id: 1-128 characters of letters, digits and _ . : -")
    return value


def staleness_policy(value: str | None) -> str | None:
    if value is None:
        return None
    if value not in ("reject", "scale"):
        raise Unprocessable(f"X-Staleness-Policy: {value!r} is not one of reject, scale")
    return value
