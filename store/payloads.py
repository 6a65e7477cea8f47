"""Content-addressed payload store of one shard: tensor bytes that travel beside Raft.

A payload is named by the hash of its bytes (BLAKE3, or SHA-256 for those
named by earlier versions: store/content_id.py). It is written to the data dir
(temp file + rename) and kept in memory until the command that names it has
been applied, so the common path never reads it back from disk. Files are
removed once a snapshot covers the command that used them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

from . import content_id
from .buffers import Bytes, as_buffer
from .durable_journal import fsync_dir
from .errors import CorruptData
from .writeback import start_writeback

log = logging.getLogger(__name__)


def _valid_id(payload_id: str) -> bool:
    return content_id.kind_of(payload_id) is not None


class PayloadStore:
    def __init__(self, root: Path, memory_budget: int = 2 << 30, fsync: bool = False) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.memory_budget = memory_budget
        self._lock = threading.Lock()
        self._memory: OrderedDict[str, Bytes] = OrderedDict()
        self._memory_bytes = 0
        self._applied_at: dict[str, int] = {}  # payload id -> raft index that used it
        self._arrived = threading.Condition(self._lock)
        for leftover in self.root.glob("*.part"):
            leftover.unlink(missing_ok=True)

    def path(self, payload_id: str) -> Path:
        if not _valid_id(payload_id):
            raise CorruptData(f"invalid payload id {payload_id!r}")
        return self.root / payload_id

    def put(self, data: Bytes, payload_id: str | None = None, digest: str | None = None) -> str:
        """Store bytes; verifies them against `payload_id` when one is given.
        `digest`: their id (in `payload_id`'s algorithm), if the caller already
        computed it from these very bytes (e.g. while they arrived)."""
        actual = digest or content_id.id_of(data, None if payload_id is None else content_id.kind_of(payload_id))
        if payload_id is not None and actual != payload_id:
            raise CorruptData(f"payload bytes hash to {actual[:16]}…, expected {payload_id[:16]}…")
        target = self.path(actual)
        if not target.exists():
            tmp = target.with_name(f"{actual}.{threading.get_ident()}.part")
            try:
                with open(tmp, "wb") as f:
                    f.write(as_buffer(data))
                    f.flush()
                    if self.fsync:
                        os.fsync(f.fileno())
                    else:
                        start_writeback(f.fileno())  # dirty pages become clean, reclaimable ones sooner
                os.replace(tmp, target)
            except BaseException:  # a full disk must not leave .part files until the next start
                tmp.unlink(missing_ok=True)
                raise
            if self.fsync:  # the entry naming it may be acknowledged once its name is durable too
                fsync_dir(self.root)
        self._remember(actual, data)
        return actual

    def _remember(self, payload_id: str, data: Bytes) -> None:
        with self._lock:
            if payload_id not in self._memory:
                self._memory[payload_id] = data
                self._memory_bytes += len(data)
                while self._memory_bytes > self.memory_budget and len(self._memory) > 1:
                    _, old = self._memory.popitem(last=False)
                    self._memory_bytes -= len(old)
            self._arrived.notify_all()

    def get(self, payload_id: str) -> Bytes | None:
        """The payload's bytes, or None if this replica does not hold it."""
        with self._lock:
            held = self._memory.get(payload_id)
        if held is not None:
            return held
        try:
            with open(self.path(payload_id), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        if content_id.id_of(data, content_id.kind_of(payload_id)) != payload_id:
            log.error("payload %s on disk is corrupt; discarding it", payload_id)
            self.path(payload_id).unlink(missing_ok=True)
            return None
        return data

    def wait_for(self, payload_id: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            while payload_id not in self._memory:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return self.path(payload_id).exists()
                self._arrived.wait(remaining)
        return True

    def applied(self, payload_id: str, index: int) -> None:
        """The command at raft `index` consumed this payload: drop it from memory."""
        with self._lock:
            self._applied_at[payload_id] = index
            data = self._memory.pop(payload_id, None)
            if data is not None:
                self._memory_bytes -= len(data)

    def collect(self, covered_index: int, orphan_age: float = 3600.0) -> int:
        """Delete payloads a snapshot at `covered_index` makes unnecessary, and
        orphans (never applied) older than `orphan_age` seconds."""
        removed = 0
        with self._lock:
            done = [p for p, i in self._applied_at.items() if i <= covered_index]
            for p in done:
                del self._applied_at[p]
            pending = set(self._applied_at) | set(self._memory)
        for p in done:
            self.path(p).unlink(missing_ok=True)
            removed += 1
        cutoff = time.time() - orphan_age
        for f in self.root.iterdir():
            if f.name in pending or not _valid_id(f.name):
                continue
            try:
                if f.stat().st_mtime < cutoff:
                    f.unlink(missing_ok=True)
                    removed += 1
            except FileNotFoundError:
                pass
        return removed
