"""Applies committed commands to a shard's state on a thread of its own.

pysyncobj calls its apply hook on the Raft tick thread, the same thread that
sends heartbeats. Applying an optimizer step to a 64 MB tensor there would
stall heartbeats and trigger elections, so the hook only enqueues the command
here and returns a Future; this thread applies commands in log order. Reads,
version waits and snapshots all observe the state this thread maintains.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from .commands import Inline, Stored, from_log
from .errors import StoreError
from .state import ShardState
from .threadnames import name_this_thread

log = logging.getLogger(__name__)


class Applier:
    def __init__(
        self, state: ShardState, resolve: Callable[[Stored, int], Any], on_payload_used: Callable[[str, int, int], None]
    ) -> None:
        self.state = state
        self.applied_index = 0
        self._resolve = resolve
        self._on_payload_used = on_payload_used
        # ("apply", index, entry, future) or ("call", fn, future); None stops the thread
        self._queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._watch_lock = threading.Lock()
        self._watchers: dict[str, list[tuple[int, Future[int]]]] = {}
        self._pending = 0
        self._pending_lock = threading.Lock()
        self.apply_seconds = 0.0
        self.applied_count = 0
        self._thread = threading.Thread(target=self._run, name=f"applier-{state.shard}", daemon=True)
        self._stopping = False
        self._thread.start()

    # ---- called from the Raft tick thread ----------------------------------
    def submit(self, index: int, entry: tuple[Any, ...]) -> Future[Any]:
        """Apply the sealed log entry (store/commands.py `to_log`) at `index`;
        it is decoded on the applier thread, not the tick thread."""
        fut: Future[Any] = Future()
        self._enqueue(("apply", index, entry, fut))
        return fut

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run `fn` on the applier thread after everything queued before it."""
        fut: Future[Any] = Future()
        self._enqueue(("call", fn, fut))
        return fut

    def _enqueue(self, job: tuple[Any, ...]) -> None:
        with self._pending_lock:
            self._pending += 1
        self._queue.put(job)

    @property
    def pending(self) -> int:
        return self._pending

    # ---- watchers (any thread) ---------------------------------------------
    def watch(self, name: str, min_version: int) -> Future[int]:
        """A Future that resolves with the version once `name` reaches `min_version`."""
        fut: Future[int] = Future()
        with self._watch_lock:
            current = self.state.version_of(name)
            if current >= min_version:
                fut.set_result(current)
                return fut
            self._watchers.setdefault(name, []).append((min_version, fut))
        return fut

    def unwatch(self, name: str, fut: Future[int]) -> None:
        with self._watch_lock:
            lst = self._watchers.get(name)
            if lst:
                lst[:] = [(v, f) for v, f in lst if f is not fut]
                if not lst:
                    del self._watchers[name]

    def _notify(self, names: set[str]) -> None:
        if not names or not self._watchers:
            return
        with self._watch_lock:
            for name in names:
                lst = self._watchers.get(name)
                if not lst:
                    continue
                version = self.state.version_of(name)
                keep = []
                for want, fut in lst:
                    if version >= want:
                        if not fut.done():
                            fut.set_result(version)
                    else:
                        keep.append((want, fut))
                if keep:
                    self._watchers[name] = keep
                else:
                    del self._watchers[name]

    # ---- the thread ----------------------------------------------------------
    def _run(self) -> None:
        name_this_thread()
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                if job[0] == "apply":
                    self._apply(*job[1:])
                else:
                    _, fn, fut = job
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # reported to whoever waits on it
                        fut.set_exception(e)
            except Exception:
                log.exception("applier %s: unexpected failure", self.state.shard)
            finally:
                with self._pending_lock:
                    self._pending -= 1

    def _apply(self, index: int, entry: tuple[Any, ...], fut: Future[Any]) -> None:
        started = time.perf_counter()
        used: list[Stored] = []

        def resolve(ref: Inline | Stored) -> Any:
            if isinstance(ref, Inline):
                return ref.data
            used.append(ref)
            return self._resolve(ref, index)

        try:
            self.state.log_index = index
            result = self.state.apply(from_log(entry), resolve)
            fut.set_result(result)
        except StoreError as e:
            fut.set_exception(e)
        except Exception as e:  # a bug: the command changed nothing, report it
            log.exception("applier %s: command at index %d failed", self.state.shard, index)
            fut.set_exception(StoreError(f"internal error applying command: {e}"))
        self.applied_index = max(self.applied_index, index)
        for ref in used:
            self._on_payload_used(ref.id, ref.size, index)
        self.apply_seconds += time.perf_counter() - started
        self.applied_count += 1
        self._notify(self.state.changed)

    def install(self, state: ShardState, index: int) -> None:
        """Replace the state (snapshot load). Called with the applier idle."""
        if state.tables is None:  # tables live on disk beside the snapshot, not in it
            state.tables = self.state.tables
        self.state = state
        self.applied_index = index
        self._notify(set(state.tensors) | set(self._watchers))

    def stop(self) -> None:
        self._queue.put(None)
