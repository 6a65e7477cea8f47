"""What the HTTP layer asks of a replica about embedding tables.

A table has a part on every shard: an ID lives on shard `shard_of_keys(ID)`
(a stable hash), so a push touching several shards is one command per shard,
each atomic, and a lookup reads each shard's part. The table's *home* shard
(the shard a tensor of the same name would live on) is created first: tensors
and tables share one namespace, and only that shard can see a clash.

Writes return Futures (never blocking on Raft); lookups and descriptions read
local disk and block briefly (call them off the event loop).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol, cast

import numpy as np

from ..commands import Command, TableCreate, TableDelete, TableFence, TableLoad, TablePush
from ..errors import Gone, NotFound, PreconditionFailed, StoreError, Unprocessable
from ..futures import forward, settle
from . import export, rowdtype
from .engine import MemoryBudget
from .ids import split_by_shard, table_keys
from .push import check_grads
from .registry import Tables
from .shard import TABLE_WATCH
from .spec import TableSpec, check_name, parse_spec
from .table import TableState

MAX_IDS_PER_REQUEST = 1 << 20


class TableHost(Protocol):
    """The part of `store.node.Store` this service uses."""

    def shard_of(self, name: str) -> int: ...

    def table_shards(self) -> int: ...

    def submit_to(self, shard: int, cmd: Command) -> Future[Any]: ...

    def barrier(self, shard: int) -> Future[Any]: ...

    def local_tables(self, shard: int) -> Tables: ...

    def watch_shard(self, shard: int, key: str, min_version: int) -> Future[Any]: ...

    def unwatch_shard(self, shard: int, key: str, fut: Future[Any]) -> None: ...


def gather(futures: list[Future[Any]]) -> Future[list[Any]]:
    """One Future for all: their results in order, or the first failure."""
    out: Future[list[Any]] = Future()
    results: list[Any] = [None] * len(futures)
    left = [len(futures)]
    lock = threading.Lock()
    if not futures:
        settle(out, [])

    def done(i: int, f: Future[Any]) -> None:
        exc = f.exception()
        if exc is not None:
            settle(out, exc=exc)
            return
        with lock:
            results[i] = f.result()
            left[0] -= 1
            finished = left[0] == 0
        if finished:
            settle(out, results)

    for i, f in enumerate(futures):
        f.add_done_callback(functools.partial(done, i))
    return out


def _when_all_settled(futures: list[Future[Any]], fn: Callable[[None], None]) -> None:
    """Call `fn` once every future is done, succeeded or not."""
    left = [len(futures)]
    lock = threading.Lock()

    def done(_: Future[Any]) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            fn(None)

    for f in futures:
        f.add_done_callback(done)


def then(fut: Future[Any], fn: Any) -> Future[Any]:
    out: Future[Any] = Future()

    def done(f: Future[Any]) -> None:
        exc = f.exception()
        if exc is not None:
            settle(out, exc=exc)
            return
        try:
            settle(out, fn(f.result()))
        except BaseException as e:
            settle(out, exc=e)

    fut.add_done_callback(done)
    return out


class TableService:
    def __init__(self, host: TableHost, max_ids: int = MAX_IDS_PER_REQUEST, budget: MemoryBudget | None = None) -> None:
        self.host = host
        self.budget = budget  # the block cache the tables share (metrics)
        self.max_ids = max_ids  # the HTTP layer refuses larger requests (413)
        # served by this replica (metrics): table -> [lookups, rows looked up, pushes, rows pushed]
        self.served: dict[str, list[int]] = {}
        self._served_lock = threading.Lock()

    def _count(self, name: str, field: int, requests: int, rows: int) -> None:
        with self._served_lock:
            counts = self.served.setdefault(name, [0, 0, 0, 0])
            counts[field] += requests
            counts[field + 1] += rows

    @property
    def shards(self) -> int:
        return self.host.table_shards()

    # ---- writes ----------------------------------------------------------------------
    def create(self, name: str, config: Any, rid: str | None = None) -> Future[Any]:
        check_name(name)
        spec = parse_spec(config)  # 422 here, before anything is proposed
        raw = spec.to_json()
        home = self.host.shard_of(name)
        first = self.host.submit_to(home, TableCreate(name=name, config=raw, rid=_rid(rid, home)))

        def rest(_: Any) -> Future[Any]:
            others = [
                self.host.submit_to(s, TableCreate(name=name, config=raw, rid=_rid(rid, s)))
                for s in range(self.shards)
                if s != home
            ]
            return gather(others)

        out: Future[Any] = Future()

        def after_home(f: Future[Any]) -> None:
            exc = f.exception()
            if exc is not None:
                settle(out, exc=exc)
                return
            gather_fut = rest(f.result())
            gather_fut.add_done_callback(
                lambda g: settle(out, {"name": name, "shards": self.shards, "config": raw}, g.exception())
            )

        first.add_done_callback(after_home)
        return out

    def push(
        self, name: str, ids: np.ndarray, grads: np.ndarray, base_version: int | None = None, rid: str | None = None
    ) -> Future[Any]:
        """Validate everything here (nothing is proposed for a bad push), then
        one TablePush per shard touched. Resolves with each shard's outcome."""
        spec = self.spec(name)
        keys = table_keys(ids, spec.id_dtype)
        grads = check_grads(spec, name, grads, len(keys))
        id_dtype = spec.id_dtype
        wire_ids = keys if id_dtype == "uint64" else keys.view(np.int64)
        parts = split_by_shard(keys, self.shards)
        futures = []
        order = sorted(parts)
        for shard in order:
            pos = parts[shard]
            cmd = TablePush(
                name=name,
                n=len(pos),
                id_dtype=id_dtype,
                ids=np.ascontiguousarray(wire_ids[pos]).astype(f"<{id_dtype[0]}8").tobytes(),
                grads=np.ascontiguousarray(grads[pos], dtype="<f4").tobytes(),
                base_version=base_version,
                rid=_rid(rid, shard),
            )
            futures.append(self.host.submit_to(shard, cmd))
        self._count(name, 2, 1, len(keys))
        return then(
            gather(futures),
            lambda results: {"name": name, "shards": {str(s): r for s, r in zip(order, results, strict=True)}},
        )

    def load(
        self, name: str, keys: np.ndarray, records: np.ndarray, versions: dict[int, tuple[int, int]]
    ) -> Future[Any]:
        """Restore records (the table's layout) for `keys`: one TableLoad per
        shard they live on; `versions`: shard -> (version, step) each part
        rises to. Keys must be distinct (a checkpoint's are)."""
        futures = []
        for shard, pos in sorted(split_by_shard(keys, self.shards).items()):
            version, step = versions.get(shard, (0, 0))
            cmd = TableLoad(
                name=name,
                n=len(pos),
                ids=np.ascontiguousarray(keys[pos], dtype="<u8").tobytes(),
                records=np.ascontiguousarray(records[pos]).tobytes(),
                version=version,
                step=step,
            )
            futures.append(self.host.submit_to(shard, cmd))
        return gather(futures)

    def delete(self, name: str, if_match: int | None = None, rid: str | None = None) -> Future[Any]:
        """Delete every shard's part. With `if_match` (the table's version, the
        sum over its parts) the delete is all or nothing: after a barrier, each
        part is fenced at the version this replica applied (TableFence; no push
        lands on a fenced part), and only if every fence held are the parts
        deleted; otherwise the fences are released and the answer is 412.
        Blocks for the barrier: call it off the event loop."""
        if if_match is None:
            self.spec(name)  # 404 before anything is proposed
            return self._delete_parts(name, rid)
        self.barrier()
        versions = {s: self.host.local_tables(s).get(name).version for s in range(self.shards)}
        if sum(versions.values()) != if_match:
            raise PreconditionFailed(
                f"table {name!r} is at version {sum(versions.values())}, If-Match asked for {if_match}",
                current_version=sum(versions.values()),
            )
        fences = {s: self.host.submit_to(s, TableFence(name=name, version=v)) for s, v in versions.items()}
        out: Future[Any] = Future()

        def settled(_: Any) -> None:
            failed = {s: f.exception() for s, f in fences.items() if f.exception() is not None}
            if not failed:
                forward(self._delete_parts(name, rid), out)
                return
            for s, f in fences.items():
                if f.exception() is None:
                    self.host.submit_to(s, TableFence(name=name, release=True))
            moved = {s: e for s, e in failed.items() if isinstance(e, PreconditionFailed)}
            if not moved:
                settle(out, exc=next(iter(failed.values())))
                return
            current = dict(versions)
            for s, e in moved.items():
                current[s] = int(cast(int, e.extra.get("current_version", versions[s])))
            settle(
                out,
                exc=PreconditionFailed(
                    f"table {name!r} changed to version {sum(current.values())} while it was being deleted "
                    f"(If-Match {if_match}); nothing was deleted",
                    current_version=sum(current.values()),
                ),
            )

        _when_all_settled(list(fences.values()), settled)
        return out

    def _delete_parts(self, name: str, rid: str | None) -> Future[Any]:
        futures = [self.host.submit_to(s, TableDelete(name=name, rid=_rid(rid, s))) for s in range(self.shards)]
        return then(gather(futures), lambda _: {"name": name, "deleted": True})

    # ---- reads (blocking; off the event loop) ---------------------------------------
    def spec(self, name: str) -> TableSpec:
        for shard in range(self.shards):
            try:
                return self.host.local_tables(shard).get(name).spec
            except StoreError:
                continue
        raise NotFound(f"table {name!r} does not exist")

    def barrier(self) -> None:
        """Wait until every write acknowledged before this call is applied here."""
        for f in [self.host.barrier(s) for s in range(self.shards)]:
            f.result()

    def lookup(self, name: str, ids: np.ndarray) -> tuple[np.ndarray, TableSpec, dict[int, int]]:
        """Rows for `ids` in order (storage dtype), the table's spec, and the
        version each shard's part was read at."""
        spec = self.spec(name)
        keys = table_keys(ids, spec.id_dtype)
        out = np.empty((len(keys), spec.dim), dtype=rowdtype.STORAGE[spec.dtype])
        versions: dict[int, int] = {}
        for shard, pos in split_by_shard(keys, self.shards).items():
            rows, version = self.host.local_tables(shard).get(name).lookup(np.asarray(ids)[pos])
            out[pos] = rows
            versions[shard] = version
        self._count(name, 0, 1, len(keys))
        return out, spec, versions

    # ---- delta export (blocking reads; off the event loop) ---------------------------
    def cursor(self, name: str, since: list[int], what: str = "since") -> list[int]:
        """`since` as one version per shard part: [0] means every part from 0."""
        if since == [0]:
            return [0] * self.shards
        if len(since) != self.shards:
            raise Unprocessable(
                f"{what}: table {name!r} has {self.shards} shard parts; give one version per part, "
                f"comma-separated in shard order (as X-Version of a delta, X-Versions of a lookup), or 0"
            )
        return since

    def delta(self, name: str, since: list[int]) -> tuple[TableSpec, list[export.DeltaPart]]:
        """Each part's rows changed after its `since` (at most about max_ids
        in all); Gone naming the oldest cursor if a part no longer keeps them."""
        spec = self.spec(name)
        limit = max(1, self.max_ids // self.shards)
        parts, oldest = [], []
        for shard, v in enumerate(since):
            try:
                parts.append(export.delta(self.host.local_tables(shard).get(name), v, limit))
                oldest.append(v)
            except Gone as e:
                oldest.append(int(str(e.extra["oldest_version"])))
        if len(parts) < len(since):
            cursor = ",".join(str(max(o, v)) for o, v in zip(oldest, since, strict=True))
            raise Gone(
                f"table {name!r}: changes since {','.join(map(str, since))} are no longer kept; "
                f"the oldest cursor is {cursor}; start again from a full export (since=0)",
                oldest_version=cursor,
            )
        return spec, parts

    def dump(self, name: str) -> tuple[TableSpec, list[export.PartDump]]:
        """Every part at one version each, to stream; the caller closes them."""
        spec = self.spec(name)
        dumps: list[export.PartDump] = []
        try:
            for shard in range(self.shards):
                dumps.append(export.PartDump(self.host.local_tables(shard).get(name), shard))
        except BaseException:
            for d in dumps:
                d.close()
            raise
        return spec, dumps

    def changed(self, name: str, since: list[int]) -> tuple[Future[Any], Any]:
        """A Future resolved once some part passes its `since`, and a function
        that drops the waits (call it when done waiting)."""
        key = TABLE_WATCH + name
        watches = [(s, self.host.watch_shard(s, key, v + 1)) for s, v in enumerate(since)]
        out: Future[Any] = Future()
        for _, f in watches:
            f.add_done_callback(lambda f: settle(out, f.result() if f.exception() is None else None))

        def cancel() -> None:
            for s, f in watches:
                self.host.unwatch_shard(s, key, f)

        return out, cancel

    def reached(self, name: str, cursor: list[int]) -> tuple[Future[Any], Callable[[], None]]:
        """A Future resolved once every part here has applied its version in
        `cursor` (a min_version lookup), and a function that drops the waits."""
        key = TABLE_WATCH + name
        watches = [(s, self.host.watch_shard(s, key, v)) for s, v in enumerate(cursor) if v > 0]

        def cancel() -> None:
            for s, f in watches:
                self.host.unwatch_shard(s, key, f)

        return gather([f for _, f in watches]), cancel

    def info(self, name: str, digest: bool = False) -> dict[str, Any]:
        """The table as this replica holds it; `digest`: each shard part's
        sha256 over everything replicated (reads the whole part)."""
        parts = []
        for shard in range(self.shards):
            tables = self.host.local_tables(shard)
            if name in tables:
                table = tables.get(name)
                part = table.info()
                if digest:
                    part["digest"] = table.digest()
                parts.append((shard, part))
        if not parts:
            raise NotFound(f"table {name!r} does not exist")
        first = parts[0][1]
        return {
            "name": name,
            "config": first["config"],
            "version": sum(p["version"] for _, p in parts),
            "rows": sum(p["rows"] for _, p in parts),
            "bytes_on_disk": sum(p["bytes_on_disk"] for _, p in parts),
            "bytes_in_memory": sum(p["bytes_in_memory"] for _, p in parts),
            "admitted": sum(p["admitted"] for _, p in parts),
            "refused": sum(p["refused"] for _, p in parts),
            "evicted": sum(p["evicted"] for _, p in parts),
            "shards": {str(s): {k: p[k] for k in ("version", "rows", "digest") if k in p} for s, p in parts},
        }

    def cache_hits(self, name: str) -> tuple[int, int]:
        """(hits, misses) in the block cache of this replica's reads of the
        table, every shard part; local, so not in `info` (equal on replicas)."""
        return self._sum_parts(name, lambda t: t.cache_hits())

    def row_cache_hits(self, name: str) -> tuple[int, int]:
        """(hits, misses) of record reads in the table's row caches here, every shard part."""
        return self._sum_parts(name, lambda t: t.row_cache_hits())

    def _sum_parts(self, name: str, read: Callable[[TableState], tuple[int, int]]) -> tuple[int, int]:
        hits = misses = 0
        for shard in range(self.shards):
            tables = self.host.local_tables(shard)
            if name in tables:
                try:
                    h, m = read(tables.get(name))
                except NotFound:  # deleted meanwhile
                    continue
                hits, misses = hits + h, misses + m
        return hits, misses

    def list(self) -> list[dict[str, Any]]:
        names: set[str] = set()
        for shard in range(self.shards):
            names.update(self.host.local_tables(shard).names())
        out = []
        for name in sorted(names):
            try:
                out.append(self.info(name))
            except NotFound:  # deleted meanwhile
                continue
        return out


def _rid(rid: str | None, shard: int) -> str | None:
    """One request id per shard's command, derived from the client's."""
    return None if rid is None else f"{rid}/{shard}"
