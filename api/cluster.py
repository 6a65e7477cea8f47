"""Cluster status and health endpoints."""
from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

router = APIRouter()


@router.get("/v1/cluster")
async def cluster(request: Request) -> dict:
    return request.app.state.store.status()


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    store = request.app.state.store
    if store.is_ready():
        return JSONResponse({"ready": True})
    waiting = [f"shard {s['shard']}: " + ("no leader" if s.get("leader") is None else "catching up")
               for s in store.status()["shards"] if s.get("ready") is False]
    return JSONResponse({"error": "unavailable", "detail": "; ".join(waiting) or "starting"},
                        status_code=503, headers={"Retry-After": "1"})
