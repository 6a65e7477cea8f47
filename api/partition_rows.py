"""Row reads (`GET ?rows=`) and sparse pushes (`POST .../grad-rows`) of a
partitioned tensor. Parts are row ranges of the first dimension, so each row
lives in exactly one part, at a row of its own.

A sparse push goes to *every* part, an empty one (k = 0) to the parts it does
not touch: every push then raises every part's version by one and steps every
part's optimizer once, as a whole tensor's sparse push does, so version
vectors stay aligned and `min_version` keeps meaning "after push N".
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from starlette.responses import Response

from store import dtypes
from store.commands import GradRows
from store.errors import InvalidRequest, Unprocessable
from store.interface import StoreAPI
from store.partitions import Layout, bounds
from store.placement import shard_for

from . import headers as h
from . import part_forward, partition_reads, wire, wire_dtypes
from .partitioned import _precheck, _rid, fan_out, pushed, refuse_nonfinite, version_vector


def parse_rows(text: str) -> np.ndarray:
    try:
        return np.array([int(r) for r in text.split(",") if r.strip()], dtype=np.int64)
    except ValueError:
        raise InvalidRequest("rows: expected comma-separated integers") from None


def locate(lay: Layout, rows: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(part of each row, its row within that part); 422 for a row out of range."""
    n = lay.shape[0]
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise Unprocessable(f"{what} must be in [0, {n}) for {lay.name!r}")
    starts = np.array([a for a, _ in bounds(lay.counts)], dtype=np.int64)
    part = np.searchsorted(starts, rows, side="right") - 1
    return part, rows - starts[part]


async def get_rows(
    store: StoreAPI,
    lay: Layout,
    rows_text: str,
    *,
    kind: str,
    head_only: bool,
    wire_dtype: str | None,
    linearizable: bool,
    min_version: int | None,
    wait_version_gt: int | None,
    deadline: float,
    auth: str | None,
) -> Response:
    """The rows in the order asked; each part touched is read at its own
    version with the caller's consistency. `X-Version` is the least version of
    the parts read, `X-Versions` every part's (null: not read).
    `wait_version_gt` waits, as for a whole pull, until every part passed it
    (304 with the whole tensor's headers if not within the deadline)."""
    rows = parse_rows(rows_text)
    part, local = locate(lay, rows, "rows")
    if wait_version_gt is not None and not await partition_reads.wait_every_part(
        store, lay, wait_version_gt, deadline, auth
    ):
        return await partition_reads.not_modified(store, lay, auth)
    out = np.empty((len(rows), *lay.shape[1:]), dtype=dtypes.dtype_of(lay.dtype))
    shards = lay.part_shards(store.cfg.shards)
    touched = [int(i) for i in np.unique(part)]
    await partition_reads.settle_here(store, lay, touched, linearizable, min_version, deadline)

    async def one(i: int) -> tuple[int, np.ndarray, np.ndarray, int]:
        sel = np.flatnonzero(part == i)
        name = lay.parts()[i]
        if part_forward.is_local(store, shards[i]):
            arr, t, _ = store.get_rows(name, local[sel])
            return i, sel, arr, t.version
        got = await part_forward.read_rows(
            store,
            shards[i],
            name,
            local[sel],
            lay.dtype,
            lay.shape[1:],
            auth,
            linearizable=linearizable,
            min_version=min_version,
            deadline=deadline,
        )
        return i, sel, got.value, got.version

    versions: list[int | None] = [None] * lay.k
    for i, sel, arr, version in await asyncio.gather(*(one(i) for i in touched)):
        out[sel] = arr
        versions[i] = version
    read = [v for v in versions if v is not None]
    hdrs = wire.tensor_headers(lay.dtype, out.shape, min(read) if read else 0, shard_for(lay.name, store.cfg.shards))
    hdrs["X-Versions"] = json.dumps(versions, separators=(",", ":"))
    if wire_dtype is not None:
        return await wire_dtypes.tensor_response(lay.name, out, hdrs, wire_dtype, kind, head_only)
    return wire.encode(kind, lay.name, out, hdrs, store.cfg.limits.json_max_elements, head_only=head_only)


async def push_rows(
    store: StoreAPI, lay: Layout, hd: Mapping[str, str], idx: wire.WireTensor, vals: wire.WireTensor
) -> dict[str, Any]:
    """A sparse gradient split by part, checked whole first (row shape and
    dtype, indices in range, finiteness, If-Match against this replica's
    view), so a bad push applies no part."""
    if (vals.dtype, tuple(vals.shape[1:])) != (lay.dtype, lay.shape[1:]):
        raise Unprocessable(
            f"rows are {vals.dtype}{list(vals.shape[1:])} but rows of {lay.name!r} are "
            f"{lay.dtype}{list(lay.shape[1:])} (partitioned in {lay.k} parts); no part was changed"
        )
    indices = np.frombuffer(idx.data, dtype=np.int64)
    values = np.frombuffer(vals.data, dtype=dtypes.dtype_of(vals.dtype)).reshape(vals.shape)
    part, local = locate(lay, indices, "row indices")
    await refuse_nonfinite(store, lay, values, "gradient rows")
    base = version_vector(hd.get("x-base-version"), "X-Base-Version", lay.k)
    if_match = version_vector(hd.get("if-match"), "If-Match", lay.k)
    if if_match is not None:
        _precheck(store, lay, if_match)
    rid = _rid(h.request_id(hd.get("x-request-id")))
    order = np.argsort(part, kind="stable")  # each part's positions, in the order given
    starts = np.searchsorted(part[order], np.arange(lay.k + 1))
    cmds = []
    for i, p in enumerate(lay.parts()):
        sel = order[starts[i] : starts[i + 1]]
        cmds.append(
            GradRows(
                name=p,
                dtype=lay.dtype,
                row_shape=lay.shape[1:],
                k=len(sel),
                indices=wire.raw_view(local[sel]),  # fancy indexing made contiguous copies: no more
                values=wire.raw_view(values[sel]),
                rid=f"{rid}#p{i}",
                base_version=None if base is None else base[i],
                if_match=None if if_match is None else if_match[i],
            )
        )
    return pushed(store, lay, await fan_out(store, lay, cmds, "sparse push", hd.get("authorization")))
