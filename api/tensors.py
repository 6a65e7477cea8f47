"""/v1/tensors: create, replace, read, push gradients, delete, list."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import APIRouter, Path, Query, Request
from starlette.responses import Response

from store import dtypes
from store.commands import Delete, Grad, GradRows, Put
from store.errors import InvalidRequest, NotFound, PreconditionFailed, Unavailable, Unprocessable, echo
from store.interface import StoreAPI
from store.partitions import Layout

from . import grad_widen, partition_reads, partition_rows, partitioned, wire
from . import headers as h
from . import openapi as oa
from . import wire_dtypes as wd
from .bridge import read_tensor, wait, wait_optional
from .errors import UnsupportedMediaType, WaitExpired

if TYPE_CHECKING:
    from store.buffers import Bytes
    from store.datapath import PayloadStream

# A raw body's (dtype, shape) when its X-Dtype / X-Shape headers are absent.
Default = tuple[str, tuple[int, ...]] | None
# Reads a gradient body, handing each filled piece to the callback (cut-through), if given.
ReadBody = Callable[[Callable[[memoryview], None] | None], Awaitable[wire.HashedBody | bytearray]]

router = APIRouter()

DECODE_IN_THREAD_BYTES = 1 << 20
WRITTEN_FIELDS = ("name", "version", "versions", "shard", "deleted", "duplicate", "round")


def _store(request: Request) -> StoreAPI:
    store: StoreAPI = request.app.state.store
    return store


async def _decode(request: Request, store: StoreAPI, default: Default = None) -> wire.WireTensor:
    body = await wire.read_body(request, store.cfg.limits.max_body_bytes)
    return await decode_tensor(store, request.headers, body, default)


async def decode_tensor(
    store: StoreAPI, headers: Mapping[str, str], body: Bytes, default: Default = None
) -> wire.WireTensor:
    args = (headers.get("content-type"), headers, body, store.cfg.limits.json_max_elements, default)
    if len(body) > DECODE_IN_THREAD_BYTES and wire.media_type(args[0]) != wire.OCTET:
        return await anyio.to_thread.run_sync(wire.decode, *args)
    return wire.decode(*args)


def written_body(result: dict[str, Any]) -> bytes:
    return json.dumps(
        {k: v for k, v in result.items() if k in WRITTEN_FIELDS}, ensure_ascii=False, separators=(",", ":")
    ).encode()


def written_headers(result: dict[str, Any]) -> dict[str, str]:
    version = result["version"]
    if "versions" in result:  # a partitioned tensor: the version vector
        vector = result["versions"]
        return {"ETag": partitioned.etag(vector), "X-Version": str(version), "X-Versions": json.dumps(vector)}
    return {"ETag": f'"{version}"', "X-Version": str(version)}


def _written(result: dict[str, Any], status: int = 200) -> Response:
    return Response(
        written_body(result), status_code=status, headers=written_headers(result), media_type="application/json"
    )


# Declared, not validated here: headers.tensor_name checks it (the same message on every route).
TensorName = Path(json_schema_extra={"pattern": oa.NAME_PATTERN}, description="1-256 letters, digits and _ . : -")


@router.put(
    "/v1/tensors/{name}",
    status_code=201,
    openapi_extra=oa.put_tensor_extra(),
    responses={
        **oa.written(200, "Replaced"),
        **oa.written(201, "Created"),
        **oa.answers(307, 400, 404, 409, 412, 413, 415, 422, 503),
    },
)
async def put_tensor(request: Request, name: str = TensorName) -> Response:
    """Create or replace a tensor (201 on create, 200 on replace)."""
    store = _store(request)
    hd = request.headers
    if h.forwarded_part(hd):  # one part of a partitioned tensor's create or replace (api/part_forward.py)
        h.tensor_or_part_name(name)
    else:
        h.tensor_name(name)
    inm = hd.get("if-none-match")
    if inm is not None and inm.strip() != "*":
        raise InvalidRequest("If-None-Match on PUT only takes '*' (create only)")
    # Every header is checked before the body is read.
    if_match = h.version_tag(hd.get("if-match"), "If-Match", allow_star=True)
    optimizer = h.optimizer(hd.get("x-optimizer"))
    allow_nonfinite = h.boolean(hd.get("x-allow-nonfinite"), "X-Allow-Nonfinite")
    staleness_policy = h.staleness_policy(hd.get("x-staleness-policy"))
    max_staleness = h.integer(hd.get("x-max-staleness"), "X-Max-Staleness")
    sync = h.sync(hd.get("x-sync"))
    rid = h.request_id_of(hd)
    t = await _decode(request, store)
    options = {
        "optimizer": optimizer,
        "allow_nonfinite": allow_nonfinite,
        "staleness_policy": staleness_policy,
        "max_staleness": max_staleness,
        "rid": rid,
    }
    lay = store.layout(name)
    if lay is not None:
        if sync is not None:
            raise Unprocessable(f"tensor {name!r} is partitioned; synchronous rounds (X-Sync) take whole tensors")
        if hd.get("x-partitions") is not None:
            if rid is not None and _same_create(store, lay, hd, t):  # a retried create: each step finds its outcome
                return await partitioned.create(store, name, t, lay.k, options, hd.get("authorization"))
            raise Unprocessable(
                f"tensor {name!r} is partitioned in {lay.k} parts; repartition it through a checkpoint and reload"
            )
        if inm is not None:
            current = min(partitioned.local_versions(store, lay))
            raise PreconditionFailed(f"tensor {name!r} already exists (If-None-Match: *)", current_version=current)
        return await partitioned.replace(store, lay, hd, t, options)
    asked = hd.get("x-partitions") is not None
    if asked or if_match is None:
        k = partitioned.partitions_of(store, hd, t)  # 422 for a K out of range, even on a replace
        if k > 1 and sync is not None:  # a round is one tensor's state in one shard
            if asked:
                raise Unprocessable("synchronous rounds (X-Sync) take whole tensors: X-Partitions must be 1")
            k = 1  # no automatic partitioning
        if k > 1 and partitioned.whole_tensor_exists(store, name):
            if asked:
                raise Unprocessable(
                    f"tensor {name!r} is whole; partition it through a checkpoint and reload (docs/api.md)"
                )
        elif k > 1 and if_match is None:
            return await partitioned.create(store, name, t, k, options, hd.get("authorization"))
    cmd = Put(
        name=name,
        dtype=t.dtype,
        shape=t.shape,
        data=t.data,
        if_none_match=inm is not None,
        if_match=if_match,
        optimizer=optimizer,
        allow_nonfinite=allow_nonfinite,
        staleness_policy=staleness_policy,
        max_staleness=max_staleness,
        rid=rid,
        sync=sync,
    )
    result = await wait(store.write(cmd), store.cfg.limits.request_timeout, "write")
    return _written(result, 201 if result.get("created") else 200)


def _same_create(store: StoreAPI, lay: Layout, hd: Mapping[str, str], t: wire.WireTensor) -> bool:
    """The PUT asks for the layout the tensor already has (same K, dtype, shape)."""
    k = partitioned.partitions_of(store, hd, t)
    return (k, t.dtype, tuple(t.shape)) == (lay.k, lay.dtype, lay.shape)


@router.post(
    "/v1/tensors/{name}/grad",
    openapi_extra=oa.grad_extra(),
    responses={**oa.written(), **oa.answers(307, 400, 404, 409, 412, 413, 415, 422, 503)},
)
async def push_grad(request: Request, name: str = TensorName) -> Response:
    """Apply a gradient with the tensor's optimizer; returns the new version."""
    store = _store(request)
    limit = store.cfg.limits.max_body_bytes
    length = request.headers.get("content-length")
    result = await apply_grad(
        store, name, request.headers, lambda forward: wire.read_stream(length, request.stream(), limit, forward)
    )
    return _written(result)


async def apply_grad(store: StoreAPI, name: str, hd: Mapping[str, str], read_body: ReadBody) -> dict[str, Any]:
    """The whole of a gradient push but HTTP framing: shared by the route above
    and api/fastpath.py. Headers are checked before the body is read.
    `read_body(forward)` reads the body (`wire.read_stream`)."""
    h.tensor_or_part_name(name)
    try:
        local, _ = store.peek(name)
    except NotFound:
        lay = store.layout(name)
        if lay is not None:
            body = await read_body(None)
            whole = (lay.dtype, lay.shape)
            if grad_widen.is_compressed(hd, whole):  # widened whole, then split like any gradient
                t = await wd.off_loop(dtypes.expected_nbytes(*whole), grad_widen.decode_grad, name, hd, body, whole)
            else:
                t = await decode_tensor(store, hd, body, whole)
            return await partitioned.push(store, lay, hd, t)
        local = None
    base_version = h.integer(hd.get("x-base-version"), "X-Base-Version")
    if_match = h.version_tag(hd.get("if-match"), "If-Match")
    rid = h.request_id_of(hd)
    if local is not None:
        default: Default = (local.dtype, local.shape)
    else:
        media = wire.media_type(hd.get("content-type"))
        if (media in ("", wire.OCTET) and (hd.get("x-dtype") is None or hd.get("x-shape") is None)) or (
            media == wire.SAFETENSORS
        ):
            # nothing to take the omitted X-Dtype / X-Shape (or a compressed body's) from: the tensor is unknown here
            raise NotFound(f"tensor {name!r} does not exist")
        default = None
    # A large raw body goes to the shard's other replicas while it arrives
    # (cut-through: store/datapath.py PayloadStream); store.write then only
    # waits for their acknowledgements. Until store.write owns it, a failure
    # aborts it and the peers drop what they received.
    compressed = grad_widen.is_compressed(hd, default)  # widened here: the log carries full-width gradients
    stream = None if compressed else _stream_for(store, name, hd)
    try:
        body = await read_body(stream.feed if stream is not None else None)
        if compressed:  # the widened gradient may be far larger than the body (a sparse one)
            size = max(len(body), dtypes.expected_nbytes(*default)) if default else len(body)
            t = await wd.off_loop(size, grad_widen.decode_grad, name, hd, body, default)
        else:
            t = await decode_tensor(store, hd, body, default)
        if stream is not None:  # opened only for bodies that read_stream returns as a HashedBody
            body.stream = stream  # type: ignore[union-attr]  # store.write finds it on the payload
        written = store.write(
            Grad(
                name=name,
                dtype=t.dtype,
                shape=t.shape,
                data=t.data,
                rid=rid,
                base_version=base_version,
                if_match=if_match,
            )
        )
    except BaseException:
        if stream is not None:
            stream.abort()
        raise
    result: dict[str, Any] = await wait(written, store.cfg.limits.request_timeout, "push")
    return result


def _stream_for(store: StoreAPI, name: str, hd: Mapping[str, str]) -> PayloadStream | None:
    length = hd.get("content-length")
    if (
        wire.media_type(hd.get("content-type")) in ("", wire.OCTET)
        and length is not None
        and length.isdigit()
        and wire.HASH_WHILE_READING <= int(length) <= store.cfg.limits.max_body_bytes
    ):
        return store.payload_stream(name, int(length))
    return None


@router.post(
    "/v1/tensors/{name}/grad-rows",
    openapi_extra=oa.grad_rows_extra(),
    responses={**oa.written(), **oa.answers(307, 400, 404, 409, 412, 413, 415, 422, 503)},
)
async def push_grad_rows(request: Request, name: str = TensorName) -> Response:
    """Sparse push: a safetensors body with `indices` (int64, k) and `values`
    (k x row shape); only those rows and their optimizer state change."""
    store = _store(request)
    h.tensor_or_part_name(name)
    hd = request.headers
    if wire.media_type(hd.get("content-type")) != wire.SAFETENSORS:
        raise UnsupportedMediaType(f"grad-rows takes {wire.SAFETENSORS} with 'indices' and 'values'")
    body = await wire.read_body(request, store.cfg.limits.max_body_bytes)
    parts = await anyio.to_thread.run_sync(wire.decode_safetensors, body)
    if set(parts) != {"indices", "values"}:
        raise InvalidRequest(f"grad-rows body must hold exactly 'indices' and 'values', got {echo(sorted(parts))}")
    idx, vals = parts["indices"], parts["values"]
    if idx.dtype != "int64" or len(idx.shape) != 1:
        raise Unprocessable("indices must be a 1-D int64 tensor")
    if not vals.shape or vals.shape[0] != idx.shape[0]:
        raise Unprocessable(f"values must have {idx.shape[0]} rows (one per index), shape is {list(vals.shape)}")
    lay = store.layout(name)
    if lay is not None:
        return _written(await partition_rows.push_rows(store, lay, hd, idx, vals))
    cmd = GradRows(
        name=name,
        k=idx.shape[0],
        dtype=vals.dtype,
        row_shape=vals.shape[1:],
        indices=idx.data,
        values=vals.data,
        rid=h.request_id_of(hd),
        base_version=h.integer(hd.get("x-base-version"), "X-Base-Version"),
        if_match=h.version_tag(hd.get("if-match"), "If-Match"),
    )
    result = await wait(store.write(cmd), store.cfg.limits.request_timeout, "sparse push")
    return _written(result)


@router.delete(
    "/v1/tensors/{name}",
    openapi_extra=oa.delete_extra(),
    responses={**oa.written(200, "Deleted"), **oa.answers(307, 400, 404, 409, 412, 422, 503)},
)
async def delete_tensor(request: Request, name: str = TensorName) -> Response:
    store = _store(request)
    if h.forwarded_part(request.headers):  # one part of a partitioned tensor's delete (api/part_forward.py)
        h.tensor_or_part_name(name)
    else:
        h.tensor_name(name)
    lay = store.layout(name)
    if lay is not None:
        return await partitioned.delete(store, lay, request.headers)
    cmd = Delete(
        name=name,
        if_match=h.version_tag(request.headers.get("if-match"), "If-Match"),
        rid=h.request_id_of(request.headers),
    )
    result = await wait(store.write(cmd), store.cfg.limits.request_timeout, "delete")
    return _written(result)


@router.get("/v1/tensors", responses=oa.json_ok(oa.TENSOR_LIST, "Every tensor hosted here"))
async def list_tensors(
    request: Request,
    after: str | None = Query(None, max_length=256, description="only names sorted after this one"),
    limit: int | None = Query(None, ge=1, le=1_000_000, description="at most this many entries"),
) -> list[dict[str, Any]]:
    # O(tensors) of Python: off the event loop, which keeps serving meanwhile
    listed = await anyio.to_thread.run_sync(_store(request).list_tensors)
    if after is not None:
        listed = [d for d in listed if d["name"] > after]
    return listed if limit is None else listed[:limit]


_READ_ANSWERS = {
    **oa.tensor_value("The value, in the format Accept asks for"),
    **oa.answers(307, 400, 404, 406, 408, 422, 503),
}


@router.get(
    "/v1/tensors/{name}",
    operation_id="get_tensor",
    openapi_extra=oa.get_tensor_extra(),
    response_class=Response,
    responses=_READ_ANSWERS,
)
@router.head(
    "/v1/tensors/{name}",
    operation_id="head_tensor",
    openapi_extra=oa.get_tensor_extra(),
    response_class=Response,
    responses=_READ_ANSWERS,
)
async def get_tensor(
    request: Request,
    name: str = TensorName,
    consistency: str = Query("local", pattern="^(local|linearizable)$"),
    min_version: int | None = Query(None, ge=0, le=oa.MAX_VERSION),
    wait_version_gt: int | None = Query(None, ge=0, le=oa.MAX_VERSION),
    timeout: float | None = Query(None, ge=0, le=3600, description="seconds; capped at limits.max_wait_seconds"),
    digest: bool = False,
    rows: str | None = Query(
        None, pattern=oa.ROWS_PATTERN, description="comma-separated row indices: pull only these rows"
    ),
) -> Response:
    """Read a tensor at the asked consistency; see docs/api.md."""
    store = _store(request)
    h.tensor_or_part_name(name)
    limits = store.cfg.limits
    wire_dtype = wd.requested(request.headers.get("x-wire-dtype"))
    accept = request.headers.get("accept")
    kind = wd.negotiate(accept, wire_dtype) if wire_dtype else wire.negotiate(accept)
    deadline = min(timeout if timeout is not None else limits.request_timeout, limits.max_wait_seconds)
    lay = store.layout(name)
    if lay is not None:
        if rows is not None:
            return await partition_rows.get_rows(
                store,
                lay,
                rows,
                kind=kind,
                head_only=request.method == "HEAD",
                wire_dtype=wire_dtype,
                linearizable=consistency == "linearizable",
                min_version=min_version,
                wait_version_gt=wait_version_gt,
                deadline=deadline,
                auth=request.headers.get("authorization"),
            )
        return await partition_reads.pull(
            store,
            lay,
            kind=kind,
            linearizable=consistency == "linearizable",
            min_version=min_version,
            wait_version_gt=wait_version_gt,
            deadline=deadline,
            if_none_match=request.headers.get("if-none-match"),
            digest=digest,
            head_only=request.method == "HEAD",
            wire_dtype=wire_dtype,
            auth=request.headers.get("authorization"),
        )
    inm = h.version_tags(request.headers.get("if-none-match"), "If-None-Match")
    shard = store.shard_of(name)
    if consistency == "linearizable":
        await wait(
            store.barrier(shard), max(deadline, limits.request_timeout), "linearizable read barrier", write=False
        )
    if min_version is not None:
        await wait_version(store, name, min_version, deadline, must=True)
    if wait_version_gt is not None and not await wait_version(store, name, wait_version_gt + 1, deadline, must=False):
        t, shard = store.peek(name)  # headers only: no copy of a tensor updated in place
        return Response(status_code=304, headers=wire.tensor_headers(t.dtype, t.shape, t.version, shard))
    if rows is not None:
        return await _get_rows(store, name, rows, kind, request.method == "HEAD", wire_dtype)
    live, shard = store.peek(name)
    hdrs = wire.tensor_headers(live.dtype, live.shape, live.version, shard)
    if inm == "*" or (isinstance(inm, list) and live.version in inm):
        return Response(status_code=304, headers=hdrs)
    t, shard = await read_tensor(store, name)
    hdrs = wire.tensor_headers(t.dtype, t.shape, t.version, shard)
    if digest:
        value = t.value
        hdrs["X-Digest"] = "sha256:" + await anyio.to_thread.run_sync(
            lambda: hashlib.sha256(wire.raw_view(value)).hexdigest()
        )
    if wire_dtype is not None:
        return await wd.tensor_response(name, t.value, hdrs, wire_dtype, kind, request.method == "HEAD")
    return wire.encode(kind, name, t.value, hdrs, limits.json_max_elements, head_only=request.method == "HEAD")


async def _get_rows(
    store: StoreAPI, name: str, rows_text: str, kind: str, head_only: bool, wire_dtype: str | None = None
) -> Response:
    arr, t, shard = store.get_rows(name, partition_rows.parse_rows(rows_text))
    hdrs = wire.tensor_headers(t.dtype, arr.shape, t.version, shard)
    if wire_dtype is not None:
        return await wd.tensor_response(name, arr, hdrs, wire_dtype, kind, head_only)
    return wire.encode(kind, name, arr, hdrs, store.cfg.limits.json_max_elements, head_only=head_only)


async def wait_version(store: StoreAPI, name: str, version: int, deadline: float, must: bool = True) -> bool:
    fut = store.watch(name, version)
    if await wait_optional(fut, deadline):
        return True
    store.unwatch(name, fut)
    if must:
        # A replica without a leader or behind its log is unavailable (503);
        # a ready one simply has no such version yet (408, the caller's wait).
        kind = WaitExpired if store.is_ready() else Unavailable
        raise kind(
            f"this replica has not applied version {version} of {name!r} within "
            f"{deadline:g}s; retry or read from another replica"
        )
    return False
