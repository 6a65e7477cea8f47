"""The table commands of a shard's state machine (store/state.py dispatches
TableCreate, TablePush, TableLoad, TableFence and TableDelete here). Each runs on the applier thread
with the state's `stamp`, the command's position in the log."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..commands import TableCreate, TableDelete, TableFence, TableLoad, TablePush
from ..errors import AlreadyExists, NotFound, Unavailable, Unprocessable
from .registry import Tables
from .spec import parse_spec

TABLE_WATCH = "table/"  # + name: version waits on a table part ("/" never occurs in a tensor name)

if TYPE_CHECKING:
    from ..state import PayloadResolver, ShardState

Result = dict[str, Any]
ID_DTYPES = {"int64": np.dtype("<i8"), "uint64": np.dtype("<u8")}


def _tables(state: ShardState) -> Tables:
    if state.tables is None:
        raise Unprocessable("this replica keeps no embedding tables (no data directory)")
    return state.tables


def _refuse_if_fenced(tables: Tables, name: str, stamp: int) -> None:
    if tables.fenced_at(name, stamp):
        raise Unavailable(
            f"table {name!r} is being deleted (a conditional DELETE holds it); retry, or DELETE it again "
            "if the one that started stopped half-way"
        )


def create(state: ShardState, cmd: TableCreate, resolve: PayloadResolver) -> Result:
    tables = _tables(state)
    spec = parse_spec(cmd.config)
    if cmd.name in state.tensors:
        raise AlreadyExists(f"{cmd.name!r} is a tensor; tensors and tables share one namespace")
    out = tables.create(cmd.name, spec, state.stamp)
    return {"name": cmd.name, "shard": state.shard, "version": 0, "created": not out.replayed}


def push(state: ShardState, cmd: TablePush, resolve: PayloadResolver) -> Result:
    tables = _tables(state)
    if cmd.name not in tables:
        if tables.existed_at(cmd.name, state.stamp):  # replayed after the table was deleted
            return {"name": cmd.name, "shard": state.shard, "replayed": True}
        raise NotFound(f"table {cmd.name!r} does not exist")
    _refuse_if_fenced(tables, cmd.name, state.stamp)
    table = tables.get(cmd.name)
    id_dtype = ID_DTYPES.get(cmd.id_dtype)
    if id_dtype is None:
        raise Unprocessable(f"ids: dtype {cmd.id_dtype!r} is not int64 or uint64")
    raw_ids, raw_grads = resolve(cmd.ids), resolve(cmd.grads)
    dim = table.spec.dim
    if len(raw_ids) != cmd.n * 8 or len(raw_grads) != cmd.n * dim * 4:
        raise Unprocessable(
            f"push to {cmd.name!r}: {cmd.n} IDs of dim {dim} need {cmd.n * 8} and "
            f"{cmd.n * dim * 4} bytes, got {len(raw_ids)} and {len(raw_grads)}"
        )
    ids = np.frombuffer(raw_ids, dtype=id_dtype)
    grads = np.frombuffer(raw_grads, dtype="<f4").reshape(cmd.n, dim)
    r = table.push(ids, grads, stamp=state.stamp, base_version=cmd.base_version)
    state.changed.add(TABLE_WATCH + cmd.name)  # wakes delta long-polls
    return {"name": cmd.name, "shard": state.shard, **r.to_dict()}


def load(state: ShardState, cmd: TableLoad, resolve: PayloadResolver) -> Result:
    """Restore rows from a checkpoint (PUT /v1/checkpoint), records as they were saved."""
    tables = _tables(state)
    if cmd.name not in tables:
        if tables.existed_at(cmd.name, state.stamp):
            return {"name": cmd.name, "shard": state.shard, "replayed": True}
        raise NotFound(f"table {cmd.name!r} does not exist")
    _refuse_if_fenced(tables, cmd.name, state.stamp)
    table = tables.get(cmd.name)
    raw_ids, raw_recs = resolve(cmd.ids), resolve(cmd.records)
    size = table.rec.itemsize
    if cmd.n < 1 or len(raw_ids) != cmd.n * 8 or len(raw_recs) != cmd.n * size:
        raise Unprocessable(
            f"load into {cmd.name!r}: {cmd.n} rows need {cmd.n * 8} bytes of IDs and {cmd.n * size} of "
            f"records, got {len(raw_ids)} and {len(raw_recs)}"
        )
    keys = np.frombuffer(raw_ids, dtype="<u8").astype(np.uint64)
    recs = np.frombuffer(raw_recs, dtype=table.rec)
    r = table.load(keys, recs, stamp=state.stamp, version=cmd.version, step=cmd.step)
    state.changed.add(TABLE_WATCH + cmd.name)
    return {"name": cmd.name, "shard": state.shard, **r.to_dict()}


def delete(state: ShardState, cmd: TableDelete, resolve: PayloadResolver) -> Result:
    out = _tables(state).delete(cmd.name, state.stamp, if_match=cmd.if_match)
    return {"name": cmd.name, "shard": state.shard, "deleted": not out.replayed}


def fence(state: ShardState, cmd: TableFence, resolve: PayloadResolver) -> Result:
    tables = _tables(state)
    out = tables.release(cmd.name, state.stamp) if cmd.release else tables.fence(cmd.name, state.stamp, cmd.version)
    return {"name": cmd.name, "shard": state.shard, "fenced": not cmd.release, "replayed": out.replayed}
