"""Reads of a partitioned tensor (api/partitioned.py): the parts in order,
each read locally at its own version, streamed without assembling them."""

from __future__ import annotations

import asyncio
import hashlib
import io
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
import numpy.lib.format as npf
from starlette.responses import Response, StreamingResponse

from store import dtypes
from store.errors import NotFound, StoreError, Unavailable
from store.interface import StoreAPI
from store.partitions import Layout

from . import part_forward, wire, wire_dtypes
from .bridge import read_tensor, wait, wait_within
from .errors import WaitExpired
from .partitioned import answer_headers, local_versions, version_vector

CHUNK = wire.STREAM_CHUNK


async def pull(
    store: StoreAPI,
    lay: Layout,
    *,
    kind: str,
    linearizable: bool,
    min_version: int | None,
    wait_version_gt: int | None,
    deadline: float,
    if_none_match: str | None,
    digest: bool,
    head_only: bool,
    wire_dtype: str | None = None,
    auth: str | None = None,
) -> Response:
    """The whole tensor, its parts read in order; `min_version` and
    `consistency=linearizable` apply to every part. A part whose shard is not
    hosted here is read from a replica that hosts it with the caller's `auth`
    (api/part_forward.py); so is the wait of `wait_version_gt`, which waits
    until every part is past it."""
    limits = store.cfg.limits
    await settle_here(store, lay, range(lay.k), linearizable, min_version, deadline)
    read = Remote(auth, linearizable, min_version, deadline)
    if wait_version_gt is not None and not await wait_every_part(store, lay, wait_version_gt, deadline, auth):
        return await not_modified(store, lay, auth)
    records = await records_of(store, lay, read)
    versions = [t.version for t in records]
    hdrs = answer_headers(store, lay, versions)
    inm = if_none_match
    if inm is not None and (inm.strip() == "*" or version_vector(inm, "If-None-Match", lay.k) == versions):
        return Response(status_code=304, headers=hdrs)
    values = [t.value for t in records]
    if digest:
        hdrs["X-Digest"] = "sha256:" + await anyio.to_thread.run_sync(_sha256, values)
    if wire_dtype is not None:  # narrowed whole: an int8 row may span parts (a partitioned vector)
        whole = await anyio.to_thread.run_sync(np.concatenate, values)
        return await wire_dtypes.tensor_response(lay.name, whole, hdrs, wire_dtype, kind, head_only)
    if kind == wire.JSON:
        return wire.encode(kind, lay.name, np.concatenate(values), hdrs, limits.json_max_elements, head_only)
    head = b""
    if kind == wire.NPY:
        buf = io.BytesIO()
        header = {"descr": npf.dtype_to_descr(dtypes.dtype_of(lay.dtype)), "fortran_order": False, "shape": lay.shape}
        npf.write_array_header_1_0(buf, header)
        head = buf.getvalue()
    total = len(head) + sum(v.nbytes for v in values)
    hdrs["Content-Length"] = str(total)
    if head_only:
        return Response(b"", media_type=kind, headers=hdrs)
    return StreamingResponse(_stream(head, values), media_type=kind, headers=hdrs)


async def _stream(head: bytes, values: list[np.ndarray]) -> AsyncIterator[Any]:
    if head:
        yield head
    for v in values:
        view = wire.raw_view(v)
        for i in range(0, len(view), CHUNK):
            yield view[i : i + CHUNK]


def _sha256(values: list[np.ndarray]) -> str:
    hasher = hashlib.sha256()
    for v in values:
        hasher.update(wire.raw_view(v))
    return hasher.hexdigest()


@dataclass(frozen=True)
class Remote:
    """How the parts hosted elsewhere are read: the caller's auth and consistency."""

    auth: str | None
    linearizable: bool
    min_version: int | None
    deadline: float


async def settle_here(
    store: StoreAPI,
    lay: Layout,
    parts: Iterable[int],
    linearizable: bool,
    min_version: int | None,
    deadline: float,
) -> None:
    """The caller's consistency for those of `parts` (indices) hosted here: a
    barrier on their shards (`linearizable`), then every one at `min_version`
    or later (408, or 503 on a replica that is not ready, if not within
    `deadline`). Parts hosted elsewhere get it with their forwarded read."""
    shards = lay.part_shards(store.cfg.shards)
    here = [i for i in parts if part_forward.is_local(store, shards[i])]
    if linearizable:
        timeout = max(deadline, store.cfg.limits.request_timeout)
        await asyncio.gather(
            *(
                wait_within(store.barrier(s), timeout, False, "linearizable read barrier")
                for s in sorted({shards[i] for i in here})
            )
        )
    names = lay.parts()
    if min_version is not None and not await wait_all(store, [names[i] for i in here], min_version, deadline):
        kind = WaitExpired if store.is_ready() else Unavailable
        raise kind(
            f"this replica has not applied version {min_version} of every part of {lay.name!r} within "
            f"{deadline:g}s; retry or read from another replica"
        )


async def not_modified(store: StoreAPI, lay: Layout, auth: str | None) -> Response:
    """The 304 of a long poll that ran out: every part's version now (a HEAD
    for a part hosted elsewhere: no part's bytes are read)."""
    shards = lay.part_shards(store.cfg.shards)
    here = local_versions(store, lay)

    async def one(i: int, p: str) -> int:
        if part_forward.is_local(store, shards[i]):
            return here[i]
        return await part_forward.version_of(store, shards[i], p, auth)

    versions = await asyncio.gather(*(one(i, p) for i, p in enumerate(lay.parts())))
    return Response(status_code=304, headers=answer_headers(store, lay, list(versions)))


async def records_of(store: StoreAPI, lay: Layout, remote: Remote) -> list[Any]:
    shards = lay.part_shards(store.cfg.shards)

    async def one(i: int, p: str) -> Any:
        if not part_forward.is_local(store, shards[i]):
            return await part_forward.read(
                store,
                shards[i],
                p,
                lay.dtype,
                lay.part_shape(i),
                remote.auth,
                linearizable=remote.linearizable,
                min_version=remote.min_version,
                deadline=remote.deadline,
            )
        try:
            return (await read_tensor(store, p))[0]
        except NotFound:
            raise Unavailable(
                f"part {i} of {lay.name!r} is not on this replica (not applied here yet, or its creation "
                "failed: retry the create with the same X-Request-Id, or delete the tensor)",
                part=i,
            ) from None

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(lay.parts()))))


async def wait_every_part(store: StoreAPI, lay: Layout, version_gt: int, deadline: float, auth: str | None) -> bool:
    """Whether every part passed `version_gt` within `deadline`: the parts
    hosted here watched together, then each part hosted elsewhere long-polled
    on a replica hosting it, one after another (versions only grow, so one
    pass suffices, and a poll holds at most one connection to a peer)."""
    until = time.monotonic() + deadline
    shards = lay.part_shards(store.cfg.shards)
    here = [p for p, s in zip(lay.parts(), shards, strict=True) if part_forward.is_local(store, s)]
    if not await wait_all(store, here, version_gt + 1, deadline):
        return False
    for p, s in zip(lay.parts(), shards, strict=True):
        if not part_forward.is_local(store, s):
            left = max(until - time.monotonic(), 0.0)  # 0: still asked, it may be past already
            if not await part_forward.wait_past(store, s, p, version_gt, left, auth):
                return False
    return True


async def wait_all(store: StoreAPI, parts: list[str], version: int, deadline: float) -> bool:
    async def one(p: str) -> bool:
        fut = store.watch(p, version)
        try:
            await wait(fut, deadline, "version wait", write=False)
            return True
        except StoreError:
            store.unwatch(p, fut)
            return False

    return all(await asyncio.gather(*(one(p) for p in parts)))
