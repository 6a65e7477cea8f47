"""Many tensors per request, as safetensors: batch pulls and batch pushes.

A batch push is grouped by shard; each shard's group is one Raft entry,
applied atomically (all or none). Different shards commit independently.
"""

from __future__ import annotations

import asyncio
import json

import anyio
from fastapi import APIRouter, Query, Request
from starlette.responses import JSONResponse, Response

from store.commands import Batch, Grad
from store.errors import InvalidRequest, StoreError
from store.interface import StoreAPI

from . import grad_widen, json_input, wire
from . import headers as h
from . import openapi as oa
from . import wire_dtypes as wd
from .bridge import wait
from .errors import UnsupportedMediaType, error_response
from .tensors import wait_version

router = APIRouter()


@router.get(
    "/v1/tensors:batch",
    openapi_extra=oa.pull_batch_extra(),
    response_class=Response,
    responses={
        **oa.safetensors_file("The tensors; their versions in the metadata key `versions`"),
        **oa.answers(307, 400, 404, 406, 408, 503),
    },
)
async def pull_batch(
    request: Request,
    names: str = Query(..., pattern=oa.NAMES_PATTERN, description="1 to 10000 comma-separated tensor names"),
    consistency: str = Query("local", pattern="^(local|linearizable)$"),
    timeout: float | None = Query(None, ge=0, le=3600, description="seconds; capped at limits.max_wait_seconds"),
) -> Response:
    """Several tensors as one safetensors file; versions in its metadata.
    `X-Min-Versions: {"name": v}` waits (bounded) until this replica has
    applied those versions: read-your-writes for a session."""
    store: StoreAPI = request.app.state.store
    wire_dtype = wd.requested(request.headers.get("x-wire-dtype"))
    wanted = [h.tensor_name(n) for n in names.split(",") if n]
    if not wanted or len(wanted) > 10_000:
        raise InvalidRequest("names: give 1 to 10000 comma-separated tensor names")
    limits = store.cfg.limits
    deadline = min(timeout if timeout is not None else limits.request_timeout, limits.max_wait_seconds)
    min_versions = _versions_header(request.headers.get("x-min-versions"), "X-Min-Versions")
    for name, version in min_versions.items():
        await wait_version(store, name, version, deadline)
    if consistency == "linearizable":
        shards = {store.shard_of(n) for n in wanted}
        await asyncio.gather(
            *(
                wait(store.barrier(s), max(deadline, limits.request_timeout), "linearizable read barrier", write=False)
                for s in shards
            )
        )

    def build() -> bytes:
        arrays, versions = {}, {}
        for n in wanted:
            t, _ = store.get(n)
            if wire_dtype is not None:
                wd.check_float(n, t.dtype, wire_dtype)
            arrays[n], versions[n] = t.value, t.version
        if wire_dtype is not None:
            return wd.batch_body(arrays, wire_dtype, {"versions": json.dumps(versions)})
        return wire.encode_safetensors(arrays, {"versions": json.dumps(versions)})

    body = await anyio.to_thread.run_sync(build)
    return Response(body, media_type=wire.SAFETENSORS)


@router.post(
    "/v1/grads:batch",
    openapi_extra=oa.push_batch_extra(),
    responses={
        **oa.json_ok(
            {"type": "object", "required": ["versions"], "properties": {"versions": oa.VERSIONS_MAP}},
            "The new versions",
        ),
        **oa.answers(307, 400, 404, 409, 412, 413, 415, 422, 503),
    },
)
async def push_batch(request: Request) -> Response:
    """Push gradients for many tensors: {"versions": {name: new version}}."""
    store: StoreAPI = request.app.state.store
    hd = request.headers
    if wire.media_type(hd.get("content-type")) != wire.SAFETENSORS:
        raise UnsupportedMediaType(f"batch pushes take {wire.SAFETENSORS}")
    base_versions = _versions_header(hd.get("x-base-versions"), "X-Base-Versions")
    rid = h.request_id(hd.get("x-request-id"))
    body = await wire.read_body(request, store.cfg.limits.max_body_bytes)
    grads = await anyio.to_thread.run_sync(grad_widen.decode_batch_grads, body, lambda n: _local_dtype(store, n))
    if not grads:
        raise InvalidRequest("the safetensors body holds no tensors")
    by_shard: dict[int, list[Grad]] = {}
    for name, t in grads.items():
        h.tensor_name(name)
        cmd = Grad(name=name, dtype=t.dtype, shape=t.shape, data=t.data, base_version=base_versions.get(name))
        by_shard.setdefault(store.shard_of(name), []).append(cmd)
    shards = sorted(by_shard)
    outcomes = await asyncio.gather(
        *(
            wait(
                store.write_batch(s, Batch(ops=tuple(by_shard[s]), rid=f"{rid}:{s}" if rid else None)),
                store.cfg.limits.request_timeout,
                f"batch push to shard {s}",
            )
            for s in shards
        ),
        return_exceptions=True,
    )
    versions, failure = {}, None
    for outcome in outcomes:
        if isinstance(outcome, StoreError):
            failure = failure or outcome
            continue
        if isinstance(outcome, BaseException):
            raise outcome
        for r in outcome["results"]:
            versions[r["name"]] = r["version"]
    if failure is not None:  # report the shards that did commit too
        return error_response(failure, request, extra={"versions": versions})
    return JSONResponse({"versions": versions})


def _local_dtype(store: StoreAPI, name: str) -> str | None:
    """The dtype of `name` if this replica holds it (narrow gradients are widened to it)."""
    try:
        return store.peek(name)[0].dtype
    except StoreError:
        return None


def _versions_header(value: str | None, header: str) -> dict[str, int]:
    if value is None:
        return {}
    doc = json_input.loads(value, header)
    if not isinstance(doc, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in doc.values()
    ):
        raise InvalidRequest(f'{header}: expected {{"name": version, ...}}')
    return doc
