"""The tensor routes for a partitioned tensor (store/partitions.py): create,
push, pull and delete fan out to the parts, one command per part in its own
shard, proposed concurrently; a pull streams the parts in order.

Each part applies atomically and has its own version. The answer carries the
version vector (`X-Versions`, a JSON list in part order), its minimum as
`X-Version`, and `ETag: "v0.v1..."`: the whole vector, which `If-Match` and
`If-None-Match` compare. A write whose parts did not all apply answers with
the first failure's status (503 if a part's shard had no leader in time),
naming the failed parts and listing those applied (`applied`): a retry with
the same X-Request-Id applies each part at most once.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

import anyio
import numpy as np
from starlette.responses import Response

from store import dtypes
from store.commands import Delete, Grad, LayoutCreate, Put
from store.errors import (
    InvalidRequest,
    NotFound,
    NotHosted,
    PreconditionFailed,
    StoreError,
    Unavailable,
    Unprocessable,
    echo,
)
from store.interface import StoreAPI
from store.partitions import (
    Layout,
    auto_partitions,
    check_partitions,
    row_counts,
    split,
)
from store.placement import shard_for

from . import headers as h
from . import part_forward, wire
from .bridge import wait

FINITE_IN_THREAD_BYTES = 1 << 20

CHUNK = wire.STREAM_CHUNK


# ---- headers -------------------------------------------------------------------------
def partitions_of(store: StoreAPI, hd: Mapping[str, str], t: wire.WireTensor) -> int:
    """K asked by X-Partitions (checked against the shape and the limits: 422),
    else what automatic partitioning picks; 1 is a whole tensor."""
    limits = store.cfg.limits
    text = hd.get("x-partitions")
    if text is None:
        nbytes = dtypes.expected_nbytes(t.dtype, t.shape)
        return auto_partitions(t.shape, nbytes, limits.partition_bytes, limits.partition_auto_bytes, store.cfg.shards)
    if not h.INTEGER_RE.fullmatch(text.strip()):
        raise InvalidRequest(f"X-Partitions: expected an integer, got {echo(text)}")
    k = int(text.strip())
    check_partitions(k, t.shape, limits.max_partitions)
    return k


def version_vector(value: str | None, header: str, k: int) -> list[int] | None:
    """'"3.4.3"' (the ETag of a partitioned tensor) -> [3, 4, 3]; one version
    ('"3"') applies to every part."""
    if value is None:
        return None
    v = value.strip()
    if v == "*":  # If-Match: * on a replace: the tensor exists, which it does
        return None
    if v.startswith("W/"):
        v = v[2:]
    if len(v) >= 2 and v[0] == v[-1] == '"':
        v = v[1:-1]
    items = v.split(".")
    try:
        out = [h.version_tag(item, header) for item in items]
    except InvalidRequest:
        raise InvalidRequest(f'{header}: expected a version vector such as "3.4.3", got {echo(value)}') from None
    if len(out) == 1:
        return out * k
    if len(out) != k:
        raise InvalidRequest(f"{header}: {len(out)} versions given for {k} parts")
    return out


def etag(versions: list[int]) -> str:
    return '"' + ".".join(str(v) for v in versions) + '"'


def answer_headers(store: StoreAPI, lay: Layout, versions: list[int]) -> dict[str, str]:
    return {
        "X-Dtype": lay.dtype,
        "X-Shape": ",".join(str(d) for d in lay.shape),
        "X-Version": str(min(versions)),
        "X-Versions": json.dumps(versions, separators=(",", ":")),
        "ETag": etag(versions),
        "X-Shard": str(shard_for(lay.name, store.cfg.shards)),
        "X-Partitions": json.dumps(lay.describe(store.cfg.shards), separators=(",", ":")),
    }


def written(store: StoreAPI, lay: Layout, versions: list[int], status: int = 200, created: bool = False) -> Response:
    doc: dict[str, Any] = {
        "name": lay.name,
        "version": min(versions),
        "versions": versions,
        "shard": shard_for(lay.name, store.cfg.shards),
        "partitions": lay.describe(store.cfg.shards, versions),
    }
    if created:
        doc["created"] = True
    hd = answer_headers(store, lay, versions)
    del hd["X-Partitions"]  # in the body
    return Response(json.dumps(doc, separators=(",", ":")).encode(), status, hd, media_type="application/json")


# ---- fan-out -----------------------------------------------------------------------
def _rid(rid: str | None) -> str:
    """One base id for every part's command, so a retry with the client's id
    finds each part's recorded outcome."""
    return rid if rid is not None else uuid.uuid4().hex


async def fan_out(
    store: StoreAPI, lay: Layout, cmds: list[Any], what: str, auth: str | None = None
) -> list[dict[str, Any]]:
    """Propose one command per part concurrently and wait for all; a part
    whose shard is not hosted here goes to a replica that hosts it, with the
    caller's `auth` (api/part_forward.py). All applied: their results in part
    order. Otherwise the first failure, with `failed` (part, shard, error) and
    `applied` (part, shard, version)."""
    shards = lay.part_shards(store.cfg.shards)
    timeout = store.cfg.limits.request_timeout

    async def one(i: int, cmd: Any) -> dict[str, Any]:
        if not part_forward.is_local(store, shards[i]):
            return await part_forward.write(store, shards[i], cmd, auth, f"{what} of part {i} of {lay.name!r}")
        fut: Future[Any] = store.write(cmd)
        result: dict[str, Any] = await wait(fut, timeout, f"{what} of part {i} of {lay.name!r} (shard {shards[i]})")
        return result

    outcomes = await asyncio.gather(*(one(i, c) for i, c in enumerate(cmds)), return_exceptions=True)
    applied, failed = [], []
    for i, out in enumerate(outcomes):
        if isinstance(out, StoreError):
            failed.append((i, out))
        elif isinstance(out, BaseException):
            raise out
        else:
            applied.append({"part": i, "shard": shards[i], "version": out.get("version")})
    if not failed:
        return [o for o in outcomes if isinstance(o, dict)]
    # 503 first: a part that may still apply is what the client must retry
    failed.sort(key=lambda f: (not isinstance(f[1], Unavailable), f[0]))
    i, first = failed[0]
    names = ", ".join(f"part {j} (shard {shards[j]})" for j, _ in failed)
    detail = (
        f"{what} of {lay.name!r}: {names} failed; {len(applied)} of {lay.k} parts applied. Part {i}: {first.detail}"
    )
    extra = dict(first.extra)
    extra.update(
        failed=[{"part": j, "shard": shards[j], "error": e.code, "detail": e.detail} for j, e in failed],
        applied=applied,
    )
    if isinstance(first, Unavailable):
        raise type(first)(detail, retry_after=first.retry_after, **extra)
    raise type(first)(detail, **extra)


# ---- create, replace, push, delete ---------------------------------------------------
def _array(t: wire.WireTensor) -> np.ndarray:
    return np.frombuffer(t.data, dtype=dtypes.dtype_of(t.dtype)).reshape(t.shape)


async def create(
    store: StoreAPI, name: str, t: wire.WireTensor, k: int, options: dict[str, Any], auth: str | None = None
) -> Response:
    """Claim the name with the layout record (home shard), then create every
    part. A failure after the layout leaves the tensor with missing parts:
    reads of it answer 503 until a retry (same X-Request-Id, which finds the
    layout's and each applied part's recorded outcome) or a DELETE."""
    rid = _rid(options.pop("rid", None))
    counts = row_counts(t.shape[0], k)
    lay = Layout(name, t.dtype, tuple(t.shape), counts)
    timeout = store.cfg.limits.request_timeout
    try:
        await wait(
            store.write(LayoutCreate(name=name, dtype=t.dtype, shape=t.shape, counts=counts, rid=f"{rid}#layout")),
            timeout,
            "create",
        )
    except PreconditionFailed as e:
        existing = store.layout(name)
        if existing is None or e.extra.get("current_version") is not None:
            raise
        # an existing partitioned tensor: its version is the lowest part's (the SDK's exist_ok reads it)
        raise PreconditionFailed(e.detail, current_version=min(local_versions(store, existing))) from None
    cmds = _part_puts(lay, t, rid, options, if_none_match=True)
    results = await fan_out(store, lay, cmds, "create", auth)
    return written(store, lay, [r["version"] for r in results], 201, created=True)


def whole_tensor_exists(store: StoreAPI, name: str) -> bool:
    """A tensor stored whole under `name` on this replica (no layout record)."""
    try:
        store.peek(name)
    except NotFound:
        return False
    return True


def _part_puts(
    lay: Layout,
    t: wire.WireTensor,
    rid: str,
    options: dict[str, Any],
    if_none_match: bool = False,
    if_match: list[int] | None = None,
) -> list[Put]:
    """One Put per part, each with the part's own request id (`<rid>#p<i>`)."""
    parts = split(_array(t), lay.counts)
    return [
        Put(
            name=p,
            dtype=t.dtype,
            shape=lay.part_shape(i),
            data=wire.raw_view(parts[i]),
            if_none_match=if_none_match,
            if_match=None if if_match is None else if_match[i],
            rid=f"{rid}#p{i}",
            **options,
        )
        for i, p in enumerate(lay.parts())
    ]


async def replace(
    store: StoreAPI, lay: Layout, hd: Mapping[str, str], t: wire.WireTensor, options: dict[str, Any]
) -> Response:
    """PUT of an existing partitioned tensor: every part replaced (same dtype
    and shape as the whole), each with its own If-Match from the vector."""
    _same_shape(lay, t, "a replace")
    if_match = version_vector(hd.get("if-match"), "If-Match", lay.k)
    if if_match is not None:
        _precheck(store, lay, if_match)
    rid = _rid(options.pop("rid", None))
    cmds = _part_puts(lay, t, rid, options, if_match=if_match)
    results = await fan_out(store, lay, cmds, "replace", hd.get("authorization"))
    return written(store, lay, [r["version"] for r in results])


async def push(store: StoreAPI, lay: Layout, hd: Mapping[str, str], t: wire.WireTensor) -> dict[str, Any]:
    """A gradient of the whole tensor (POST .../grad), split by part."""
    _same_shape(lay, t, "a gradient")
    return await push_parts(
        store,
        lay,
        t,
        rid=_rid(h.request_id(hd.get("x-request-id"))),
        base=version_vector(hd.get("x-base-version"), "X-Base-Version", lay.k),
        if_match=version_vector(hd.get("if-match"), "If-Match", lay.k),
        auth=hd.get("authorization"),
    )


async def push_parts(
    store: StoreAPI,
    lay: Layout,
    t: wire.WireTensor,
    *,
    rid: str,
    base: list[int] | None = None,
    if_match: list[int] | None = None,
    auth: str | None = None,
) -> dict[str, Any]:
    """A gradient split by part, checked whole first (shape, finiteness,
    If-Match against this replica's view), so a bad push applies no part;
    part i's command carries the request id `<rid>#p<i>`."""
    _same_shape(lay, t, "a gradient")
    grad = _array(t)
    await refuse_nonfinite(store, lay, grad, "gradient")
    if if_match is not None:
        _precheck(store, lay, if_match)
    parts = split(grad, lay.counts)
    cmds = [
        Grad(
            name=p,
            dtype=t.dtype,
            shape=lay.part_shape(i),
            data=wire.raw_view(parts[i]),
            rid=f"{rid}#p{i}",
            base_version=None if base is None else base[i],
            if_match=None if if_match is None else if_match[i],
        )
        for i, p in enumerate(lay.parts())
    ]
    return pushed(store, lay, await fan_out(store, lay, cmds, "push", auth))


def pushed(store: StoreAPI, lay: Layout, results: list[dict[str, Any]]) -> dict[str, Any]:
    """The answer to a push whose every part applied (`results` in part order)."""
    versions = [r["version"] for r in results]
    out: dict[str, Any] = {
        "name": lay.name,
        "version": min(versions),
        "versions": versions,
        "shard": shard_for(lay.name, store.cfg.shards),
    }
    if all(r.get("duplicate") for r in results):
        out["duplicate"] = True
    return out


async def delete(store: StoreAPI, lay: Layout, hd: Mapping[str, str]) -> Response:
    """Every part (an absent one counts as deleted), then the layout."""
    if_match = version_vector(hd.get("if-match"), "If-Match", lay.k)
    if if_match is not None:
        _precheck(store, lay, if_match)
    rid = _rid(h.request_id(hd.get("x-request-id")))
    cmds = [
        Delete(name=p, rid=f"{rid}#p{i}", if_match=None if if_match is None else if_match[i])
        for i, p in enumerate(lay.parts())
    ]
    try:
        results = await fan_out(store, lay, cmds, "delete", hd.get("authorization"))
        versions = [r["version"] for r in results]
    except NotFound as e:  # parts a failed create never made, or an earlier delete removed
        failed: list[dict[str, Any]] = list(e.extra.get("failed", []))  # type: ignore[call-overload]
        if any(f["error"] != NotFound.code for f in failed):
            raise
        versions = [0] * lay.k
    await wait(store.write(Delete(name=lay.name, rid=f"{rid}#layout")), store.cfg.limits.request_timeout, "delete")
    doc = {"name": lay.name, "version": min(versions), "versions": versions, "deleted": True}
    return Response(json.dumps(doc, separators=(",", ":")).encode(), media_type="application/json")


def _same_shape(lay: Layout, t: wire.WireTensor, what: str) -> None:
    if (t.dtype, tuple(t.shape)) != (lay.dtype, lay.shape):
        raise Unprocessable(
            f"{what} is {t.dtype}{list(t.shape)} but tensor {lay.name!r} is {lay.dtype}{list(lay.shape)} "
            f"(partitioned in {lay.k} parts); no part was changed"
        )


async def refuse_nonfinite(store: StoreAPI, lay: Layout, values: np.ndarray, what: str) -> None:
    """422 for NaN/Inf in a push, unless the tensor allows them; large
    arrays are checked off the event loop (~4 ms per 64 MB)."""
    if _allows_nonfinite(store, lay):
        return
    large = values.nbytes > FINITE_IN_THREAD_BYTES
    finite = await anyio.to_thread.run_sync(dtypes.all_finite, values) if large else dtypes.all_finite(values)
    if not finite:
        raise Unprocessable(f"{what} for {lay.name!r} contains NaN or Inf; no part was changed")


def _allows_nonfinite(store: StoreAPI, lay: Layout) -> bool:
    for p in lay.parts():  # every part has the same settings: the first one hosted here
        try:
            part, _ = store.peek(p)
        except NotHosted:
            continue
        except StoreError:
            return False
        return part.allow_nonfinite
    return False


def _precheck(store: StoreAPI, lay: Layout, if_match: list[int]) -> None:
    """If-Match against this replica's view of every part hosted here, before
    anything is proposed; each part's command checks its own version again
    when applied (the only check of a part hosted elsewhere)."""
    current = local_versions(store, lay)
    shards = lay.part_shards(store.cfg.shards)
    here = [i for i, s in enumerate(shards) if part_forward.is_local(store, s)]
    if [current[i] for i in here] != [if_match[i] for i in here]:
        raise PreconditionFailed(
            f"tensor {lay.name!r} is at versions {current}, If-Match asked for {if_match}",
            current_version=min(v for v in current) if current else None,
            current_versions=current,
        )


def local_versions(store: StoreAPI, lay: Layout) -> list[int]:
    """Each part's version as seen here; 0 for a part that is absent or whose
    shard is not hosted here."""
    out = []
    for p in lay.parts():
        try:
            out.append(store.peek(p)[0].version)
        except (NotFound, NotHosted):
            out.append(0)
    return out
