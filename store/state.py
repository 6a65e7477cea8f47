"""The pure state machine of one shard: tensors, versions, optimizer state.

`ShardState.apply` is deterministic: given the same commands in the same
order, every replica ends with identical bytes. It never touches the network
or Raft; the Raft wiring feeds it committed commands (store/commands.py) in
log order.

Tensor bytes travel beside a command: a blob field holds either the bytes
inline (small tensors) or a reference to a payload that the replica resolves
from its payload store.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np

from . import sync_rounds
from . import tensor_commands as tensor_cmds
from .commands import (
    Batch,
    Command,
    Delete,
    Grad,
    GradRows,
    Group,
    LayoutCreate,
    MemberDrop,
    MemberSet,
    Noop,
    Put,
    Ref,
    RoundClose,
    TableCreate,
    TableDelete,
    TableFence,
    TableLoad,
    TablePush,
)
from .errors import NotFound, StoreError, Unprocessable
from .partitions import Layout
from .record import Tensor
from .tables import shard as table_cmds
from .tables.registry import Tables
from .tables.shard import TABLE_WATCH

__all__ = ["PayloadResolver", "ShardState", "Tensor"]

PayloadResolver = Callable[[Ref], "bytes | memoryview | bytearray"]

Result = dict[str, Any]  # a command's outcome, as the HTTP layer answers it
BATCHABLE = (Put, Grad, Delete)


class ShardState:
    def __init__(self, shard: int, dedupe_window: int = 100_000) -> None:
        self.shard = shard
        self.tensors: dict[str, Tensor] = {}
        # Partitioned tensors whose home is this shard: name -> layout (the parts are in `tensors` of their shards)
        self.layouts: dict[str, Layout] = {}
        self.dedupe: OrderedDict[str, Result] = OrderedDict()
        self.dedupe_window = dedupe_window
        self.changed: set[str] = set()  # names touched by the last apply
        # Address book of the nodes that host (or hosted) this shard, id -> record
        # of addresses; the Raft membership itself lives in pysyncobj.
        self.members: dict[str, dict[str, str]] = {}
        self.lock = threading.RLock()  # guards in-place (sparse row) updates only
        # Embedding tables of this shard (store/tables): on disk, not in snapshots; None without a data dir.
        self.tables: Tables | None = None
        self.log_index = 0  # index of the entry being applied (the Applier sets it)
        self.stamp = 0  # log_index << 16 | position in its entry: orders table changes, even at replays
        # Synchronous rounds (store/sync_rounds.py), for /metrics: counted as applied, not snapshotted.
        self.round_stats = {"closed": 0, "timed_out": 0, "late_refused": 0}
        # Tensors with an open round, for the leader's round timer (store/round_timer.py); may
        # name some whose round a replace, a delete or a failed batch ended: the timer checks.
        self.open_rounds: set[str] = set()

    # ---- applying commands -------------------------------------------------
    def apply(self, cmd: Command, resolve: PayloadResolver) -> dict[str, Any]:
        """Apply one committed command; return its result or raise a StoreError.

        A failed command changes nothing. A command carrying a request id
        (`rid`) that was already applied returns the recorded outcome again
        instead of applying twice, so clients may retry timed-out writes.
        """
        self.changed = set()
        self.stamp = self.stamp + 1 if self.stamp >> 16 == self.log_index else (self.log_index << 16) + 1
        handler = self._HANDLERS.get(type(cmd))
        if handler is None:
            raise Unprocessable(f"unknown command {type(cmd).__name__}")
        return self._recorded(getattr(cmd, "rid", None), lambda: handler(self, cmd, resolve))

    def _recorded(self, rid: str | None, run: Callable[[], Result]) -> Result:
        if rid is not None and rid in self.dedupe:
            outcome = self.dedupe[rid]
            if "error" in outcome:
                raise StoreError.from_dict(outcome)
            return dict(outcome, duplicate=True)
        try:
            result = run()
        except StoreError as e:
            self._remember(rid, e.to_dict())
            raise
        self._remember(rid, result)
        return result

    def _remember(self, rid: str | None, outcome: Result) -> None:
        if rid is None:
            return
        self.dedupe[rid] = outcome
        while len(self.dedupe) > self.dedupe_window:
            self.dedupe.popitem(last=False)

    def _noop(self, cmd: Noop, resolve: PayloadResolver) -> Result:
        return {}

    def _group(self, cmd: Group, resolve: PayloadResolver) -> Result:
        """Independent commands that shared one Raft entry (group commit): each
        applies, or fails, on its own, exactly as if it had its own entry."""
        outcomes, changed = [], set()
        for part in cmd.cmds:
            try:
                outcomes.append({"ok": self.apply(part, resolve)})
            except StoreError as e:
                outcomes.append(e.to_dict())
            changed |= self.changed
        self.changed = changed
        return {"outcomes": outcomes}

    def _batch(self, cmd: Batch, resolve: PayloadResolver) -> Result:
        """All ops or none: each op is computed against a scratch copy of the
        touched tensors, then all are committed together."""
        staged: dict[str, Tensor | None] = {}
        results = []
        saved = self.tensors
        self.tensors = _Overlay(saved, staged)
        try:
            for op in cmd.ops:
                if not isinstance(op, BATCHABLE):
                    raise Unprocessable(f"{op.tag} cannot be part of a batch")
                results.append(self._HANDLERS[type(op)](self, op, resolve))
        finally:
            self.tensors = saved
        for name, t in staged.items():
            if t is None:
                self.tensors.pop(name, None)
            else:
                self.tensors[name] = t
        self.changed = set(staged)
        return {"results": results}

    def _member_set(self, cmd: MemberSet, resolve: PayloadResolver) -> Result:
        record = {"id": cmd.id, "http": cmd.http, "raft": cmd.raft, "data": cmd.data}
        if not all(isinstance(v, str) and v for v in record.values()):
            raise Unprocessable("member record needs string fields id, http, raft, data")
        self.members[cmd.id] = record
        return {"member": cmd.id}

    def _member_drop(self, cmd: MemberDrop, resolve: PayloadResolver) -> Result:
        return {"member": cmd.id, "dropped": self.members.pop(cmd.id, None) is not None}

    _HANDLERS: ClassVar[dict[type[Command], Callable[..., Result]]] = {
        Noop: _noop,
        Group: _group,
        Batch: _batch,
        Put: tensor_cmds.put,
        Grad: tensor_cmds.grad,
        GradRows: tensor_cmds.grad_rows,
        Delete: tensor_cmds.delete,
        LayoutCreate: tensor_cmds.layout_create,
        MemberSet: _member_set,
        MemberDrop: _member_drop,
        TableCreate: table_cmds.create,
        TablePush: table_cmds.push,
        TableDelete: table_cmds.delete,
        TableFence: table_cmds.fence,
        RoundClose: sync_rounds.close,
        TableLoad: table_cmds.load,
    }

    # ---- reading -----------------------------------------------------------
    def get(self, name: str) -> Tensor:
        t = self.tensors.get(name)
        if t is None:
            raise NotFound(f"tensor {name!r} does not exist")
        return t

    def read(self, name: str) -> Tensor:
        """A record whose value nobody will write to while the caller reads it
        (a copy for tensors updated in place by sparse pushes)."""
        t = self.get(name)
        if not t.in_place:
            return t
        with self.lock:
            return replace(t, value=t.value.copy(), opt_state={}, in_place=False)

    def read_rows(self, name: str, rows: np.ndarray) -> tuple[np.ndarray, Tensor]:
        t = self.get(name)
        if not t.shape:
            raise Unprocessable(f"tensor {name!r} is a scalar; it has no rows")
        if rows.size and (rows.min() < 0 or rows.max() >= t.shape[0]):
            raise Unprocessable(f"rows must be in [0, {t.shape[0]}) for {name!r}")
        with self.lock:
            return t.value[rows], replace(t, value=t.value[:0])

    def capture(self) -> dict[str, Tensor]:
        """A consistent copy of the tensor map for a snapshot (applier thread):
        shared buffers, except for records updated in place."""
        with self.lock:
            return {
                n: (
                    replace(
                        t,
                        value=t.value.copy(),
                        opt_state={k: v.copy() if isinstance(v, np.ndarray) else v for k, v in t.opt_state.items()},
                    )
                    if t.in_place
                    else t
                )
                for n, t in self.tensors.items()
            }

    def version_of(self, name: str) -> int:
        """A tensor's version, or with TABLE_WATCH + name this shard part's of a table."""
        if name.startswith(TABLE_WATCH):
            table = name[len(TABLE_WATCH) :]
            return self.tables.get(table).version if self.tables is not None and table in self.tables else 0
        t = self.tensors.get(name)
        return 0 if t is None else t.version

    @property
    def nbytes(self) -> int:
        return sum(
            t.nbytes + _state_nbytes(t.opt_state) + (t.round.sum.nbytes if t.round is not None else 0)
            for t in list(self.tensors.values())
        )


def _state_nbytes(state: Mapping[str, Any]) -> int:
    return sum(v.nbytes for v in state.values() if isinstance(v, np.ndarray))


class _Overlay(dict[str, Tensor]):
    """A dict view for batches: reads fall through to `base`, writes go to `staged`."""

    def __init__(self, base: dict[str, Tensor], staged: dict[str, Tensor | None]) -> None:
        super().__init__()
        self._base, self._staged = base, staged

    def get(self, key: str, default: Any = None) -> Any:
        if key in self._staged:
            v = self._staged[key]
            return default if v is None else v
        return self._base.get(key, default)

    def __getitem__(self, key: str) -> Tensor:
        v: Tensor | None = self.get(key)
        if v is None:
            raise KeyError(key)
        return v

    def __setitem__(self, key: str, value: Tensor) -> None:
        self._staged[key] = value

    def __delitem__(self, key: str) -> None:
        self[key]  # KeyError if absent
        self._staged[key] = None

    def pop(self, key: str, *default: Any) -> Any:
        v = self.get(key)
        if v is None:
            if default:
                return default[0]
            raise KeyError(key)
        self._staged[key] = None
        return v
