"""`PushPipeline`: row-gradient pushes with at most K in flight.

K = 0 pushes synchronously (the caller waits and sees errors at once). With
K > 0 a push runs on a background thread and the caller goes on; once K are in
flight the next one waits for the oldest. A push that fails (after the
client's own retries across replicas, within its deadline) is kept, with its
request id, and raised as `PushFailed` by the next `check()` (every training
step calls it) until `retry()` sends it again with the SAME request id, so the
store applies it at most once even if the failed attempt was in fact applied,
or `discard_failed()` drops it on purpose. No gradient is dropped silently.
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._errors import ParamStoreError


@dataclass
class FailedPush:
    request_id: str
    ids: np.ndarray
    grads: np.ndarray
    error: BaseException


class PushFailed(ParamStoreError):
    """Row pushes failed; `failed` holds them (request ids, IDs, gradients, causes)."""

    def __init__(self, failed: list[FailedPush]) -> None:
        first = failed[0].error
        super().__init__(
            f"{len(failed)} row push(es) failed; first cause: {type(first).__name__}: {first}. "
            "retry_pushes() re-sends them with the same request ids (applied at most once); "
            "discard_failed_pushes() drops them",
            code="push_failed",
        )
        self.failed = failed


class PushPipeline:
    def __init__(
        self,
        client: Any,
        table: str,
        max_in_flight: int = 0,
        on_result: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if max_in_flight < 0:
            raise ValueError("max_in_flight must be >= 0")
        self.client = client
        self.table = table
        self.max_in_flight = max_in_flight
        self.on_result = on_result
        self.pushes = 0  # acknowledged
        self.rows_pushed = 0
        self.failed: list[FailedPush] = []
        self._in_flight: deque[Future[None]] = deque()
        self._lock = threading.Lock()
        self._pool = (
            ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="paramstore-push")
            if max_in_flight
            else None
        )

    def submit(self, ids: np.ndarray, grads: np.ndarray) -> None:
        """Push `grads` (n x dim) for `ids`. Always sent (or queued), even
        after earlier failures, so this gradient is never the one lost; with
        K = 0 raises `PushFailed` if it (or an earlier push) failed."""
        rid = uuid.uuid4().hex
        if self._pool is None:
            self._send(rid, ids, grads)
            self.check()
            return
        while len(self._in_flight) >= self.max_in_flight:
            self._in_flight.popleft().result()  # never raises: _send records failures
        self._in_flight.append(self._pool.submit(self._send, rid, ids, grads))

    def check(self) -> None:
        """Raise `PushFailed` if a push failed and was neither retried nor discarded."""
        with self._lock:
            failed = list(self.failed)
        if failed:
            raise PushFailed(failed) from failed[0].error

    def flush(self) -> None:
        """Wait for every push in flight, then `check()`."""
        while self._in_flight:
            self._in_flight.popleft().result()
        self.check()

    def retry(self) -> None:
        """Send the failed pushes again, synchronously, with their request ids."""
        self.flush_quietly()
        with self._lock:
            failed, self.failed = self.failed, []
        for f in failed:
            self._send(f.request_id, f.ids, f.grads)
        self.check()

    def discard_failed(self) -> list[FailedPush]:
        with self._lock:
            failed, self.failed = self.failed, []
        return failed

    def flush_quietly(self) -> None:
        while self._in_flight:
            self._in_flight.popleft().result()

    def close(self) -> None:
        self.flush_quietly()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _send(self, rid: str, ids: np.ndarray, grads: np.ndarray) -> None:
        try:
            result = self.client.push_rows(self.table, ids, grads, request_id=rid)
        except Exception as e:  # kept and raised on the next step
            with self._lock:
                self.failed.append(FailedPush(rid, ids, grads, e))
            return
        with self._lock:
            self.pushes += 1
            self.rows_pushed += len(ids)
        if self.on_result is not None:
            self.on_result(result)
