"""Parsing of the request headers the tensor API understands. Bad values are
InvalidRequest (400) or Unprocessable (422), never a 500."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal, overload

from store.errors import InvalidRequest, Unprocessable, echo
from store.optimizers import normalize_spec, refuse_degenerate
from store.partitions import parse_part
from store.sync_rounds import normalize_sync

from . import json_input

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,255}$")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
# Set by a replica writing one part of a partitioned tensor on a replica that
# hosts the part's shard (api/part_forward.py): the part's name and request id
# (`<rid>#p<i>`, as the entry replica's own part commands carry) are accepted.
FORWARDED_PART = "X-Forwarded-Part"
PART_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}#p[0-9]{1,6}$")
# ASCII digits only (str.isdigit takes '²', which int() refuses), one optional
# sign (int() refuses '--1'); values past int64 are refused, not stored.
INTEGER_RE = re.compile(r"-?[0-9]{1,19}")
MAX_INTEGER = 2**63 - 1


def tensor_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidRequest(
            f"tensor name {echo(name)} is invalid: 1-256 characters of letters, digits and _ . : -, "
            "not starting with . : or -"
        )
    return name


def tensor_or_part_name(name: str) -> str:
    """A tensor name, or a part of a partitioned tensor, `<name>#p<i>`: the
    client reads and pushes parts directly (never creates or deletes them)."""
    part = parse_part(name)
    tensor_name(part[0] if part is not None else name)
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
    if v.startswith('"') or v.endswith('"'):  # quoted: exactly one pair ('"3' is not a version)
        if len(v) < 2 or not (v.startswith('"') and v.endswith('"')):
            raise InvalidRequest(f"{header}: unbalanced quotes in {echo(value)}")
        v = v[1:-1]
    if not (INTEGER_RE.fullmatch(v) and 0 <= int(v) <= MAX_INTEGER):
        raise InvalidRequest(f'{header}: expected a version such as "3", got {echo(value)}')
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
    if not (INTEGER_RE.fullmatch(v) and minimum <= int(v) <= MAX_INTEGER):
        raise InvalidRequest(f"{header}: expected an integer in [{minimum}, {MAX_INTEGER}], got {echo(value)}")
    return int(v)


def boolean(value: str | None, header: str) -> bool | None:
    if value is None:
        return None
    v = value.strip().lower()
    if v in ("1", "true", "yes"):
        return True
    if v in ("0", "false", "no"):
        return False
    raise InvalidRequest(f"{header}: expected true or false, got {echo(value)}")


def optimizer(value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    spec = normalize_spec(json_input.loads(value, "X-Optimizer"))
    refuse_degenerate(spec)
    return spec


def forwarded_part(hd: Mapping[str, str]) -> bool:
    return hd.get(FORWARDED_PART.lower()) is not None


def request_id_of(hd: Mapping[str, str]) -> str | None:
    """X-Request-Id; a forwarded part's may end in `#p<i>`."""
    value = hd.get("x-request-id")
    if value is not None and forwarded_part(hd) and PART_REQUEST_ID_RE.match(value):
        return value
    return request_id(value)


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
        raise Unprocessable(f"X-Staleness-Policy: {echo(value)} is not one of reject, scale")
    return value


def sync(value: str | None) -> dict[str, Any] | None:
    """X-Sync: synchronous rounds (store/sync_rounds.py); 422 for a bad spec."""
    if value is None:
        return None
    return normalize_sync(json_input.loads(value, "X-Sync"))
