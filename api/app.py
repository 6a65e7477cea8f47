"""The FastAPI application of one replica."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import anyio
from fastapi import FastAPI

from store.config import Config
from store.interface import StoreAPI
from store.node import Store

from . import (
    batch,
    checkpoint,
    cluster,
    errors,
    fastpath,
    metrics,
    openapi,
    part_forward,
    stats,
    table_delta,
    tables,
    tensors,
    ui,
)
from .auth import BearerAuth

log = logging.getLogger(__name__)


def create_app(cfg: Config, store: StoreAPI | None = None) -> FastAPI:
    """An app serving `store`; if none is given, one is built from `cfg` and
    started and stopped with the app's lifespan."""
    owned = store is None
    the_store: StoreAPI = store if store is not None else Store(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if owned:
            await anyio.to_thread.run_sync(the_store.start)
        try:
            yield
        finally:
            await part_forward.aclose(the_store)
            if owned:
                await anyio.to_thread.run_sync(the_store.close)

    app = FastAPI(
        title="paramstore",
        version="0.1.0",
        lifespan=lifespan,
        description="A Raft-replicated, versioned parameter store for distributed training.",
    )
    app.state.store = the_store
    errors.install(app)
    app.include_router(batch.router)  # before tensors: /v1/tensors:batch is not a tensor name
    app.include_router(tensors.router)
    app.include_router(tables.router)  # /v1/tables (api/tables.py)
    app.include_router(table_delta.router)  # /v1/tables/{name}/delta (api/table_delta.py)
    app.include_router(cluster.router)
    app.include_router(checkpoint.router)  # /v1/checkpoint (api/checkpoint.py)
    app.include_router(ui.router)  # /ui dashboard (api/ui.py)
    app.include_router(stats.router)  # /v1/stats: counters the dashboard charts (api/stats.py)
    fastpath.install(app, the_store)  # gradient pushes skip route matching, not the middleware
    metrics.install(app)  # /metrics and the HTTP metrics middleware
    if cfg.auth.enabled:
        app.add_middleware(BearerAuth, cfg=cfg)  # outermost: nothing runs for a bad token
    openapi.install(app)  # /openapi.json: bodies, media types, every status
    return app
