"""/v1/tables: embedding tables keyed by 64-bit IDs (store/tables).

PUT/GET/DELETE /v1/tables/{name}, GET /v1/tables,
POST /v1/tables/{name}:lookup and POST /v1/tables/{name}:push.
Bodies: api/table_wire.py. A push is one Raft command per shard it touches.
"""

from __future__ import annotations

import json
from concurrent.futures import Future
from typing import Any

import anyio
import numpy as np
from fastapi import APIRouter, Path, Query, Request
from starlette.convertors import Convertor, register_url_convertor
from starlette.responses import Response

from store.errors import InvalidRequest
from store.tables import rowdtype
from store.tables.service import TableService
from store.tables.spec import INITIALIZERS, NAME_RE, OPTIMIZERS, STORAGE_DTYPES

from . import headers as h
from . import openapi as oa
from . import table_min_version, wire
from . import table_wire as tw
from . import wire_dtypes as wd
from .bridge import wait
from .errors import PayloadTooLarge, UnsupportedMediaType

router = APIRouter()


class TableNameConvertor(Convertor[str]):
    """Table names have no ':', so /v1/tables/x:lookup never matches /v1/tables/{name}."""

    regex = NAME_RE.pattern.strip("^$").replace("{1,200}", "+")

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("table", TableNameConvertor())
TableName = Path(json_schema_extra={"pattern": NAME_RE.pattern}, description="1-200 letters, digits and _ . -")

# ---- the OpenAPI description (api/openapi.py serves it) -------------------------------
_INT_LIST = {"type": "array", "items": {"type": "integer", "minimum": -(2**63), "maximum": 2**64 - 1}}
_CONFIG = {
    "type": "object",
    "required": ["dim"],
    "properties": {
        "dim": {"type": "integer", "minimum": 1, "maximum": 1 << 16},
        "dtype": {"type": "string", "enum": list(STORAGE_DTYPES)},
        "id_dtype": {"type": "string", "enum": ["int64", "uint64"]},
        "initializer": {"type": "object", "properties": {"type": {"type": "string", "enum": list(INITIALIZERS)}}},
        "optimizer": {
            "type": "object",
            "required": ["type"],
            "properties": {"type": {"type": "string", "enum": list(OPTIMIZERS)}},
        },
        "admission": {"type": "object"},
        "eviction": {"type": "object"},
        "max_staleness": {"type": "integer", "minimum": 0},
        "staleness_policy": {"type": "string", "enum": ["reject", "scale"]},
    },
}
_INFO = {"type": "object", "required": ["name", "version", "rows", "config", "shards"]}
_ROWS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The rows, in the order of the IDs (Accept: safetensors, npy or JSON)",
        "headers": {
            "X-Versions": {"description": "JSON: each shard part's version", "schema": {"type": "string"}},
            "X-Dtype": {"description": "the table's row dtype", "schema": {"type": "string"}},
            "X-Wire-Dtype": oa.WIRE_DTYPE_ANSWER,
        },
        "content": {
            tw.SAFETENSORS: {"schema": oa.BINARY},
            tw.NPY: {"schema": oa.BINARY},
            tw.JSON: {"schema": {"type": "object", "required": ["rows"]}},
        },
    }
}
_LOOKUP_BODY = {
    "requestBody": {
        "required": True,
        "description": "the IDs: safetensors `ids`, .npy, or JSON",
        "content": {
            tw.SAFETENSORS: {"schema": oa.BINARY},
            tw.NPY: {"schema": oa.BINARY},
            tw.JSON: {
                "schema": {
                    "type": "object",
                    "required": ["ids"],
                    "properties": {"ids": _INT_LIST},
                    "additionalProperties": False,
                }
            },
        },
    },
    "parameters": [oa.WIRE_DTYPE],
}
_PUSH_BODY = {
    "requestBody": {
        "required": True,
        "description": "safetensors `ids` and `grads` (n x dim), or JSON",
        "content": {
            tw.SAFETENSORS: {"schema": oa.BINARY},
            tw.JSON: {
                "schema": {
                    "type": "object",
                    "required": ["ids", "grads"],
                    "properties": {
                        "ids": _INT_LIST,
                        "grads": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                    },
                    "additionalProperties": False,
                }
            },
        },
    },
    "parameters": [oa.BASE_VERSION, oa.REQUEST_ID],
}
_CREATE_BODY = {
    "requestBody": {"required": True, "description": "the table config", "content": {tw.JSON: {"schema": _CONFIG}}},
    "parameters": [oa.REQUEST_ID],
}
_DELETE = {"parameters": [oa.IF_MATCH, oa.REQUEST_ID]}


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


@router.get("/v1/tables", responses=oa.json_ok({"type": "array", "items": _INFO}, "Every table"))
async def list_tables(request: Request) -> Response:
    return _json(await anyio.to_thread.run_sync(_service(request).list))


@router.put(
    "/v1/tables/{name:table}",
    status_code=201,
    openapi_extra=_CREATE_BODY,
    responses={
        201: {"description": "Created", "content": {tw.JSON: {"schema": oa.OBJECT}}},
        **oa.answers(400, 404, 409, 413, 415, 422, 503),
    },
)
async def create_table(request: Request, name: str = TableName) -> Response:
    """JSON config: dim, dtype, id_dtype, initializer, optimizer, admission, eviction."""
    if wire.media_type(request.headers.get("content-type")) not in ("", tw.JSON):
        raise UnsupportedMediaType("a table config is a JSON object (Content-Type: application/json)")
    body = await wire.read_body(request, 1 << 20)
    try:
        config = json.loads(bytes(body) or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"body is not valid JSON: {e}") from None
    rid = h.request_id(request.headers.get("x-request-id"))
    result = await wait(_service(request).create(name, config, rid), _limits(request).request_timeout, "table create")
    return _json(result, status=201)


@router.get(
    "/v1/tables/{name:table}",
    responses={**oa.json_ok(_INFO, "The table as this replica holds it"), **oa.answers(400, 404, 503)},
)
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


@router.delete(
    "/v1/tables/{name:table}",
    openapi_extra=_DELETE,
    responses={**oa.json_ok(oa.OBJECT, "Deleted"), **oa.answers(400, 404, 409, 412, 422, 503)},
)
async def delete_table(request: Request, name: str = TableName) -> Response:
    if_match = h.version_tag(request.headers.get("if-match"), "If-Match")
    rid = h.request_id(request.headers.get("x-request-id"))
    service = _service(request)
    fut = await anyio.to_thread.run_sync(
        lambda: service.delete(name, if_match if isinstance(if_match, int) else None, rid)
    )
    return _json(await wait(fut, _limits(request).request_timeout, "table delete"))


@router.post(
    "/v1/tables/{name:table}:lookup",
    openapi_extra=_LOOKUP_BODY,
    response_class=Response,
    responses={**_ROWS, **oa.answers(400, 404, 406, 413, 415, 422, 503)},
)
async def lookup_rows(
    name: str,
    request: Request,
    consistency: str = Query("local", pattern="^(local|linearizable)$"),
    min_version: str | None = Query(
        None,
        max_length=20 * 4096,
        description="one version per shard part in shard order (12,0,40,7), or shard:version "
        "pairs for the parts to wait on (0:12,2:40: a push's answer, a lookup's X-Versions)",
    ),
    timeout: float | None = Query(None, ge=0, le=3600, description="seconds; capped at limits.max_wait_seconds"),
) -> Response:
    """Rows for the IDs in the body, in order; an ID without a row reads its initial value."""
    limits = _limits(request)
    wire_dtype = wd.requested(request.headers.get("x-wire-dtype"))
    accept = request.headers.get("accept")
    kind = wire.negotiate(accept, (tw.SAFETENSORS,)) if wire_dtype else tw.negotiate(accept)
    body = await wire.read_body(request, limits.max_body_bytes)
    service = _service(request)
    content_type = request.headers.get("content-type")

    def decode() -> np.ndarray:
        ids = tw.decode_lookup(content_type, body)
        _check_count(ids, limits.table_max_ids)
        return ids

    def answer(ids: np.ndarray) -> Response:
        rows, spec, versions = service.lookup(name, ids)
        meta = {"versions": json.dumps({str(k): v for k, v in sorted(versions.items())})}
        hdrs = {"X-Versions": meta["versions"], "X-Dtype": spec.dtype}
        if wire_dtype is not None:
            payload = wd.rows_body(rowdtype.decode(rows, spec.dtype), wire_dtype, meta)
            return Response(payload, media_type=kind, headers={**hdrs, "X-Wire-Dtype": wire_dtype})
        return Response(tw.encode_rows(kind, rows, spec.dtype, meta), media_type=kind, headers=hdrs)

    if consistency == "local" and min_version is None:
        # one trip to a worker thread: each hop waits for the scheduler twice, which a loaded host makes slow
        return await anyio.to_thread.run_sync(lambda: answer(decode()))
    ids = await anyio.to_thread.run_sync(decode)
    if consistency == "linearizable":
        await anyio.to_thread.run_sync(service.barrier)
    if min_version is not None:
        cursor = await anyio.to_thread.run_sync(table_min_version.cursor, service, name, min_version)
        deadline = min(timeout if timeout is not None else limits.request_timeout, limits.max_wait_seconds)
        await table_min_version.wait_parts(service, name, cursor, deadline, request.app.state.store.is_ready())
    return await anyio.to_thread.run_sync(answer, ids)


@router.post(
    "/v1/tables/{name:table}:push",
    openapi_extra=_PUSH_BODY,
    responses={
        **oa.json_ok(oa.OBJECT, "Applied; each shard's outcome"),
        **oa.answers(400, 404, 409, 412, 413, 415, 422, 503),
    },
)
async def push_rows(request: Request, name: str = TableName) -> Response:
    """`ids` and `grads` (n x dim); duplicates are summed; one command per shard touched."""
    limits = _limits(request)
    hd = request.headers
    body = await wire.read_body(request, limits.max_body_bytes)
    service = _service(request)

    def propose() -> Future[Any]:
        ids, grads = tw.decode_push(hd.get("content-type"), body)
        _check_count(ids, limits.table_max_ids)
        base = h.integer(hd.get("x-base-version"), "X-Base-Version")
        rid = h.request_id(hd.get("x-request-id"))
        return service.push(name, ids, grads, base, rid)

    fut = await anyio.to_thread.run_sync(propose)  # decoding and proposing in one trip to a worker thread
    return _json(await wait(fut, limits.request_timeout, "table push"))
