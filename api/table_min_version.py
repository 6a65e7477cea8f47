"""`min_version` lookups of a table: wait until this replica has applied, in
each shard part, the version a cursor names (docs/api.md, "Embedding tables").

A table's version is per shard part, so `min_version` names one version per
part: either a cursor like the delta endpoint's, every part in shard order
("12,0,40,7"; 0: no wait), or `shard:version` pairs for only the parts to
wait on ("0:12,2:40"), which is what a push's answer (each touched shard's new
version) or a lookup's `X-Versions` give directly.
"""

from __future__ import annotations

import re

from store.errors import Unavailable, Unprocessable, echo
from store.tables.service import TableService

from . import openapi as oa
from .bridge import wait_optional
from .errors import WaitExpired

_CURSOR = re.compile(r"[0-9]{1,19}(,[0-9]{1,19}){0,4095}")
_PAIRS = re.compile(r"[0-9]{1,5}:[0-9]{1,19}(,[0-9]{1,5}:[0-9]{1,19}){0,4095}")


def cursor(service: TableService, name: str, raw: str) -> list[int]:
    """`raw` as one version per part of `name` (blocking: the table's spec); 404 if
    the table is absent, 422 for a malformed value or a shard the table lacks."""
    service.spec(name)
    if _PAIRS.fullmatch(raw):
        out = [0] * service.shards
        for pair in raw.split(","):
            shard, version = (int(x) for x in pair.split(":"))
            if shard >= service.shards or version > oa.MAX_VERSION:
                raise Unprocessable(f"min_version: {pair!r}: table {name!r} has shard parts 0-{service.shards - 1}")
            out[shard] = max(out[shard], version)
        return out
    expected = "one version per shard part in shard order (e.g. 12,0,40,7) or shard:version pairs (e.g. 0:12,2:40)"
    return service.cursor(name, parse_cursor(raw, "min_version", expected), "min_version")


def parse_cursor(raw: str, what: str, expected: str) -> list[int]:
    """Versions >= 0, comma-separated (one per shard part); 422 naming `what` otherwise."""
    if not _CURSOR.fullmatch(raw) or any(int(v) > oa.MAX_VERSION for v in raw.split(",")):
        raise Unprocessable(f"{what}: expected {expected}, got {echo(raw)}")
    return [int(v) for v in raw.split(",")]


async def wait_parts(service: TableService, name: str, cursor: list[int], deadline: float, ready: bool) -> None:
    """Return once every part reached its version; 408 if this ready replica
    has not within `deadline` seconds, 503 if it is not ready (no leader, behind)."""
    fut, cancel = service.reached(name, cursor)
    try:
        if fut.done() or await wait_optional(fut, deadline):
            fut.result()  # a failed watch (the shard closed) raises here
            return
    finally:
        cancel()
    kind = WaitExpired if ready else Unavailable
    raise kind(
        f"this replica has not applied min_version {','.join(map(str, cursor))} of table {name!r} "
        f"within {deadline:g}s; retry or read from another replica"
    )
