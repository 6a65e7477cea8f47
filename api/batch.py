"""Many tensors per request, as safetensors: batch pulls and batch pushes.

A batch push is grouped by shard; each shard's group is one Raft entry,
applied atomically (all or none). Different shards commit independently. A
partitioned tensor in a batch is pushed and pulled as on its own route: its
parts apply each atomically, and it reads at the least of its parts' versions.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid

import anyio
import numpy as np
from fastapi import APIRouter, Query, Request
from starlette.responses import JSONResponse, Response

from store.commands import Batch, Grad
from store.errors import InvalidRequest, StoreError
from store.interface import StoreAPI
from store.partitions import Layout

from . import grad_widen, json_input, partition_reads, partitioned, wire
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
    layouts = {n: lay for n in wanted if (lay := store.layout(n)) is not None}
    for name, version in min_versions.items():
        if name not in layouts:
            await wait_version(store, name, version, deadline)
    linearizable = consistency == "linearizable"
    if linearizable:  # one barrier per shard hosted here, whole tensors' and parts' alike
        shards = {store.shard_of(n) for n in wanted if n not in layouts}
        hosted = set(store.hosted_shards())
        shards |= {s for lay in layouts.values() for s in lay.part_shards(store.cfg.shards) if s in hosted}
        await asyncio.gather(
            *(
                wait(store.barrier(s), max(deadline, limits.request_timeout), "linearizable read barrier", write=False)
                for s in shards
            )
        )
    auth = request.headers.get("authorization")
    read = await asyncio.gather(
        *(_partitioned(store, lay, linearizable, min_versions.get(n), deadline, auth) for n, lay in layouts.items())
    )
    whole_parts = dict(zip(layouts, read, strict=True))  # partitioned tensors: their parts, read as a whole pull does

    def build() -> bytes:
        arrays, versions = {}, {}
        for n in wanted:
            if n in whole_parts:
                values, part_versions = whole_parts[n]
                dtype, value, version = layouts[n].dtype, np.concatenate(values), min(part_versions)
            else:
                t, _ = store.get(n)
                dtype, value, version = t.dtype, t.value, t.version
            if wire_dtype is not None:
                wd.check_float(n, dtype, wire_dtype)
            arrays[n], versions[n] = value, version
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
    cut: dict[str, tuple[Layout, wire.WireTensor]] = {}
    for name, t in grads.items():
        h.tensor_name(name)
        lay = store.layout(name)
        if lay is not None:  # its parts go to their shards as a push of its own (per-part atomic)
            cut[name] = (lay, t)
            continue
        cmd = Grad(name=name, dtype=t.dtype, shape=t.shape, data=t.data, base_version=base_versions.get(name))
        by_shard.setdefault(store.shard_of(name), []).append(cmd)
    shards = sorted(by_shard)
    auth = hd.get("authorization")
    outcomes = await asyncio.gather(
        *(
            wait(
                store.write_batch(s, Batch(ops=tuple(by_shard[s]), rid=f"{rid}:{s}" if rid else None)),
                store.cfg.limits.request_timeout,
                f"batch push to shard {s}",
            )
            for s in shards
        ),
        *(
            partitioned.push_parts(
                store,
                lay,
                t,
                rid=_tensor_rid(rid, name),
                base=None if name not in base_versions else [base_versions[name]] * lay.k,
                auth=auth,
            )
            for name, (lay, t) in cut.items()
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
        if "versions" in outcome:  # a partitioned tensor's push
            versions[outcome["name"]] = outcome["version"]
            continue
        for r in outcome["results"]:
            versions[r["name"]] = r["version"]
    if failure is not None:  # report the shards that did commit too
        return error_response(failure, request, extra={"versions": versions})
    return JSONResponse({"versions": versions})


def _local_dtype(store: StoreAPI, name: str) -> str | None:
    """The dtype of `name` if this replica holds it (narrow gradients are widened to it)."""
    lay = store.layout(name)
    if lay is not None:
        return lay.dtype
    try:
        return store.peek(name)[0].dtype
    except StoreError:
        return None


async def _partitioned(
    store: StoreAPI, lay: Layout, linearizable: bool, min_version: int | None, deadline: float, auth: str | None
) -> tuple[list[np.ndarray], list[int]]:
    """A partitioned tensor's parts (values, versions), with the consistency
    a whole pull gives them (the barriers on the shards hosted here: done)."""
    await partition_reads.settle_here(store, lay, range(lay.k), False, min_version, deadline)
    records = await partition_reads.records_of(
        store, lay, partition_reads.Remote(auth, linearizable, min_version, deadline)
    )
    return [t.value for t in records], [t.version for t in records]


def _tensor_rid(rid: str | None, name: str) -> str:
    """The request id of a partitioned tensor's push within a batch: derived
    from the batch's (a retry finds each part's outcome) and the name, and
    short enough whatever the name's length; a fresh one without a batch id."""
    if rid is None:
        return uuid.uuid4().hex
    return hashlib.blake2b(f"{rid}\0{name}".encode(), digest_size=16).hexdigest()


def _versions_header(value: str | None, header: str) -> dict[str, int]:
    if value is None:
        return {}
    doc = json_input.loads(value, header)
    if not isinstance(doc, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in doc.values()
    ):
        raise InvalidRequest(f'{header}: expected {{"name": version, ...}}')
    return doc
