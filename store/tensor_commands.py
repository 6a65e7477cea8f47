"""What tensor commands do to a shard's state: put, grad, grad-rows, delete.

Handlers of `ShardState._HANDLERS` (store/state.py), as the table commands'
are in store/tables/shard.py. Each either raises a StoreError having changed
nothing, or changes the state and returns the command's result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from . import dtypes, sync_rounds
from .commands import Delete, Grad, GradRows, LayoutCreate, Put
from .errors import AlreadyExists, Conflict, NotFound, PreconditionFailed, Unprocessable, echo
from .optimizers import STATE_ARRAYS, STATE_SCALARS, apply_step, normalize_spec
from .partitions import Layout
from .record import Tensor

if TYPE_CHECKING:
    from .state import PayloadResolver, ShardState

Result = dict[str, Any]
STALENESS_POLICIES = ("reject", "scale")


def _existing(state: ShardState, name: str, if_match: int | None) -> Tensor:
    """The tensor a command updates, after its preconditions held."""
    t = state.tensors.get(name)
    if t is None:
        raise NotFound(f"tensor {name!r} does not exist")
    _check_preconditions(t, name, if_match)
    return t


def put(state: ShardState, cmd: Put, resolve: PayloadResolver) -> Result:
    name = cmd.name
    existing = state.tensors.get(name)
    if existing is None and name in state.layouts:
        raise AlreadyExists(f"{name!r} is a partitioned tensor: its parts are written one by one")
    _check_preconditions(existing, name, cmd.if_match, cmd.if_none_match)
    if existing is None and state.tables is not None and state.tables.existed_at(name, state.stamp):
        raise AlreadyExists(f"{name!r} is an embedding table; tensors and tables share one namespace")
    dtype, shape = cmd.dtype, tuple(cmd.shape)
    if existing is not None and (existing.dtype, existing.shape) != (dtype, shape):
        raise Unprocessable(
            f"tensor {name!r} is {existing.dtype}{list(existing.shape)}; a replace must keep "
            f"dtype and shape (got {dtype}{list(shape)}); delete and recreate to change them"
        )
    value = dtypes.array_from_bytes(resolve(cmd.data), dtype, shape)
    allow = cmd.allow_nonfinite
    if allow is None:
        allow = existing.allow_nonfinite if existing else False
    if not allow and not dtypes.all_finite(value):
        raise Unprocessable(
            f"tensor {name!r}: value contains NaN or Inf (create it with allow_nonfinite to store such values)"
        )
    spec = normalize_spec(cmd.optimizer) if cmd.optimizer is not None else None
    max_staleness, policy = _staleness(cmd, existing)
    sync = sync_rounds.normalize_sync(cmd.sync) if cmd.sync is not None else (existing.sync if existing else None)
    if sync is not None:
        sync_rounds.check_tensor(name, dtype)
    restored = _restored_state(cmd, spec or (existing.optimizer if existing else {"type": "assign"}), value, resolve)
    if existing is None:
        optimizer, opt_state, version = spec or {"type": "assign"}, restored or {}, 1
    else:
        keep_state = spec is None or spec == existing.optimizer
        optimizer = spec if spec is not None and not keep_state else existing.optimizer
        opt_state = restored if restored is not None else (existing.opt_state if keep_state else {})
        version = existing.version + 1
    t = Tensor(
        name=name,
        dtype=dtype,
        shape=shape,
        value=value,
        version=version,
        optimizer=optimizer,
        opt_state=opt_state,
        allow_nonfinite=allow,
        max_staleness=max_staleness,
        staleness_policy=policy,
        sync=sync,  # a replace starts a new version: an open round's gradients are dropped
    )
    state.tensors[name] = t
    state.changed.add(name)
    return {"name": name, "version": t.version, "shard": state.shard, "created": existing is None}


def grad(state: ShardState, cmd: Grad, resolve: PayloadResolver) -> Result:
    name = cmd.name
    t = _existing(state, name, cmd.if_match)
    if (cmd.dtype, tuple(cmd.shape)) != (t.dtype, t.shape):
        raise Unprocessable(f"gradient is {cmd.dtype}{list(cmd.shape)} but tensor {name!r} is {t.dtype}{list(t.shape)}")
    grad = dtypes.array_from_bytes(resolve(cmd.data), t.dtype, t.shape)
    if not t.allow_nonfinite and not dtypes.all_finite(grad):
        raise Unprocessable(f"gradient for {name!r} contains NaN or Inf")
    if t.sync is not None:
        return sync_rounds.contribute(state, t, grad, cmd.base_version)
    lr_scale = _lr_scale(t, cmd.base_version)
    step = apply_step(t.optimizer, t.opt_state, t.value, grad, lr_scale)
    # assign stores the gradient, checked above; the others can overflow
    # (measured: 4 ms on 64 MB float32, against 45-65 ms for the step)
    if t.optimizer["type"] != "assign":
        _refuse_nonfinite_step(t, step.value)
    new = replace(t, value=step.value, version=t.version + 1, opt_state=step.state, in_place=False)
    state.tensors[name] = new
    state.changed.add(name)
    return {"name": name, "version": new.version, "shard": state.shard}


def grad_rows(state: ShardState, cmd: GradRows, resolve: PayloadResolver) -> Result:
    """Sparse push: only the given rows of the value and of the optimizer
    state change, in place (a 1,000-row push to a 1M-row table copies 1,000
    rows, not the table). Duplicate indices are summed."""
    name = cmd.name
    t = _existing(state, name, cmd.if_match)
    if not t.shape:
        raise Unprocessable(f"tensor {name!r} is a scalar; grad-rows needs rank >= 1")
    if t.value.dtype.kind != "f":
        raise Unprocessable(f"grad-rows needs a float tensor, {name!r} is {t.dtype}")
    if t.sync is not None:
        raise Unprocessable(f"tensor {name!r} takes synchronous rounds: push dense gradients (POST .../grad)")
    if (cmd.dtype, tuple(cmd.row_shape)) != (t.dtype, t.shape[1:]):
        raise Unprocessable(
            f"rows are {cmd.dtype}{list(cmd.row_shape)} but rows of {name!r} are {t.dtype}{list(t.shape[1:])}"
        )
    k = int(cmd.k)
    idx = dtypes.array_from_bytes(resolve(cmd.indices), "int64", (k,))
    vals = dtypes.array_from_bytes(resolve(cmd.values), t.dtype, (k, *t.shape[1:]))
    if k and (idx.min() < 0 or idx.max() >= t.shape[0]):
        raise Unprocessable(f"row indices must be in [0, {t.shape[0]}) for {name!r}")
    if not t.allow_nonfinite and not dtypes.all_finite(vals):
        raise Unprocessable(f"gradient rows for {name!r} contain NaN or Inf")
    lr_scale = _lr_scale(t, cmd.base_version)
    rows, inverse = np.unique(idx, return_inverse=True)
    summed = np.zeros((len(rows), *t.shape[1:]), dtype=t.value.dtype)
    np.add.at(summed, inverse, vals)
    with state.lock:
        if not t.in_place:  # own writable copies: earlier readers may hold the old buffers
            t = replace(
                t,
                value=np.array(t.value),
                in_place=True,
                opt_state={k2: np.array(v) if isinstance(v, np.ndarray) else v for k2, v in t.opt_state.items()},
            )
            state.tensors[name] = t
        row_state = {k2: (v[rows] if isinstance(v, np.ndarray) else v) for k2, v in t.opt_state.items()}
        step = apply_step(t.optimizer, row_state, t.value[rows], summed, lr_scale)
        _refuse_nonfinite_step(t, step.value)  # before anything is written in place
        t.value[rows] = step.value
        for key, v in step.state.items():
            if isinstance(v, np.ndarray):
                full = t.opt_state.get(key)
                if full is None:
                    fill = t.optimizer.get("initial_accumulator_value", 0.0) if key == "sum" else 0.0
                    full = t.opt_state[key] = np.full_like(t.value, fill)
                full[rows] = v
            else:
                t.opt_state[key] = v
        t.version += 1
    state.changed.add(name)
    return {"name": name, "version": t.version, "shard": state.shard, "rows": len(rows)}


def delete(state: ShardState, cmd: Delete, resolve: PayloadResolver) -> Result:
    layout = state.layouts.pop(cmd.name, None) if cmd.name not in state.tensors else None
    if layout is not None:  # the API deleted the parts first
        state.changed.add(cmd.name)
        return {"name": cmd.name, "version": 1, "shard": state.shard, "deleted": True}
    t = _existing(state, cmd.name, cmd.if_match)
    del state.tensors[cmd.name]
    state.changed.add(cmd.name)
    return {"name": cmd.name, "version": t.version, "shard": state.shard, "deleted": True}


def layout_create(state: ShardState, cmd: LayoutCreate, resolve: PayloadResolver) -> Result:
    """Claim `name` for a partitioned tensor (create only, like If-None-Match: *)."""
    name = cmd.name
    existing = state.tensors.get(name)
    if existing is not None or name in state.layouts:
        raise PreconditionFailed(
            f"tensor {name!r} already exists (If-None-Match: *)",
            current_version=existing.version if existing else None,
        )
    if state.tables is not None and state.tables.existed_at(name, state.stamp):
        raise AlreadyExists(f"{name!r} is an embedding table; tensors and tables share one namespace")
    counts, shape = tuple(int(n) for n in cmd.counts), tuple(int(n) for n in cmd.shape)
    if not shape or len(counts) < 2 or sum(counts) != shape[0] or min(counts) < 1:
        raise Unprocessable(f"layout of {name!r}: row counts {list(counts)} do not cut shape {list(shape)}")
    dtypes.dtype_of(cmd.dtype)  # a known dtype, or Unprocessable
    state.layouts[name] = Layout(name, cmd.dtype, shape, counts)
    state.changed.add(name)
    return {"name": name, "version": 1, "shard": state.shard, "created": True}


def _restored_state(
    cmd: Put, spec: Mapping[str, Any], value: np.ndarray, resolve: PayloadResolver
) -> dict[str, Any] | None:
    """Optimizer state given with a put (checkpoint restore): arrays shaped
    like the value, integer scalars. None if none was given."""
    if cmd.state_arrays is None and cmd.state_scalars is None:
        return None
    kind = spec["type"]
    arrays, scalars = cmd.state_arrays or {}, cmd.state_scalars or {}
    allowed_arrays, allowed_scalars = STATE_ARRAYS[kind], STATE_SCALARS[kind]
    for key in list(arrays) + list(scalars):
        if key not in allowed_arrays + allowed_scalars:
            raise Unprocessable(
                f"optimizer state {echo(key)} does not belong to {kind} "
                f"(it keeps {', '.join(allowed_arrays + allowed_scalars) or 'nothing'})"
            )
    state: dict[str, Any] = {}
    for key, v in scalars.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise Unprocessable(f"optimizer state {echo(key)}: expected an integer >= 0, got {echo(v)}")
        state[key] = v
    for key, ref in arrays.items():
        state[key] = dtypes.array_from_bytes(resolve(ref), dtypes.dtype_name(value.dtype), value.shape)
    return state


def _check_preconditions(
    existing: Tensor | None, name: str, if_match: int | str | None, if_none_match: bool = False
) -> None:
    current = existing.version if existing else None
    if if_none_match and existing is not None:
        raise PreconditionFailed(f"tensor {name!r} already exists (If-None-Match: *)", current_version=current)
    if if_match == "*":
        if existing is None:
            raise PreconditionFailed(f"tensor {name!r} does not exist (If-Match: *)", current_version=None)
    elif if_match is not None and current != if_match:
        what = f"is at version {current}" if existing else "does not exist"
        raise PreconditionFailed(f"tensor {name!r} {what}, If-Match asked for {if_match}", current_version=current)


def _lr_scale(t: Tensor, base: int | None) -> float:
    return staleness_scale(f"tensor {t.name!r}", base, t.version, t.staleness_policy, t.max_staleness)


def staleness_scale(subject: str, base: int | None, current: int, policy: str, max_staleness: int | None) -> float:
    """Bounded staleness, for tensors and tables alike: reject an update computed
    on too old a version (or on one from the future), or scale its learning
    rate by 1 / (1 + staleness)."""
    if base is None:
        return 1.0
    if base > current:
        raise Conflict(f"base_version {base} is newer than {subject} (version {current})", current_version=current)
    staleness = current - base
    if policy == "scale":
        return 1.0 / (1 + staleness)
    if max_staleness is not None and staleness > max_staleness:
        raise Conflict(
            f"update of {subject} was computed on version {base}, {staleness} versions behind "
            f"{current} (max_staleness {max_staleness}); pull and recompute",
            current_version=current,
        )
    return 1.0


def _refuse_nonfinite_step(t: Tensor, value: np.ndarray) -> None:
    if not t.allow_nonfinite and not dtypes.all_finite(value):
        raise Unprocessable(
            f"step refused: the {t.optimizer['type']} update of {t.name!r} gives NaN or Inf "
            "(create the tensor with allow_nonfinite to store such values)"
        )


def _staleness(cmd: Put, existing: Tensor | None) -> tuple[int | None, str]:
    """None in the command keeps the existing tensor's setting."""
    max_staleness = (
        cmd.max_staleness if cmd.max_staleness is not None else (existing.max_staleness if existing else None)
    )
    policy = cmd.staleness_policy or (existing.staleness_policy if existing else "reject")
    if max_staleness is not None and (not isinstance(max_staleness, int) or max_staleness < 0):
        raise Unprocessable(f"max_staleness: expected an integer >= 0, got {echo(max_staleness)}")
    if policy not in STALENESS_POLICIES:
        raise Unprocessable(f"staleness_policy: {echo(policy)} is not one of {', '.join(STALENESS_POLICIES)}")
    return max_staleness, policy
