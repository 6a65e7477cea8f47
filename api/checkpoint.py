"""Checkpoints: every tensor (and embedding table: api/checkpoint_tables.py)
as one safetensors file, streamed, and restoring from one.

File layout (docs/operations.md has the full description):

* a tensor's value is stored under its own name, e.g. ``fc1.weight``;
* each array of its optimizer state under ``<name>/<state key>``, e.g.
  ``fc1.weight/exp_avg``. ``/`` never occurs in a tensor name (names are
  letters, digits and ``_ . : -``), so a key with a ``/`` is always state and
  a key without one is always a value; ``::`` would be ambiguous because
  ``:`` is legal in names;
* the safetensors metadata key ``paramstore`` holds JSON:
  ``{"format": "paramstore.checkpoint", "format_version": 1, "node", "created",
  "shards", "cluster_shards", "state", "tensors": {name: {"version", "shard",
  "dtype", "shape", "optimizer", "allow_nonfinite", "max_staleness",
  "staleness_policy", "state_arrays": [keys], "state_scalars": {key: value}}}}``;
  ``versions`` holds ``{name: version}`` (the same key batch pulls use);
* tables under ``@table/<name>/<shard>/...`` and the metadata's ``tables``.

Consistency: per shard, a linearizable barrier (a no-op through the Raft log)
and then one capture of the shard's whole tensor map on its applier thread,
between two commands. Every tensor of a shard is therefore from one point of
the log that is at least as new as any write acknowledged before the request.
Different shards are captured at different points.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from fastapi import APIRouter, Query, Request
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse, Response, StreamingResponse

from store import dtypes, record
from store.buffers import byte_view
from store.commands import Put
from store.errors import InvalidRequest, StoreError, Unprocessable, echo
from store.interface import StoreAPI
from store.record import Tensor

from . import checkpoint_tables
from . import headers as h
from . import openapi as oa
from . import partition_checkpoint as partitioned
from . import safetensors_stream as sts
from .bridge import wait, wait_within
from .errors import PayloadTooLarge, UnsupportedMediaType, error_response

router = APIRouter()

FORMAT = "paramstore.checkpoint"
FORMAT_VERSION = 1
STATE_SEP = "/"
STATE_KEY_RE = re.compile(r"[A-Za-z0-9_]{1,64}")
META_KEY = "paramstore"
RESTORE_CONCURRENCY = 8
CHUNK = 1 << 20
BIG_TENSOR_BYTES = 32 << 20


def _tmp_dir(store: StoreAPI) -> Path:
    """Checkpoint files are staged next to the data (not in a possibly small
    tmpfs); leftovers of interrupted requests older than an hour are removed."""
    d = Path(store.data_dir) / "checkpoint-tmp"
    d.mkdir(parents=True, exist_ok=True)
    cutoff = time.time() - 3600
    for old in d.iterdir():
        try:
            if old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:
            pass
    return d


@router.get(
    "/v1/checkpoint",
    response_class=Response,
    responses={**oa.safetensors_file("Every tensor hosted here"), **oa.answers(400, 408, 503)},
)
async def save_checkpoint(
    request: Request,
    state: bool = Query(True, description="include optimizer state (0 leaves it out)"),
    timeout: float | None = Query(None, ge=0, le=3600),
) -> Response:
    """Every tensor hosted here as one safetensors file (see the module doc)."""
    store: StoreAPI = request.app.state.store
    limits = store.cfg.limits
    deadline = min(timeout if timeout is not None else limits.request_timeout, limits.max_wait_seconds)
    mine = timeout is not None and timeout < min(limits.request_timeout, limits.max_wait_seconds)
    shards = store.hosted_shards()
    await asyncio.gather(
        *(wait_within(store.barrier(s), deadline, mine, f"checkpoint barrier on shard {s}") for s in shards)
    )
    captured = await asyncio.gather(
        *(wait_within(store.capture(s), deadline, mine, f"checkpoint capture of shard {s}") for s in shards)
    )
    node = store.node.id
    wholes = await anyio.to_thread.run_sync(partitioned.merge_parts, store, dict(zip(shards, captured, strict=True)))
    tables, tables_skipped = await anyio.to_thread.run_sync(checkpoint_tables.dump_all, store)
    try:
        entries, metadata = _entries(node, store.cfg.shards, wholes, state)
        table_entries, described = checkpoint_tables.entries(tables, state)
        doc = json.loads(metadata[META_KEY])
        doc["tables"] = described
        if tables_skipped:
            doc["tables_skipped"] = tables_skipped
        metadata[META_KEY] = json.dumps(doc)
        entries += table_entries
        size = len(sts.header(entries, metadata)) + sum(e.nbytes for e in entries)
    except BaseException:
        checkpoint_tables.close_all(tables)
        raise
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return StreamingResponse(
        _closing(sts.stream(entries, metadata), tables),
        media_type="application/x-safetensors",
        headers={
            "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="paramstore-{node}-{stamp}.safetensors"',
        },
        background=BackgroundTask(checkpoint_tables.close_all, tables),  # also if the stream never started
    )


def _one(arr: np.ndarray) -> Callable[[], Iterator[np.ndarray]]:
    return lambda: iter((arr.astype(arr.dtype.newbyteorder("<"), copy=False),))


def _closing(chunks: Iterator[bytes | memoryview], tables: Any) -> Iterator[bytes | memoryview]:
    """Iterated on a worker thread by Starlette; the frozen copies go however it ends."""
    try:
        yield from chunks
    finally:
        checkpoint_tables.close_all(tables)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _entries(
    node: str, cluster_shards: int, wholes: partitioned.Captured, with_state: bool
) -> tuple[list[sts.Entry], dict[str, str]]:
    """The file entries of every captured tensor (their stored buffers, not
    copies) and the metadata describing them."""
    arrays: dict[str, np.ndarray] = {}
    described: dict[str, dict[str, Any]] = {}
    captured = wholes.shards
    for shard, tensors in sorted(captured.items()):
        for name, t in sorted(tensors.items()):
            entry = record.metadata(t, state=with_state)
            del entry["name"]  # the key
            entry["shard"] = shard
            if name in wholes.layouts:  # a partitioned tensor, assembled: its parts' versions and row counts
                entry.update(wholes.layouts[name])
            for key, arr in record.arrays(t, state=with_state).items():
                arrays[name if key == record.VALUE else f"{name}{STATE_SEP}{key}"] = arr
            described[name] = entry
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "node": node,
        "created": round(time.time(), 3),
        "shards": sorted(captured),
        "cluster_shards": cluster_shards,
        "state": with_state,
        "tensors": described,
        "incomplete": wholes.incomplete,
    }
    entries = [
        sts.Entry(
            name,
            dtypes.SAFETENSORS[dtypes.dtype_name(arr.dtype)],
            tuple(arr.shape),
            _one(arr),
        )
        for name, arr in sorted(arrays.items())
    ]
    metadata = {META_KEY: json.dumps(meta), "versions": json.dumps({n: d["version"] for n, d in described.items()})}
    return entries, metadata


# ---- restore -------------------------------------------------------------------------
@router.put(
    "/v1/checkpoint",
    openapi_extra=oa.load_checkpoint_extra(),
    responses={
        **oa.json_ok(oa.OBJECT, "What was created, replaced, skipped"),
        **oa.answers(400, 409, 412, 413, 415, 422, 503),
    },
)
async def load_checkpoint(
    request: Request,
    mode: str = Query("create", pattern="^(create|replace)$"),
    if_match: str | None = Query(
        None,
        pattern="^checkpoint$",
        description="'checkpoint': replace a tensor only if it is still at the version recorded in the file",
    ),
    partitions: str | None = Query(
        None,
        max_length=65536,
        pattern=partitioned.PARTITIONS_QUERY,
        description="name:K,name:K,...: restore these tensors in K parts (1: whole), whatever the file recorded",
    ),
) -> Response:
    """Restore a checkpoint: values, optimizer specs and optimizer state.
    `mode=create` (default) creates tensors that do
    not exist and skips the others; `mode=replace` also replaces existing ones,
    with `if_match=checkpoint` only those still at the checkpoint's version."""
    store: StoreAPI = request.app.state.store
    if if_match is not None and mode != "replace":
        raise InvalidRequest("if_match=checkpoint only applies with mode=replace")
    asked = partitioned.parse_partitions_query(partitions)
    limit = store.cfg.limits.max_checkpoint_bytes
    path = await _receive_file(request, await anyio.to_thread.run_sync(_tmp_dir, store), limit)
    try:
        plan, tables = await anyio.to_thread.run_sync(_read_plan, path)
        for item in plan:
            item["partitions"] = asked.get(item["name"], item["meta"].get("partitions"))
        report = await _restore_all(store, path, plan, mode, if_match is not None)
        if tables:
            table_report = await checkpoint_tables.restore(store, path, tables, mode, if_match is not None)
            report["failed"] += table_report.pop("failed")
            report.update(table_report)
    finally:
        _unlink(path)
    return _report_response(report)


async def _restore_all(
    store: StoreAPI, path: str, plan: list[dict[str, Any]], mode: str, if_unchanged: bool
) -> dict[str, Any]:
    """Restore every tensor of `plan` this replica hosts; the report of what happened to each."""
    report: dict[str, Any] = {
        "created": [],
        "replaced": [],
        "skipped": [],
        "failed": [],
        "versions": {},
        "state_restored": [],
    }
    hosted = set(store.hosted_shards())
    sem = asyncio.Semaphore(RESTORE_CONCURRENCY)
    big = asyncio.Semaphore(1)  # one large tensor in memory at a time

    async def restore_one(item: dict[str, Any]) -> None:
        async with sem, big if item["nbytes"] > BIG_TENSOR_BYTES else contextlib.nullcontext():
            name = item["name"]
            shard = store.shard_of(name)
            if shard not in hosted:  # restore those from a replica of that shard
                report["skipped"].append(
                    {
                        "name": name,
                        "reason": "not_hosted",
                        "shard": shard,
                        "hosts": [n.url for n in store.hosts_of(shard)],
                    }
                )
                return
            await _restore_tensor(store, path, item, mode, if_unchanged, report)

    await asyncio.gather(*(restore_one(item) for item in plan))
    return report


async def _restore_tensor(
    store: StoreAPI, path: str, item: dict[str, Any], mode: str, if_unchanged: bool, report: dict[str, Any]
) -> None:
    """Load one tensor's arrays from the file and propose its restore; adds the outcome to `report`."""
    name = item["name"]
    try:
        arrays = {record.VALUE: await anyio.to_thread.run_sync(_load_array, path, name)}
        for key in item["state_arrays"]:
            arrays[key] = await anyio.to_thread.run_sync(_load_array, path, f"{name}{STATE_SEP}{key}")
        t = record.from_metadata(item["meta"], arrays)
        k = partitioned.restore_partitions(store, t, item["partitions"])
        if k > 1 or store.layout(name) is not None:
            part_versions = item["meta"].get("versions") if if_unchanged else None
            result = await partitioned.restore(store, t, k, mode, part_versions, _restore_command)
        else:
            cmd = _restore_command(t, mode, if_unchanged and item["version"] is not None)
            result = await wait(store.write(cmd), store.cfg.limits.request_timeout, f"restore of {name}")
    except StoreError as e:
        if mode == "create" and e.code == "precondition_failed":
            report["skipped"].append(
                {"name": name, "reason": "exists", "current_version": e.extra.get("current_version")}
            )
        else:
            report["failed"].append({"name": name, **e.to_dict()})
        return
    report["created" if result.get("created") else "replaced"].append(name)
    report["versions"][name] = result["version"]
    if t.opt_state:  # what _restore_command restores
        report["state_restored"].append(name)


def _report_response(report: dict[str, Any]) -> Response:
    for key in ("created", "replaced", "state_restored"):
        report[key].sort()
    for key in ("skipped", "failed"):
        report[key].sort(key=lambda d: d["name"])
    if report["failed"]:
        # an error body like every other ({"error", "detail"}, status from api/errors.py,
        # Retry-After on 503) for the first failure, plus the whole report
        first = dict(report["failed"][0])
        name = first.pop("name")
        first["detail"] = f"{len(report['failed'])} tensor(s) not restored; first: {name}: {first['detail']}"
        return error_response(StoreError.from_dict(first), extra=report)
    return JSONResponse(report)


async def _receive_file(request: Request, tmp: Path, limit: int) -> str:
    """Stream the body to a file (a checkpoint may be larger than any one
    request body the tensor routes accept), refused with 413 as soon as it
    passes `limit` bytes (by Content-Length, or counted as a chunked body arrives)."""
    ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if ctype not in ("", "application/octet-stream", "application/x-safetensors"):
        raise UnsupportedMediaType("a checkpoint body is a safetensors file (application/x-safetensors)")
    too_large = PayloadTooLarge(f"a checkpoint body over limits.max_checkpoint_bytes ({limit})", limit=limit)
    length = request.headers.get("content-length")
    if length is not None and length.isascii() and length.isdigit() and int(length) > limit:
        raise too_large
    fd, path = tempfile.mkstemp(dir=tmp, prefix="load-", suffix=".safetensors")
    f = os.fdopen(fd, "wb")
    try:
        buf = bytearray()
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise too_large
            buf += chunk
            if len(buf) >= CHUNK:
                data, buf = bytes(buf), bytearray()
                await anyio.to_thread.run_sync(f.write, data)
        if buf:
            await anyio.to_thread.run_sync(f.write, bytes(buf))
        await anyio.to_thread.run_sync(f.close)
    except BaseException:
        f.close()
        _unlink(path)
        raise
    return path


def _read_plan(path: str) -> tuple[list[dict[str, Any]], list[checkpoint_tables.TablePlan]]:
    """What to restore, from the file's metadata (values, specs, and the
    optimizer state the file holds; tables). A plain safetensors file (no paramstore metadata, e.g. a torch
    state_dict) restores every key as a tensor with the `assign` optimizer."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            keys = list(f.keys())
            meta = f.metadata() or {}
            sizes, shapes = {}, {}
            for k in keys:
                sl = f.get_slice(k)
                shapes[k] = {"shape": sl.get_shape()}
                sizes[k] = int(np.prod(sl.get_shape(), dtype=np.int64)) * _itemsize(sl.get_dtype())
    except Exception as e:
        raise InvalidRequest(f"body is not a valid safetensors file: {e}") from None
    described: dict[str, dict[str, Any]] = {}
    doc: dict[str, Any] = {}
    if META_KEY in meta:
        try:
            doc = json.loads(meta[META_KEY])
            if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format {echo(doc.get('format'))} version {echo(doc.get('format_version'))}")
            described = doc["tensors"]
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise InvalidRequest(f"metadata {META_KEY!r} is not a paramstore checkpoint: {e}") from None
    tables = checkpoint_tables.plan(doc, shapes)
    keys = [k for k in keys if not k.startswith(checkpoint_tables.PREFIX)]
    plan = []
    state_keys: dict[str, list[str]] = {}
    tensors = {name for name in keys if STATE_SEP not in name}
    for name in keys:
        if STATE_SEP in name:  # optimizer state; see the module doc
            owner, _, key = name.partition(STATE_SEP)
            # an entry nothing would restore is refused, not skipped in silence ('../x')
            if owner not in tensors or not STATE_KEY_RE.fullmatch(key):
                raise InvalidRequest(
                    f"entry {name[:100]!r} is not the optimizer state of a tensor in the file "
                    f"('<tensor>{STATE_SEP}<state key>')"
                )
            state_keys.setdefault(owner, []).append(key)
    for name in keys:
        if STATE_SEP in name:
            continue
        h.tensor_name(name)
        d = _described(described, name)
        plan.append(
            {
                "name": name,
                "version": d.get("version"),
                "nbytes": sizes[name],
                "meta": dict(d, name=name),  # for record.from_metadata
                "state_arrays": sorted(state_keys.get(name, [])),
            }
        )
    return plan, tables


def _described(described: Any, name: str) -> dict[str, Any]:
    """The file's metadata of tensor `name` ({} if none); InvalidRequest if its
    types are wrong (values themselves are checked when the put applies)."""
    d = described.get(name, {}) if isinstance(described, dict) else None
    if not isinstance(d, dict) or not all(
        d.get(key) is None or isinstance(d[key], want)
        for key, want in (("version", int), ("optimizer", dict), ("state_scalars", dict))
    ):
        raise InvalidRequest(f"metadata {META_KEY!r}: the entry of {echo(name)} is malformed")
    return d


def _itemsize(safetensors_code: str) -> int:
    """For sizing only: dtypes the store does not hold are refused when loaded."""
    name = dtypes.FROM_SAFETENSORS.get(safetensors_code)
    return dtypes.DTYPES[name].itemsize if name else 8


def _restore_command(t: Tensor, mode: str, if_match: bool) -> Put:
    """The put that restores record `t` (its metadata from the file, where
    it has some): value, optimizer spec and settings, and the optimizer
    state the file holds."""
    arrays = {k: v for k, v in t.opt_state.items() if isinstance(v, np.ndarray)}
    scalars = {k: v for k, v in t.opt_state.items() if not isinstance(v, np.ndarray)}
    restore_state = bool(arrays or scalars)
    return Put(
        name=t.name,
        dtype=t.dtype,
        shape=t.shape,
        data=_raw(t.value),
        optimizer=t.optimizer,
        allow_nonfinite=t.allow_nonfinite,
        max_staleness=t.max_staleness,
        staleness_policy=t.staleness_policy,
        sync=t.sync,
        if_none_match=mode == "create",
        if_match=t.version if mode == "replace" and if_match else None,
        state_arrays={k: _raw(v) for k, v in arrays.items()} if restore_state else None,
        state_scalars=scalars if restore_state else None,
    )


def _raw(arr: np.ndarray) -> memoryview:
    return byte_view(arr.reshape(-1)).cast("B")


def _load_array(path: str, name: str) -> np.ndarray:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            arr: np.ndarray = f.get_tensor(name)
    except Exception as e:  # e.g. bfloat16, which numpy cannot hold
        raise Unprocessable(f"tensor {name!r} cannot be read: {e}") from None
    dtypes.dtype_name(arr.dtype)  # Unprocessable for dtypes the store does not hold
    arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    return arr if arr.flags.c_contiguous else arr.copy(order="C")  # 0-d stays 0-d
