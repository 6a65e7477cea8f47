"""Embedding tables in checkpoints (GET/PUT /v1/checkpoint; api/checkpoint.py
has the file format of tensors).

Each shard part of a table is four entries, `@table/<name>/<shard>/ids`,
`.../rows` (storage dtype, BF16 for bfloat16), `.../state` (float32
optimizer state; left out with `state=0` or when the optimizer keeps none)
and `.../v` (each row's last-update version, which eviction ages rows by);
`@` occurs in no tensor or table name. The `paramstore` metadata's `tables`
holds each table's config and, per part, its version, step and row count.

Saving streams every part from a frozen copy (store/tables/export.py), never
whole in memory. Restoring reads the file in chunks of rows and proposes one
TableLoad per shard a chunk touches; parts are re-split by the restoring
cluster's shards. Admission counters are not saved: a restored table counts
admissions from zero.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import anyio
import numpy as np

from store.errors import InvalidRequest, NotFound, StoreError, Unprocessable, echo
from store.interface import StoreAPI
from store.tables.export import PartDump
from store.tables.records import record_dtype
from store.tables.rowopt import initial_state
from store.tables.spec import TableSpec, check_name, parse_spec

from . import safetensors_stream as sts
from .bridge import wait
from .table_wire import _ST_OF_STORAGE

PREFIX = "@table/"
COLUMNS = ("ids", "rows", "state", "v")
CHUNK_ROWS = 65536


# ---- saving ------------------------------------------------------------------------------
def dump_all(store: StoreAPI) -> tuple[list[tuple[str, TableSpec, list[PartDump]]], str | None]:
    """A frozen copy of every table's parts; or none and why (a replica that
    does not host every shard holds no whole table)."""
    service = store.tables
    if set(store.hosted_shards()) != set(range(service.shards)):
        return [], "this replica does not host every shard; save tables from one that does"
    out = []
    try:
        for info in service.list():
            try:
                spec, dumps = service.dump(info["name"])
            except NotFound:  # deleted meanwhile
                continue
            out.append((info["name"], spec, dumps))
    except BaseException:
        close_all(out)
        raise
    return out, None


def close_all(tables: list[tuple[str, TableSpec, list[PartDump]]]) -> None:
    for _, _, dumps in tables:
        for d in dumps:
            d.close()


def entries(
    tables: list[tuple[str, TableSpec, list[PartDump]]], with_state: bool
) -> tuple[list[sts.Entry], dict[str, Any]]:
    """The file entries of the tables and their `tables` metadata."""
    out: list[sts.Entry] = []
    described: dict[str, Any] = {}
    for name, spec, dumps in tables:
        parts = {}
        width = record_dtype(spec)["state"].shape[0]
        for d in dumps:
            key = f"{PREFIX}{name}/{d.shard}/"
            n = d.rows
            out.append(sts.Entry(key + "ids", "I64" if spec.id_dtype == "int64" else "U64", (n,), _column(d, "ids")))
            out.append(sts.Entry(key + "rows", _ST_OF_STORAGE[spec.dtype], (n, spec.dim), _column(d, "rows")))
            if with_state and width:
                out.append(sts.Entry(key + "state", "F32", (n, width), _column(d, "state")))
            out.append(sts.Entry(key + "v", "U64", (n,), _column(d, "v")))
            parts[str(d.shard)] = {"version": d.version, "step": d.meta.step, "rows": n}
        described[name] = {"config": spec.to_json(), "parts": parts, "state": bool(with_state and width)}
    return out, described


def _column(d: PartDump, column: str) -> Any:
    return lambda: d.column(column)


# ---- restoring --------------------------------------------------------------------------
@dataclass(frozen=True)
class TablePlan:
    name: str
    spec: TableSpec
    config: dict[str, Any]
    parts: dict[int, dict[str, Any]]  # file shard -> {"version", "step", "rows"}
    has_state: bool  # the file holds optimizer state


def plan(doc: dict[str, Any], header: dict[str, Any]) -> list[TablePlan]:
    """The tables a checkpoint holds, checked against its entries (InvalidRequest if they disagree)."""
    described = doc.get("tables") or {}
    keys = {k for k in header if k.startswith(PREFIX)}
    if not isinstance(described, dict):
        raise InvalidRequest("metadata 'paramstore': 'tables' is malformed")
    plans, expected = [], set()
    for name, d in sorted(described.items()):
        try:
            check_name(name)
            spec = parse_spec(d["config"])
            parts = {int(s): {k: int(p[k]) for k in ("version", "step", "rows")} for s, p in d["parts"].items()}
            state = bool(d.get("state"))
        except (StoreError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise InvalidRequest(f"metadata 'paramstore': table {name!r} is malformed: {e}") from None
        width = record_dtype(spec)["state"].shape[0]
        for shard, p in parts.items():
            key = f"{PREFIX}{name}/{shard}/"
            want = {"ids": [p["rows"]], "rows": [p["rows"], spec.dim], "v": [p["rows"]]}
            if state:
                want["state"] = [p["rows"], width]
            for column, shape in want.items():
                entry = header.get(key + column)
                if entry is None or list(entry["shape"]) != shape:
                    raise InvalidRequest(f"entry {key + column!r}: missing, or not of shape {shape}")
                expected.add(key + column)
        plans.append(TablePlan(name, spec, d["config"], parts, state))
    unknown = sorted(keys - expected)
    if unknown:
        raise InvalidRequest(f"entry {unknown[0][:100]!r} belongs to no table the metadata describes")
    return plans


class _Columns:
    """Rows a..b of a part's columns, read straight from the file (numpy's
    safetensors reader has no bfloat16)."""

    def __init__(self, f: BinaryIO, header: dict[str, Any], data_start: int) -> None:
        self.f, self.header, self.data_start = f, header, data_start

    def read(self, key: str, dtype: str, a: int, b: int) -> np.ndarray:
        entry = self.header[key]
        shape = entry["shape"]
        row = int(np.prod(shape[1:], dtype=np.int64)) * sts.ITEMSIZE[entry["dtype"]]
        self.f.seek(self.data_start + entry["data_offsets"][0] + a * row)
        raw = self.f.read((b - a) * row)
        if len(raw) != (b - a) * row:
            raise InvalidRequest(f"entry {echo(key)} is cut short")
        return np.frombuffer(raw, dtype=dtype).reshape([b - a, *shape[1:]])


def read_header(f: BinaryIO) -> tuple[dict[str, Any], int]:
    n = int.from_bytes(f.read(8), "little")
    return json.loads(f.read(n)), 8 + n


def chunks(cols: _Columns, t: TablePlan, shard: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(keys, records in the table's layout) of one file part, CHUNK_ROWS at a time."""
    rec = record_dtype(t.spec)
    n = t.parts[shard]["rows"]
    key = f"{PREFIX}{t.name}/{shard}/"
    storage = rec["row"].base
    for a in range(0, n, CHUNK_ROWS):
        b = min(n, a + CHUNK_ROWS)
        keys = cols.read(key + "ids", "<u8", a, b).astype(np.uint64)
        recs = np.zeros(b - a, dtype=rec)
        recs["row"] = cols.read(key + "rows", storage.str, a, b)
        if t.has_state:
            recs["state"] = cols.read(key + "state", "<f4", a, b)
        else:
            recs["state"] = initial_state(t.spec.optimizer, b - a, t.spec.dim)
        recs["v"] = cols.read(key + "v", "<u8", a, b)
        yield keys, recs


async def restore(store: StoreAPI, path: str, plans: list[TablePlan], mode: str, if_unchanged: bool) -> dict[str, Any]:
    """Restore every table of `plans`; the report's table part."""
    report: dict[str, Any] = {"tables_created": [], "tables_replaced": [], "tables_skipped": [], "table_rows": {}}
    failed: list[dict[str, Any]] = []
    service = store.tables
    timeout = store.cfg.limits.request_timeout
    for t in plans:
        try:
            existing = await anyio.to_thread.run_sync(_version_of, service, t.name)
            file_version = sum(p["version"] for p in t.parts.values())
            if existing is not None:
                if mode == "create":
                    report["tables_skipped"].append({"name": t.name, "reason": "exists", "current_version": existing})
                    continue
                if if_unchanged and existing != file_version:
                    report["tables_skipped"].append({"name": t.name, "reason": "changed", "current_version": existing})
                    continue
                fut = await anyio.to_thread.run_sync(service.delete, t.name)
                await wait(fut, timeout, f"delete of table {t.name}")
            await wait(service.create(t.name, t.config), timeout, f"create of table {t.name}")
            rows = await _load(store, path, t, timeout)
        except StoreError as e:
            failed.append({"name": t.name, "table": True, **e.to_dict()})
            continue
        report["tables_replaced" if existing is not None else "tables_created"].append(t.name)
        report["table_rows"][t.name] = rows
    report["failed"] = failed
    return report


def _version_of(service: Any, name: str) -> int | None:
    try:
        return int(service.info(name)["version"])
    except NotFound:
        return None


async def _load(store: StoreAPI, path: str, t: TablePlan, timeout: float) -> int:
    service = store.tables
    same_layout = set(t.parts) == set(range(service.shards))
    top = (max(p["version"] for p in t.parts.values()), max(p["step"] for p in t.parts.values()))
    versions = {s: ((t.parts[s]["version"], t.parts[s]["step"]) if same_layout else top) for s in range(service.shards)}
    rows = 0
    with open(path, "rb") as f:
        header, start = await anyio.to_thread.run_sync(read_header, f)
        cols = _Columns(f, header, start)
        for shard in sorted(t.parts):
            it = chunks(cols, t, shard)
            while True:
                got = await anyio.to_thread.run_sync(next, it, None)
                if got is None:
                    break
                keys, recs = got
                if len(np.unique(keys)) != len(keys):
                    raise Unprocessable(f"table {t.name!r}: the checkpoint repeats IDs")
                await wait(service.load(t.name, keys, recs, versions), timeout, f"restore of table {t.name}")
                rows += len(keys)
    return rows
