"""The tables of one shard: which exist, where their rows live, and since when.

Tables are not in the shard's Raft snapshot: each table's rows stay in their
own RocksDB directory, updated in place, and every change records the log
stamp (index) that made it. After a restart, pysyncobj replays the log from
its last snapshot; table commands whose stamp this replica already applied
change nothing (`TableState.push` and the stamps kept here). So a restart
reads no table, and a snapshot never copies one.

The registry keeps, per name, every [created, deleted) stamp interval it had,
so "did table X exist at stamp S" has the same answer during a replay as it
had the first time (the tensor/table name clash check depends on it).

Layout under `root`: `registry.json` (replaced atomically) and one directory
per table incarnation, `<name>@<created stamp>`.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from ..errors import AlreadyExists, NotFound, PreconditionFailed
from .engine import DEFAULT_BUDGET, MemoryBudget
from .spec import TableSpec, check_name
from .table import TableState

REGISTRY = "registry.json"


@dataclass(frozen=True)
class Outcome:
    """What a create or delete did; `replayed` if its stamp was applied before."""

    name: str
    stamp: int
    replayed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "stamp": self.stamp, "replayed": self.replayed}


class Tables:
    def __init__(self, root: Path, budget: MemoryBudget = DEFAULT_BUDGET, sync: bool = False) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.budget, self.sync = budget, sync
        self._lock = threading.Lock()  # guards the maps below against readers on other threads
        raw = self._read()
        self.stamp: int = raw.get("stamp", 0)
        self.live: dict[str, dict[str, Any]] = raw.get("live", {})
        self.history: dict[str, list[list[int]]] = raw.get("history", {})
        self._open: dict[str, TableState] = {}
        self._remove_strays()

    # ---- reads -------------------------------------------------------------------
    def get(self, name: str) -> TableState:
        with self._lock:
            entry = self.live.get(name)
            if entry is None:
                raise NotFound(f"table {name!r} does not exist")
            table = self._open.get(name)
            if table is None:
                table = self._open[name] = TableState.open(self.root / entry["dir"], self.budget, self.sync)
            return table

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self.live)

    def __contains__(self, name: str) -> bool:
        return name in self.live

    def __iter__(self) -> Iterator[TableState]:
        for name in self.names():
            try:
                yield self.get(name)
            except NotFound:  # deleted meanwhile
                continue

    def existed_at(self, name: str, stamp: int) -> bool:
        """Whether `name` was a table when the command at `stamp` applied."""
        return _covers(self.history.get(name, []), stamp)

    def fenced_at(self, name: str, stamp: int) -> bool:
        """Whether a conditional delete held `name` fenced when the command at
        `stamp` applied (the same answer during a replay)."""
        entry = self.live.get(name)
        return entry is not None and _covers(entry.get("fences", []), stamp)

    # ---- changes (the applier thread) ------------------------------------------------
    def create(self, name: str, spec: TableSpec, stamp: int) -> Outcome:
        check_name(name)
        if stamp <= self.stamp:
            if any(created == stamp for created, _ in self.history.get(name, [])):
                return Outcome(name, stamp, replayed=True)
            if self.existed_at(name, stamp):
                raise AlreadyExists(f"table {name!r} already exists")
        elif name in self.live:
            raise AlreadyExists(f"table {name!r} already exists")
        dirname = f"{name}@{stamp}"
        if (self.root / dirname).exists():  # a create that crashed before its registry write
            shutil.rmtree(self.root / dirname)
        table = TableState.create(self.root / dirname, name, spec, self.budget, self.sync, stamp=stamp)
        with self._lock:
            self.live[name] = {"dir": dirname, "created": stamp}
            self.history.setdefault(name, []).append([stamp, 0])
            self.stamp = max(self.stamp, stamp)
            self._open[name] = table
        self._write()
        return Outcome(name, stamp)

    def delete(self, name: str, stamp: int, if_match: int | None = None) -> Outcome:
        if stamp <= self.stamp and any(deleted == stamp for _, deleted in self.history.get(name, [])):
            return Outcome(name, stamp, replayed=True)
        entry = self.live.get(name)
        if entry is None:
            raise NotFound(f"table {name!r} does not exist")
        if if_match is not None:
            current = self.get(name).version
            if current != if_match:
                raise PreconditionFailed(
                    f"table {name!r} is at version {current}, If-Match asked for {if_match}", current_version=current
                )
        with self._lock:
            del self.live[name]
            self.history[name][-1][1] = stamp
            self.stamp = max(self.stamp, stamp)
            table = self._open.pop(name, None)
        self._write()  # the registry first: a crash before the rmtree leaves a stray, removed at start
        if table is not None:
            table.close()
        shutil.rmtree(self.root / entry["dir"], ignore_errors=True)
        return Outcome(name, stamp)

    def fence(self, name: str, stamp: int, version: int) -> Outcome:
        """Fence the table if its version here is `version` (PreconditionFailed
        otherwise): pushes and loads are refused until `release` or the delete."""
        if stamp <= self.stamp:
            return Outcome(name, stamp, replayed=True)
        entry = self.live.get(name)
        if entry is None:
            raise NotFound(f"table {name!r} does not exist")
        current = self.get(name).version
        if current != version:
            raise PreconditionFailed(
                f"table {name!r} changed on shard part at version {current} (If-Match expected {version})",
                current_version=current,
            )
        with self._lock:
            fences = entry.setdefault("fences", [])
            if not fences or fences[-1][1] != 0:
                fences.append([stamp, 0])
            self.stamp = stamp
        self._write()
        return Outcome(name, stamp)

    def release(self, name: str, stamp: int) -> Outcome:
        if stamp <= self.stamp:
            return Outcome(name, stamp, replayed=True)
        entry = self.live.get(name)
        with self._lock:
            fences = entry.get("fences", []) if entry else []
            if fences and fences[-1][1] == 0:
                fences[-1][1] = stamp
            self.stamp = stamp
        self._write()
        return Outcome(name, stamp)

    def close(self) -> None:
        with self._lock:
            for table in self._open.values():
                table.close()
            self._open.clear()

    # ---- persistence ---------------------------------------------------------------
    def _read(self) -> dict[str, Any]:
        path = self.root / REGISTRY
        if not path.exists():
            return {}
        return cast(dict[str, Any], json.loads(path.read_text()))

    def _write(self) -> None:
        tmp = self.root / (REGISTRY + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"stamp": self.stamp, "live": self.live, "history": self.history}, f, sort_keys=True)
            if self.sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, self.root / REGISTRY)

    def _remove_strays(self) -> None:
        keep = {entry["dir"] for entry in self.live.values()} | {REGISTRY}
        for child in self.root.iterdir():
            if child.name not in keep:
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)

    def checkpoint(self, dest: Path) -> None:
        """A consistent copy of every table of the shard and of the registry,
        as of now, in `dest` (must not exist): for a joining replica. Call it
        between commands (the applier thread); O(files), see TableState.checkpoint."""
        dest = Path(dest)
        dest.mkdir(parents=True)
        with self._lock:
            live = dict(self.live)
        for name, entry in sorted(live.items()):
            self.get(name).checkpoint(dest / entry["dir"])
        with open(dest / REGISTRY, "w") as f:
            json.dump({"stamp": self.stamp, "live": live, "history": self.history}, f, sort_keys=True)

    def describe(self) -> dict[str, Any]:
        return {"stamp": self.stamp, "live": dict(self.live)}


def _covers(intervals: list[list[int]], stamp: int) -> bool:
    """Whether `stamp` falls in one of the [start, end) stamp intervals (end 0: still open)."""
    return any(start < stamp and (end == 0 or stamp < end) for start, end in intervals)
