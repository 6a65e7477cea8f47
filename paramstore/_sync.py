"""The synchronous-round methods of `Client` (docs/api.md, "Synchronous rounds")."""

from __future__ import annotations

import builtins
import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import numpy as np

from ._errors import ConflictError, UnavailableError


class _Client(Protocol):
    """What `sync_step` uses of `Client`."""

    def push_grad(
        self,
        name: str,
        grad: Any,
        base_version: int | None = None,
        wire_dtype: str | None = None,
        compress: str | None = None,
    ) -> int: ...
    def push_grads(
        self, grads: Mapping[str, Any], base_versions: Mapping[str, int] | None = None, wire_dtype: str | None = None
    ) -> dict[str, int]: ...
    def wait_for(self, name: str, version_gt: int, timeout: float) -> int | None: ...
    def pull_many(self, names: Iterable[str], wire_dtype: str | None = None) -> dict[str, tuple[np.ndarray, int]]: ...


class SyncMethods:
    """Mixed into `Client`: one worker's step of synchronous data-parallel training."""

    def sync_step(
        self: _Client,
        grads: Mapping[str, Any],
        versions: Mapping[str, int],
        timeout: float = 300.0,
        wire_dtype: str | None = None,
        compress: str | None = None,
        pull_dtype: str | None = None,
    ) -> dict[str, tuple[np.ndarray, int]]:
        """Push the gradients computed on `versions` (tensors created with
        `sync=`) into their rounds, wait until every round closed, and return
        the new (value, version) of each tensor. Several tensors go in one
        request (each shard's part applies atomically).

        A gradient too late for its round (it closed without it: backup
        workers, round_timeout) is refused by the store (409); the worker's
        step is then simply skipped and the newer values returned, as TF's
        SyncReplicasOptimizer drops stale gradients. Raises UnavailableError
        if the rounds do not close within `timeout` seconds.

        `wire_dtype` and `compress` send the gradients narrowed or top-k
        (as `push_grad`; top-k: one request per tensor, its residual kept),
        `pull_dtype` returns the new values pulled in that wire dtype."""
        names = builtins.list(grads)
        try:
            if compress is not None or len(names) == 1:
                for name in names:
                    self.push_grad(
                        name, grads[name], base_version=versions[name], wire_dtype=wire_dtype, compress=compress
                    )
            else:
                self.push_grads(grads, base_versions=versions, wire_dtype=wire_dtype)
        except ConflictError as e:
            open_round = e.body.get("round")
            if not isinstance(open_round, dict) or open_round.get("version", 0) <= min(versions.values()):
                raise  # not a late gradient: a version from the future, or no sync tensor
        deadline = time.monotonic() + timeout
        for name in names:
            while self.wait_for(name, versions[name], min(30.0, max(0.0, deadline - time.monotonic()))) is None:
                if time.monotonic() >= deadline:
                    raise UnavailableError(f"the round of {name!r} for version {versions[name]} did not close")
        return self.pull_many(names, wire_dtype=pull_dtype)
