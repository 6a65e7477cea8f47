"""Checkpoints of partitioned tensors (api/checkpoint.py calls these): a
partitioned tensor is saved whole, with its number of parts and the parts'
versions, and restored in the recorded number of parts or in another one
(repartitioning is a checkpoint and a reload)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from store.commands import LayoutCreate, Put
from store.errors import InvalidRequest, PreconditionFailed, StoreError, Unprocessable, echo
from store.interface import StoreAPI
from store.partitions import Layout, assemble, auto_partitions, check_partitions, parse_part, row_counts, split
from store.placement import shard_for
from store.record import Tensor

from .bridge import wait
from .partitioned import fan_out, local_versions, whole_tensor_exists


@dataclass
class Captured:
    """Shards' captured tensors with each partitioned tensor assembled under
    its home shard; `layouts`: what the checkpoint records of each (K, the
    parts' versions and row counts); `incomplete`: partitioned tensors left
    out (a part or the layout not hosted here)."""

    shards: dict[int, dict[str, Tensor]]
    layouts: dict[str, dict[str, Any]] = field(default_factory=dict)
    incomplete: list[str] = field(default_factory=list)


def merge_parts(store: StoreAPI, captured: dict[int, dict[str, Tensor]]) -> Captured:
    """Off the event loop: concatenates values and optimizer state arrays."""
    out = Captured({s: {} for s in captured})
    parts: dict[str, dict[int, Tensor]] = {}
    for shard, tensors in captured.items():
        for name, t in tensors.items():
            p = parse_part(name)
            if p is None:
                out.shards[shard][name] = t
            else:
                parts.setdefault(p[0], {})[p[1]] = t
    for base, got in sorted(parts.items()):
        try:
            lay = store.layout(base)
        except StoreError:
            lay = None
        if lay is None or set(got) != set(range(lay.k)):
            out.incomplete.append(base)
            continue
        records = [got[i] for i in range(lay.k)]
        first = records[0]
        state = {
            key: assemble([r.opt_state[key] for r in records]) if isinstance(v, np.ndarray) else v
            for key, v in first.opt_state.items()
            if all(key in r.opt_state for r in records)
        }
        whole = dataclasses.replace(
            first,
            name=base,
            shape=lay.shape,
            value=assemble([r.value for r in records]),
            version=min(r.version for r in records),
            opt_state=state,
            in_place=False,
        )
        out.shards.setdefault(shard_for(base, store.cfg.shards), {})[base] = whole
        out.layouts[base] = {
            "partitions": lay.k,
            "versions": [r.version for r in records],
            "counts": list(lay.counts),
        }
    return out


_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,255}"
PARTITIONS_QUERY = rf"^{_NAME}:[0-9]{{1,7}}(,{_NAME}:[0-9]{{1,7}})*$"  # ?partitions= of a restore


def parse_partitions_query(text: str | None) -> dict[str, int]:
    """?partitions=name:K,name:K of a checkpoint restore (the route checked
    PARTITIONS_QUERY; a name may hold ':', K never does)."""
    if text is None:
        return {}
    out = {}
    for item in text.split(","):
        name, _, k = item.rpartition(":")
        if not name or not k.isdigit():
            raise InvalidRequest(f"partitions: expected name:K,name:K,..., got {echo(item)}")
        out[name] = int(k)
    return out


def restore_partitions(store: StoreAPI, t: Tensor, asked: Any) -> int:
    """K for restoring record `t`: the one asked (or recorded in the file),
    else what automatic partitioning picks."""
    limits = store.cfg.limits
    if asked is None:
        return auto_partitions(t.shape, t.nbytes, limits.partition_bytes, limits.partition_auto_bytes, store.cfg.shards)
    if not isinstance(asked, int) or isinstance(asked, bool):
        raise Unprocessable(f"partitions of {echo(t.name)}: expected an integer, got {echo(asked)}")
    check_partitions(asked, t.shape, limits.max_partitions)
    return asked


async def restore(
    store: StoreAPI,
    t: Tensor,
    k: int,
    mode: str,
    part_versions: Any,
    make_put: Callable[[Tensor, str, bool], Put],
) -> dict[str, Any]:
    """Restore whole record `t` in K parts (value, optimizer state cut by
    rows). An existing partitioned tensor is replaced only with the same
    row counts: repartitioning is delete, then restore."""
    name = t.name
    lay = store.layout(name)
    counts = row_counts(t.shape[0], k) if k > 1 else None
    if lay is None:
        if mode == "replace" and whole_tensor_exists(store, name):
            raise Unprocessable(f"tensor {name!r} is whole here; delete it first to restore it in {k} parts")
        assert counts is not None  # restore() is called for k > 1 or an existing layout
        create = LayoutCreate(name=name, dtype=t.dtype, shape=t.shape, counts=counts)
        await wait(store.write(create), store.cfg.limits.request_timeout, f"restore of {name}")
        lay, created = Layout(name, t.dtype, tuple(t.shape), counts), True
    else:
        if mode == "create":
            current = local_versions(store, lay)
            raise PreconditionFailed(f"tensor {name!r} already exists", current_version=min(current))
        if lay.counts != counts:
            raise Unprocessable(
                f"tensor {name!r} is partitioned in {lay.k} parts here, the restore asks for {k}: "
                "delete it first to repartition"
            )
        created = False
    versions = part_versions if isinstance(part_versions, list) and len(part_versions) == lay.k else None
    values = split(t.value, lay.counts)
    states = {key: split(v, lay.counts) for key, v in t.opt_state.items() if isinstance(v, np.ndarray)}
    cmds = []
    for i, p in enumerate(lay.parts()):
        part = dataclasses.replace(
            t,
            name=p,
            shape=lay.part_shape(i),
            value=values[i],
            version=versions[i] if versions is not None else t.version,
            opt_state={key: states[key][i] if key in states else v for key, v in t.opt_state.items()},
        )
        cmds.append(make_put(part, "create" if created else "replace", versions is not None and not created))
    results = await fan_out(store, lay, cmds, "restore")
    return {"created": created, "version": min(r["version"] for r in results)}
