"""Cluster status and health endpoints."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Query, Request
from starlette.responses import JSONResponse

from store import membership
from store.errors import ConfigError, InvalidRequest, NotFound, echo
from store.interface import StoreAPI

from . import json_input, wire
from . import openapi as oa

router = APIRouter()

MAX_MEMBER_BODY = 64 * 1024  # a node record and a shard list; counted as it arrives, chunked too


@router.get("/v1/cluster", responses=oa.json_ok(oa.OBJECT, "Nodes and shards as this replica sees them"))
async def cluster(request: Request) -> dict[str, Any]:
    store: StoreAPI = request.app.state.store
    return store.status()


@router.get("/healthz")
async def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@router.get("/readyz", responses={**oa.json_ok(oa.OBJECT, "Ready"), **oa.answers(503)})
async def readyz(request: Request) -> JSONResponse:
    store: StoreAPI = request.app.state.store
    if store.is_ready():
        return JSONResponse({"ready": True})
    waiting = [
        f"shard {s['shard']}: " + ("no leader" if s.get("leader") is None else "catching up")
        for s in store.status()["shards"]
        if s.get("ready") is False
    ]
    return JSONResponse(
        {"error": "unavailable", "detail": "; ".join(waiting) or "starting"},
        status_code=503,
        headers={"Retry-After": "1"},
    )


# ---- membership (admin) -------------------------------------------------------------
def _shards_param(value: Any, count: int) -> list[int] | None:
    """The `shards` of a membership change. A shard past the last is a 404
    (routing would answer 307 to a replica that has none either: a loop)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    try:
        if not isinstance(value, list) or any(isinstance(v, (bool, float)) for v in value):
            raise TypeError  # int() would take true as 1, 2.5 as 2 and 1e400 not at all (OverflowError)
        shards = [int(v) for v in value]
    except (TypeError, ValueError):
        raise InvalidRequest(f"shards: expected a list of shard numbers, got {echo(value)}") from None
    if not shards:
        raise InvalidRequest("shards: empty list")
    if min(shards) < 0:
        raise InvalidRequest(f"shards: shard numbers are >= 0, got {min(shards)}")
    if max(shards) >= count:
        raise NotFound(f"shard {max(shards)} does not exist: this cluster has shards 0 to {count - 1}")
    return shards


@router.post(
    "/v1/cluster/members",
    openapi_extra=oa.add_member_extra(),
    responses={**oa.json_ok(oa.OBJECT, "Added"), **oa.answers(307, 400, 404, 409, 413, 503)},
)
async def add_member(request: Request) -> dict[str, Any]:
    """Add a replica (started with `paramstore serve --join`, so that it already
    holds a fresh snapshot) as a voting member of every shard hosted here, or
    of `shards`."""
    body = json_input.loads(bytes(await wire.read_body(request, MAX_MEMBER_BODY)) or b"null", "body")
    if not isinstance(body, dict):
        raise InvalidRequest("body: expected JSON {id, http, raft, data, shards?}")
    try:
        node = membership.node_of(body)
    except ConfigError as e:
        raise InvalidRequest(e.detail) from None
    store: StoreAPI = request.app.state.store
    shards = _shards_param(body.get("shards"), store.cfg.shards)
    return await anyio.to_thread.run_sync(store.add_member, node, shards)


@router.delete(
    "/v1/cluster/members/{node_id}",
    responses={**oa.json_ok(oa.OBJECT, "Removed"), **oa.answers(307, 400, 404, 409, 503)},
)
async def remove_member(
    node_id: str,
    request: Request,
    shards: str | None = Query(None, pattern=oa.SHARDS_PATTERN, description="comma-separated shard numbers"),
) -> dict[str, Any]:
    """Remove a replica from every shard hosted here (or `?shards=0,1`); works
    for a dead replica too, and moves leadership away from a live one first."""
    store: StoreAPI = request.app.state.store
    return await anyio.to_thread.run_sync(store.remove_member, node_id, _shards_param(shards, store.cfg.shards))
