"""The record of one tensor, and its one serialization: JSON metadata plus
named arrays. Snapshots (store/snapshot.py), checkpoints (api/checkpoint.py)
and the tensor listing all describe a tensor with `metadata`, and read one back
with `from_metadata`; only where the arrays' bytes go differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import dtypes

VALUE = "value"  # the key of a tensor's value among its arrays; the others are optimizer state
ROUND_SUM = "round_sum"  # the open synchronous round's partial sum (snapshots only, never checkpoints)
# What the tensor listing shows, in this order (GET /v1/tensors)
LISTED = (
    "name",
    "dtype",
    "shape",
    "version",
    "shard",
    "optimizer",
    "nbytes",
    "allow_nonfinite",
    "max_staleness",
    "staleness_policy",
)


@dataclass(frozen=True, slots=True)
class Round:
    """The open synchronous round of a tensor (store/sync_rounds.py): the
    gradients pushed for the tensor's current version, summed in log order."""

    sum: np.ndarray  # read-only, the tensor's dtype and shape
    count: int
    opened: int  # ShardState.stamp of the command that brought the first gradient


@dataclass(kw_only=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    value: np.ndarray  # read-only; replaced, never written in place
    version: int
    optimizer: dict[str, Any]
    opt_state: dict[str, Any] = field(default_factory=dict)  # arrays shaped like value, and scalars
    allow_nonfinite: bool = False
    max_staleness: int | None = None
    staleness_policy: str = "reject"
    sync: dict[str, Any] | None = None  # synchronous rounds (store/sync_rounds.py normalize_sync)
    round: Round | None = None  # the open round, if a gradient for this version arrived
    # Set once sparse row pushes update this record's arrays in place: readers
    # and snapshots then copy under the shard lock instead of sharing buffers.
    in_place: bool = False

    @property
    def nbytes(self) -> int:
        return int(self.value.nbytes)

    def describe(self, shard: int) -> dict[str, Any]:
        """The tensor listing's entry."""
        meta = metadata(self, state=False)
        meta.update(shard=shard, nbytes=self.nbytes)
        listed = {k: meta[k] for k in LISTED}
        if self.sync is not None:
            listed["sync"] = self.sync
        return listed


def metadata(t: Tensor, state: bool = True, round_state: bool = False) -> dict[str, Any]:
    """JSON-able metadata of `t`; with `state`, its optimizer state's scalars
    and the keys of its state arrays (see `arrays`); with `round_state`, the
    open round's count and stamp (its sum is among `arrays`)."""
    scalars = (
        {
            k: v.item() if isinstance(v, np.generic) else v
            for k, v in sorted(t.opt_state.items())
            if not isinstance(v, np.ndarray)
        }
        if state
        else {}
    )
    return {
        "name": t.name,
        "dtype": t.dtype,
        "shape": list(t.shape),
        "version": t.version,
        "optimizer": t.optimizer,
        "allow_nonfinite": t.allow_nonfinite,
        "max_staleness": t.max_staleness,
        "staleness_policy": t.staleness_policy,
        "state_arrays": sorted(k for k, v in t.opt_state.items() if isinstance(v, np.ndarray)) if state else [],
        "state_scalars": scalars,
        **({"sync": t.sync} if t.sync is not None else {}),
        **({"round": {"count": t.round.count, "opened": t.round.opened}} if round_state and t.round else {}),
    }


def arrays(t: Tensor, state: bool = True, round_state: bool = False) -> dict[str, np.ndarray]:
    """The value (key VALUE) and, with `state`, every optimizer state array,
    with `round_state` the open round's sum (key ROUND_SUM), C-contiguous
    (0-d arrays stay 0-d)."""
    out = {VALUE: _c_order(t.value)}
    if state:
        out.update((k, _c_order(v)) for k, v in sorted(t.opt_state.items()) if isinstance(v, np.ndarray))
    if round_state and t.round is not None:
        out[ROUND_SUM] = _c_order(t.round.sum)
    return out


def from_metadata(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Tensor:
    """A record from `metadata` output and its arrays (VALUE and state arrays).
    Fields a plain file may lack (a torch state_dict) take their defaults;
    dtype and shape come from the value."""
    value = arrays[VALUE]
    open_round = _round(meta.get("round"), arrays.get(ROUND_SUM))
    state: dict[str, Any] = dict(meta.get("state_scalars") or {})
    # a ROUND_SUM without its round stays among the state arrays, where a restore refuses it
    state.update((k, a) for k, a in arrays.items() if k != VALUE and (k != ROUND_SUM or open_round is None))
    return Tensor(
        name=meta["name"],
        dtype=dtypes.dtype_name(value.dtype),
        shape=tuple(value.shape),
        value=value,
        version=int(meta.get("version") or 0),
        optimizer=meta.get("optimizer") or {"type": "assign"},
        opt_state=state,
        allow_nonfinite=bool(meta.get("allow_nonfinite", False)),
        max_staleness=meta.get("max_staleness"),
        staleness_policy=meta.get("staleness_policy") or "reject",
        sync=meta.get("sync"),
        round=open_round,
    )


def _round(described: Any, total: np.ndarray | None) -> Round | None:
    if total is None or not isinstance(described, dict):
        return None
    count, opened = described.get("count"), described.get("opened")
    if not (isinstance(count, int) and isinstance(opened, int)):
        return None
    return Round(total, count, opened)


def _c_order(arr: np.ndarray) -> np.ndarray:
    """np.ascontiguousarray would make a 0-d array 1-d."""
    return arr if arr.flags.c_contiguous else arr.copy(order="C")
