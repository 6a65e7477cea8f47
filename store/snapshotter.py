"""A shard's snapshots through pysyncobj's custom serializer hooks, made asynchronous.

pysyncobj calls `serialize` on its tick thread and renames its temp file over
the dump when the call returns, so a snapshot written there would stall
heartbeats. Instead `serialize` only queues a capture on the Applier, which
reaches it exactly when the state equals the log index being compacted; a
writer thread writes our binary format (store/snapshot.py) beside the dump,
renames it itself, and pysyncobj learns the outcome by polling `check`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .applier import Applier
from .durable_journal import fsync_dir
from .pysyncobj_adapter import SERIALIZER_STATE, dump_meta_from_json, dump_meta_to_json
from .snapshot import read_snapshot, write_snapshot
from .threadnames import name_this_thread

log = logging.getLogger(__name__)


class Snapshotter:
    def __init__(
        self,
        shard: int,
        dump_path: Path,
        applier: Applier,
        fsync: bool,
        on_snapshot: Callable[[int, int, float], None],
        preloaded: tuple[Any, int, dict[str, Any]] | None = None,
        log_fields: Callable[[], dict[str, Any]] = dict,
        on_installed: Callable[[int], None] | None = None,
    ) -> None:
        self.shard = shard
        self.dump_path = dump_path
        self._applier = applier
        self._fsync = fsync
        self._on_snapshot = on_snapshot
        self._preloaded = preloaded
        self._log_fields = log_fields
        # run on the applier thread after a snapshot a leader sent is installed, before the
        # commands after it (the node brings the shard's embedding tables up to it)
        self._on_installed = on_installed
        self._status = SERIALIZER_STATE.NOT_SERIALIZING
        self._lock = threading.Lock()
        self.snapshots = 0
        self.last_snapshot_seconds = 0.0
        self.last_snapshot_bytes = 0
        self.last_snapshot_index = 0

    def serialize(self, tmp_file: str, meta: tuple[Any, ...]) -> None:
        """Tick thread: queue a capture; the applier reaches it at exactly this index."""
        index, raft_meta = dump_meta_to_json(meta)
        with self._lock:
            self._status = SERIALIZER_STATE.SERIALIZING
        self._applier.call(lambda: self._capture_and_write(index, raft_meta))

    def _capture_and_write(self, index: int, raft_meta: dict[str, Any]) -> None:
        """Applier thread. Arrays are immutable, so a shallow copy of the
        tensor map is a consistent capture in O(#tensors)."""
        state = self._applier.state
        raft_meta["members"] = dict(state.members)
        raft_meta["layouts"] = [layout.to_json() for layout in state.layouts.values()]
        tensors = state.capture()
        dedupe = state.dedupe.copy()
        threading.Thread(
            target=self._write, args=(tensors, dedupe, index, raft_meta), name=f"snapshot-{self.shard}", daemon=True
        ).start()

    def _write(self, tensors: Any, dedupe: Any, index: int, raft_meta: dict[str, Any]) -> None:
        name_this_thread()
        started = time.perf_counter()
        partial = self.dump_path.with_suffix(".writing")
        try:
            size = write_snapshot(partial, tensors, dedupe, self.shard, index, raft_meta, self._fsync)
            os.replace(partial, self.dump_path)
            if self._fsync:  # pysyncobj drops the log this snapshot covers once we report success
                fsync_dir(self.dump_path.parent)
            status = SERIALIZER_STATE.SUCCESS
            self.snapshots += 1
            self.last_snapshot_seconds = time.perf_counter() - started
            self.last_snapshot_bytes = size
            self.last_snapshot_index = index
            log.info(
                "shard %d: snapshot at index %d, %d bytes in %.2fs",
                self.shard,
                index,
                size,
                self.last_snapshot_seconds,
                extra=self._log_fields(),
            )
            self._on_snapshot(index, size, self.last_snapshot_seconds)
        except Exception:
            log.exception("shard %d: snapshot at index %d failed", self.shard, index, extra=self._log_fields())
            with contextlib.suppress(OSError):  # e.g. a full disk: the previous snapshot stays, its space is freed
                partial.unlink(missing_ok=True)
            status = SERIALIZER_STATE.FAILED
        with self._lock:
            self._status = status

    def check(self) -> int:
        """pysyncobj's serializeChecker: SUCCESS and FAILED are reported once."""
        with self._lock:
            status: int = self._status
            if status in (SERIALIZER_STATE.SUCCESS, SERIALIZER_STATE.FAILED):
                self._status = SERIALIZER_STATE.NOT_SERIALIZING
            return status

    def deserialize(self, path: str) -> tuple[Any, ...]:
        """Tick thread, at start or when a leader sent a snapshot: install it."""
        preloaded, self._preloaded = self._preloaded, None
        if preloaded is not None:
            state, index, raft_meta = preloaded
        else:
            state, index, raft_meta = read_snapshot(path, self._applier.state.dedupe_window)
            if self._fsync:  # pysyncobj clears the journal next: a snapshot a leader sent must be on disk first
                _fsync_file(Path(path))
        self._applier.call(lambda: self._applier.install(state, index)).result()
        if preloaded is None and self._on_installed is not None:
            hook = self._on_installed
            self._applier.call(lambda: hook(index))  # not waited for: the tick thread goes on
        self.last_snapshot_index = index
        log.info("shard %d: installed snapshot at index %d (%d tensors)", self.shard, index, len(state.tensors))
        return dump_meta_from_json(raft_meta)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
