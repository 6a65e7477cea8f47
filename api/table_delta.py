"""GET /v1/tables/{name}/delta: the rows of a table changed after a version,
for serving (docs/api.md, "Delta export").

A table's parts live on different shards, each with its own version, so a
position in a table is a *cursor*: one version per shard part, comma-separated
in shard order ("12,40"; a single number for a one-shard table). `since=0` is
a full export, streamed from one snapshot per part; otherwise the answer holds
the rows changed or evicted after `since` (store/tables/changes.py), and
`X-Version` is the cursor it is complete up to: the next request's `since`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anyio
import numpy as np
from fastapi import APIRouter, Query, Request
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from paramstore._wire import safetensors_file
from store.tables.export import DeltaPart, PartDump
from store.tables.service import TableService
from store.tables.spec import TableSpec

from . import openapi as oa
from . import safetensors_stream as sts
from .bridge import wait_optional
from .table_min_version import parse_cursor
from .table_wire import _ST_OF_STORAGE, SAFETENSORS
from .tables import TableName  # also registers the {name:table} convertor

router = APIRouter()

FORMAT = "paramstore.table_delta"
_HEADERS = {
    "X-Version": {
        "description": "the cursor this answer is complete up to (the next `since`)",
        "schema": {"type": "string"},
    },
    "X-Table-Version": {"description": "the sum of its versions (the table's version)", "schema": {"type": "string"}},
}
_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "safetensors: `ids`, `rows` (and `removed` for a delta); metadata `paramstore`",
        "headers": _HEADERS,
        "content": {SAFETENSORS: {"schema": oa.BINARY}},
    },
    304: {"description": "nothing changed within the wait (wait=1)", "headers": _HEADERS},
    **oa.answers(400, 404, 410, 422, 503),
}


def _text(cursor: list[int]) -> str:
    return ",".join(str(v) for v in cursor)


def _headers(cursor: list[int]) -> dict[str, str]:
    return {"X-Version": _text(cursor), "X-Table-Version": str(sum(cursor))}


def _meta(name: str, spec: TableSpec, kind: str, since: list[int], cursor: list[int]) -> dict[str, str]:
    doc = {
        "format": FORMAT,
        "table": name,
        "kind": kind,
        "since": _text(since),
        "version": _text(cursor),
        "table_version": sum(cursor),
        "dim": spec.dim,
        "dtype": spec.dtype,
        "id_dtype": spec.id_dtype,
    }
    return {"paramstore": json.dumps(doc, sort_keys=True)}


def _id_code(spec: TableSpec) -> str:
    return "I64" if spec.id_dtype == "int64" else "U64"


@router.get("/v1/tables/{name:table}/delta", response_class=Response, responses=_ANSWERS)
async def table_delta(
    request: Request,
    name: str = TableName,
    since: str = Query(..., description="a cursor: the X-Version of the last answer, or 0 for everything"),
    wait: bool = Query(False, description="long-poll until something changed after `since`"),
    timeout: float | None = Query(None, ge=0, le=3600, description="seconds; capped at limits.max_wait_seconds"),
) -> Response:
    """Rows changed or evicted after `since`, or every row (`since=0`)."""
    service: TableService = request.app.state.store.tables
    limits = request.app.state.store.cfg.limits
    asked = parse_cursor(since, "since", "a version >= 0, or one per shard part comma-separated (e.g. 12,40)")
    cursor = await anyio.to_thread.run_sync(service.cursor, name, asked)
    if not any(cursor):
        return await _full(service, name, cursor)
    if wait:
        deadline = min(timeout if timeout is not None else limits.request_timeout, limits.max_wait_seconds)
        fut, cancel = service.changed(name, cursor)
        try:
            changed = fut.done() or await wait_optional(fut, deadline)
        finally:
            cancel()
        if not changed:
            return Response(status_code=304, headers=_headers(cursor))
    spec, parts = await anyio.to_thread.run_sync(service.delta, name, cursor)
    body, done = await anyio.to_thread.run_sync(_encode_delta, name, spec, cursor, parts)
    return Response(body, media_type=SAFETENSORS, headers=_headers(done))


def _encode_delta(name: str, spec: TableSpec, since: list[int], parts: list[DeltaPart]) -> tuple[bytes, list[int]]:
    done = [max(v, p.complete) for v, p in zip(since, parts, strict=True)]
    keys = np.concatenate([p.keys for p in parts])
    rows = np.concatenate([p.rows for p in parts]).reshape(len(keys), spec.dim)
    removed = np.concatenate([p.removed for p in parts])
    ids = _id_code(spec)
    body = safetensors_file(
        {
            "ids": (ids, keys.astype("<u8")),
            "rows": (_ST_OF_STORAGE[spec.dtype], rows),
            "removed": (ids, removed.astype("<u8")),
        },
        _meta(name, spec, "delta", since, done),
    )
    return body, done


async def _full(service: TableService, name: str, since: list[int]) -> Response:
    spec, dumps = await anyio.to_thread.run_sync(service.dump, name)
    cursor = [d.version for d in dumps]
    n = sum(d.rows for d in dumps)
    entries = [
        sts.Entry("ids", _id_code(spec), (n,), lambda: _chain(dumps, "ids")),
        sts.Entry("rows", _ST_OF_STORAGE[spec.dtype], (n, spec.dim), lambda: _chain(dumps, "rows")),
    ]
    return StreamingResponse(
        _closing(sts.stream(entries, _meta(name, spec, "full", since, cursor)), dumps),
        media_type=SAFETENSORS,
        headers=_headers(cursor),
        background=BackgroundTask(_close, dumps),  # also if the stream never started
    )


def _chain(dumps: list[PartDump], column: str) -> Iterator[np.ndarray]:
    for d in dumps:
        yield from d.column(column)


def _closing(chunks: Iterator[bytes | memoryview], dumps: list[PartDump]) -> Iterator[bytes | memoryview]:
    """Starlette iterates a sync iterator on a worker thread; the snapshots
    are released however the stream ends."""
    try:
        yield from chunks
    finally:
        _close(dumps)


def _close(dumps: list[PartDump]) -> None:
    for d in dumps:
        d.close()
