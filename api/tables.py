"""/v1/tables: embedding tables keyed by 64-bit IDs (store/tables).

PUT/GET/DELETE /v1/tables/{name}, GET /v1/tables,
POST /v1/tables/{name}:lookup and POST /v1/tables/{name}:push.
Bodies: api/table_wire.py. A push is one Raft command per shard it touches.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import numpy as np
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from store.errors import InvalidRequest, PayloadTooLarge, Unprocessable
from store.tables.service import TableService

from . import headers as h
from . import table_wire as tw
from . import wire
from .bridge import wait

router = APIRouter()


def _service(request: Request) -> TableService:
    service: TableService = request.app.state.store.tables
    return service


def _limits(request: Request) -> Any:
    return request.app.state.store.cfg.limits


def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(doc, separators=(",", ":")).encode(),
        status_code=status,
        headers=headers,
        media_type="application/json",
    )


def _check_count(ids: np.ndarray, limit: int) -> None:
    if np.ndim(ids) == 1 and len(ids) > limit:
        raise PayloadTooLarge(f"at most {limit} IDs per request (limits.table_max_ids), got {len(ids)}")


@router.get("/v1/tables")
async def list_tables(request: Request) -> Response:
    return _json(await anyio.to_thread.run_sync(_service(request).list))


@router.put("/v1/tables/{name}", status_code=201)
async def create_table(name: str, request: Request) -> Response:
    """JSON config: dim, dtype, id_dtype, initializer, optimizer, admission, eviction."""
    if wire.media_type(request.headers.get("content-type")) not in ("", tw.JSON):
        raise Unprocessable("a table config is a JSON object (Content-Type: application/json)")
    body = await wire.read_body(request, 1 << 20)
    try:
        config = json.loads(bytes(body) or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"body is not valid JSON: {e}") from None
    rid = h.request_id(request.headers.get("x-request-id"))
    result = await wait(_service(request).create(name, config, rid), _limits(request).request_timeout, "table create")
    return _json(result, status=201)


@router.get("/v1/tables/{name}")
async def describe_table(
    name: str,
    request: Request,
    digest: bool = False,
    consistency: str = Query("local", pattern="^(local|linearizable)$"),
) -> Response:
    """Rows, bytes, version (summed over shards), config; `digest=1` adds each
    shard part's sha256 (for comparing replicas)."""
    service = _service(request)
    if consistency == "linearizable":
        await anyio.to_thread.run_sync(service.barrier)
    info = await anyio.to_thread.run_sync(service.info, name, digest)
    return _json(info, headers={"ETag": f'"{info["version"]}"'})


@router.delete("/v1/tables/{name}")
async def delete_table(name: str, request: Request) -> Response:
    if_match = h.version_tag(request.headers.get("if-match"), "If-Match")
    rid = h.request_id(request.headers.get("x-request-id"))
    service = _service(request)
    fut = await anyio.to_thread.run_sync(
        lambda: service.delete(name, if_match if isinstance(if_match, int) else None, rid)
    )
    return _json(await wait(fut, _limits(request).request_timeout, "table delete"))


@router.post("/v1/tables/{name}:lookup")
async def lookup_rows(
    name: str, request: Request, consistency: str = Query("local", pattern="^(local|linearizable)$")
) -> Response:
    """Rows for the IDs in the body, in order; an ID without a row reads its initial value."""
    limits = _limits(request)
    kind = tw.negotiate(request.headers.get("accept"))
    body = await wire.read_body(request, limits.max_body_bytes)
    ids = await anyio.to_thread.run_sync(tw.decode_lookup, request.headers.get("content-type"), body)
    _check_count(ids, limits.table_max_ids)
    service = _service(request)
    if consistency == "linearizable":
        await anyio.to_thread.run_sync(service.barrier)
    rows, spec, versions = await anyio.to_thread.run_sync(service.lookup, name, ids)
    meta = {"versions": json.dumps({str(k): v for k, v in sorted(versions.items())})}
    payload = await anyio.to_thread.run_sync(tw.encode_rows, kind, rows, spec.dtype, meta)
    return Response(payload, media_type=kind, headers={"X-Versions": meta["versions"], "X-Dtype": spec.dtype})


@router.post("/v1/tables/{name}:push")
async def push_rows(name: str, request: Request) -> Response:
    """`ids` and `grads` (n x dim); duplicates are summed; one command per shard touched."""
    limits = _limits(request)
    hd = request.headers
    body = await wire.read_body(request, limits.max_body_bytes)
    ids, grads = await anyio.to_thread.run_sync(tw.decode_push, hd.get("content-type"), body)
    _check_count(ids, limits.table_max_ids)
    base = h.integer(hd.get("x-base-version"), "X-Base-Version")
    rid = h.request_id(hd.get("x-request-id"))
    service = _service(request)
    fut = await anyio.to_thread.run_sync(lambda: service.push(name, ids, grads, base, rid))
    return _json(await wait(fut, limits.request_timeout, "table push"))
