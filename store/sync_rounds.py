"""Synchronous data-parallel rounds (TF's SyncReplicasOptimizer, ps-lite's BSP).

A tensor created with `sync = {"workers": N, "backup_workers": B,
"round_timeout": S, "reduce": "mean"}` does not apply each gradient: the
gradients pushed for its current version V (base version V) are summed in the
replicated state (`Tensor.round`, carried in snapshots), and once N - B have
arrived the optimizer applies once to their mean (or sum) and the version
becomes V + 1. A gradient for any other version is refused (409, with the
open round in the body); one for an older version is counted as late.

The sum is taken in log order (arrival order as Raft ordered it), which is
the same on every replica: replicas agree bit for bit. Against a single
process the result is bit-exact when that process sums the same gradients in
the same order; otherwise float addition's order makes it differ by rounding.

`round_timeout` never reads a clock here: the shard's leader proposes a
`RoundClose` when its timer fires (store/round_timer.py) and the round closes
with what arrived at that point of the log.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from . import dtypes
from .commands import RoundClose
from .errors import Conflict, StoreError, Unprocessable, echo
from .optimizers import apply_step
from .record import Round, Tensor

if TYPE_CHECKING:
    from .state import PayloadResolver, ShardState

Result = dict[str, Any]
REDUCE = ("mean", "sum")
FIELDS = ("workers", "backup_workers", "round_timeout", "reduce")
MAX_WORKERS = 1_000_000


def normalize_sync(spec: Any) -> dict[str, Any]:
    """Validate a sync spec from a client and fill in defaults; Unprocessable (422) otherwise."""
    if not isinstance(spec, dict):
        raise Unprocessable('sync: expected a JSON object such as {"workers": 4}')
    unknown = sorted(set(spec) - set(FIELDS))
    if unknown:
        raise Unprocessable(f"sync: unknown field(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    workers, backups = spec.get("workers"), spec.get("backup_workers", 0)
    if not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= MAX_WORKERS:
        raise Unprocessable(f"sync.workers: expected an integer in [1, {MAX_WORKERS}], got {echo(workers)}")
    if not isinstance(backups, int) or isinstance(backups, bool) or not 0 <= backups < workers:
        raise Unprocessable(
            f"sync.backup_workers: expected an integer in [0, workers - 1 = {workers - 1}], got {echo(backups)}"
        )
    timeout = spec.get("round_timeout")
    # no float() of the value: a JSON integer of 400 digits would overflow (NaN and Inf fail the range)
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 86400
    ):
        raise Unprocessable(f"sync.round_timeout: expected seconds in (0, 86400] or null, got {echo(timeout)}")
    reduce = spec.get("reduce", "mean")
    if reduce not in REDUCE:
        raise Unprocessable(f"sync.reduce: {echo(reduce)} is not one of {', '.join(REDUCE)}")
    return {
        "workers": workers,
        "backup_workers": backups,
        "round_timeout": None if timeout is None else float(timeout),
        "reduce": reduce,
    }


def check_tensor(name: str, dtype: str) -> None:
    if dtypes.dtype_of(dtype).kind != "f":
        raise Unprocessable(f"tensor {name!r} is {dtype}: synchronous rounds average gradients and need a float tensor")


def needed(sync: dict[str, Any]) -> int:
    return int(sync["workers"]) - int(sync["backup_workers"])


def describe(t: Tensor) -> dict[str, Any]:
    """The open round as clients see it (push answers, 409 bodies)."""
    assert t.sync is not None
    return {"version": t.version, "received": t.round.count if t.round else 0, "needed": needed(t.sync)}


def contribute(state: ShardState, t: Tensor, grad: np.ndarray, base_version: int | None) -> Result:
    """Add `grad` (validated: the tensor's dtype and shape, finite) to the open
    round of `t`; close the round when enough have arrived."""
    assert t.sync is not None
    if base_version != t.version:
        if base_version is not None and base_version < t.version:
            state.round_stats["late_refused"] += 1
        got = "no X-Base-Version" if base_version is None else f"a gradient for version {base_version}"
        raise Conflict(
            f"tensor {t.name!r} takes synchronous rounds: the open round is for version {t.version}, "
            f"got {got}; pull version {t.version} and recompute",
            current_version=t.version,
            round=describe(t),
        )
    if t.round is None:
        total = np.array(grad, order="C")  # own the bytes: the payload buffer is not ours to keep
        opened = state.stamp
    else:
        total = t.round.sum + grad  # log order: the same sum on every replica
        opened = t.round.opened
    total.flags.writeable = False
    open_round = Round(total, (t.round.count if t.round else 0) + 1, opened)
    if open_round.count >= needed(t.sync):
        return _close(state, t, open_round, "workers")
    state.tensors[t.name] = replace(t, round=open_round)
    state.open_rounds.add(t.name)
    state.changed.add(t.name)
    received = {"version": t.version, "received": open_round.count, "needed": needed(t.sync), "closed": False}
    return {"name": t.name, "version": t.version, "shard": state.shard, "round": received}


def _close(state: ShardState, t: Tensor, done: Round, by: str) -> Result:
    """Apply the optimizer once to the round's mean (or sum); version + 1."""
    assert t.sync is not None
    s = done.sum
    reduced = s / np.asarray(done.count, dtype=s.dtype) if t.sync["reduce"] == "mean" else s
    step = apply_step(t.optimizer, t.opt_state, t.value, reduced)
    if not t.allow_nonfinite and not dtypes.all_finite(step.value):
        raise Unprocessable(
            f"step refused: the {t.optimizer['type']} update of {t.name!r} with round {t.version}'s "
            f"{t.sync['reduce']} gives NaN or Inf"
        )
    new = replace(t, value=step.value, version=t.version + 1, opt_state=step.state, round=None, in_place=False)
    state.tensors[t.name] = new
    state.open_rounds.discard(t.name)
    state.changed.add(t.name)
    state.round_stats["closed"] += 1
    if by == "timeout":
        state.round_stats["timed_out"] += 1
    closed = {"version": t.version, "received": done.count, "needed": needed(t.sync), "closed": True, "by": by}
    return {"name": t.name, "version": new.version, "shard": state.shard, "round": closed}


def close(state: ShardState, cmd: RoundClose, resolve: PayloadResolver) -> Result:
    """The leader's timer fired: close each named round that is still open at
    that version with what arrived. Each round closes (or fails) on its own."""
    closed: list[Result] = []
    for name, version in cmd.rounds:
        t = state.tensors.get(name)
        if t is None or t.sync is None or t.round is None or t.version != version:
            continue  # closed by its workers, replaced or deleted meanwhile: nothing to do
        try:
            closed.append(_close(state, t, t.round, "timeout"))
        except StoreError as e:
            closed.append({"name": name, **e.to_dict()})
    return {"closed": closed}
