"""`Client`: numpy arrays in and out of a paramstore cluster over its HTTP API."""

from __future__ import annotations

import builtins
import json
import os
import ssl
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ._compress import Residuals, batch_grads_body, decode_batch, decode_tensor, wire_dtype_of
from ._errors import PreconditionFailedError
from ._partitions import PartitionMethods, PartLayout
from ._sync import SyncMethods
from ._tables import TableMethods
from ._transport import Transport
from ._wire import (
    OCTET,
    SAFETENSORS,
    array_from,
    safetensors_metadata,
    tensor_request,
    version_of,
)

__all__ = ["Client"]


class Client(TableMethods, PartitionMethods, SyncMethods):
    """A thread-safe client for one cluster.

    `urls`: any replicas (a list or a comma-separated string); `timeout`: per
    HTTP attempt; `deadline`: per call, across all retries; `session`: see
    below; `token`: an API bearer token (default: env PARAMSTORE_TOKEN);
    `verify`: TLS verification (True, False, a CA file or an SSLContext).

    Wire format: raw little-endian C-order bytes (`application/octet-stream`)
    with `X-Dtype` / `X-Shape`. Arrays are sent from their own buffer without a
    copy and pulled arrays are read-only `np.frombuffer` views of the response.

    Retries and failover. A request that fails with a connection error, a
    transport timeout, a 503 (`unavailable` / `timeout`) or a 408 (the replica
    stopped waiting, e.g. for the session's min_version) is retried on the
    next replica with bounded, jittered exponential backoff until the call's
    `deadline`; then `UnavailableError` is raised. The replica that answered
    last is tried first next time. Which calls are safe to retry:

    * reads (`pull`, `pull_many`, `list`, `wait_for`, `cluster`): always.
    * every write (`create`, `set`, `push_grad`, `push_grads`, `delete`): the
      client gives each call a fresh `X-Request-Id` and sends the SAME id on
      every retry of that call. Replicas record the outcome per id, so a
      retried write is applied at most once and the retry returns the first
      outcome, even when the first attempt timed out after it was committed.
      The guarantee holds while the id is in the store's dedupe window
      (`limits.dedupe_window` requests per shard), i.e. for any realistic
      retry horizon.
    * calling a write method again yourself (a new call) is a NEW request: a
      second `push_grad` applies the gradient twice. Use `if_version`
      (If-Match) or `create` (If-None-Match: *) when a repeated call must not
      apply twice.

    Session consistency. The client remembers, per tensor, the highest version
    it wrote or read and sends it as `min_version` on later pulls, so it reads
    its own writes from any replica (a lagging replica waits, or the client
    moves on to another). `session` can be shared between clients to carry
    this guarantee over. `delete` forgets the tensor (a re-created tensor
    restarts at version 1).
    """

    def __init__(
        self,
        urls: builtins.list[str] | str,
        timeout: float = 10.0,
        deadline: float = 30.0,
        session: dict[str, int] | None = None,
        token: str | None = None,
        verify: bool | str | ssl.SSLContext = True,
    ) -> None:
        if isinstance(urls, str):
            urls = urls.split(",")
        urls = [u.strip().rstrip("/") for u in urls if u.strip()]
        if not urls:
            raise ValueError("Client needs at least one replica URL")
        self.session: dict[str, int] = session if session is not None else {}
        self._lock = threading.Lock()
        token = token if token is not None else os.environ.get("PARAMSTORE_TOKEN")
        self._transport = Transport(urls, timeout, deadline, token, verify)
        self._layouts: dict[str, PartLayout] = {}  # partitioned tensors' parts (paramstore/_partitions.py)
        self._pool: ThreadPoolExecutor | None = None  # their parallel requests
        self._residuals = Residuals()

    @property
    def urls(self) -> builtins.list[str]:
        return self._transport.urls

    @property
    def timeout(self) -> float:
        """Per HTTP attempt."""
        return self._transport.timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        self._transport.timeout = value

    @property
    def deadline(self) -> float:
        """Per call, across all retries."""
        return self._transport.deadline

    @deadline.setter
    def deadline(self, value: float) -> None:
        self._transport.deadline = value

    # ---- lifecycle ------------------------------------------------------------------
    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writes ----------------------------------------------------------------------
    def create(
        self,
        name: str,
        value: Any,
        optimizer: Mapping[str, Any] | None = None,
        max_staleness: int | None = None,
        staleness_policy: str | None = None,
        exist_ok: bool = False,
        partitions: int | None = None,
        sync: Mapping[str, Any] | None = None,
    ) -> int:
        """Create `name` (If-None-Match: *). Returns its version: 1, or with
        `exist_ok` the current version of an existing tensor (left unchanged).
        `partitions`: cut it into that many row ranges, each in its own shard
        (docs/api.md, "Partitioned tensors"); default: the store decides.
        `sync`: synchronous rounds, e.g. {"workers": 4, "backup_workers": 1,
        "round_timeout": 30} (see `sync_step`); such a tensor stays whole."""
        body, headers = tensor_request(value)
        headers["If-None-Match"] = "*"
        if partitions is not None:
            headers["X-Partitions"] = str(int(partitions))
        if optimizer is not None:
            headers["X-Optimizer"] = json.dumps(optimizer)
        if max_staleness is not None:
            headers["X-Max-Staleness"] = str(int(max_staleness))
        if staleness_policy is not None:
            headers["X-Staleness-Policy"] = staleness_policy
        if sync is not None:
            headers["X-Sync"] = json.dumps(dict(sync))
        try:
            r = self._transport.request("PUT", f"/v1/tensors/{name}", headers=headers, content=body, write=True)
        except PreconditionFailedError as e:
            if not exist_ok or e.current_version is None:
                raise
            self._saw(name, e.current_version)
            return int(e.current_version)
        version = version_of(r)
        with self._lock:
            self.session[name] = version  # a fresh tensor: forget any older incarnation
            self._layouts.pop(name, None)
        parts = r.json().get("partitions")
        if parts:
            self._learn_parts(name, tuple(np.shape(value)), parts)
        return version

    def set(self, name: str, value: Any, if_version: int | None = None) -> int:
        """Replace the value (same dtype and shape); compare-and-set with `if_version`."""
        body, headers = tensor_request(value)
        if if_version is not None:
            headers["If-Match"] = f'"{int(if_version)}"'
        r = self._transport.request("PUT", f"/v1/tensors/{name}", headers=headers, content=body, write=True)
        return self._saw(name, version_of(r))

    def push_grad(
        self,
        name: str,
        grad: Any,
        base_version: int | None = None,
        wire_dtype: str | None = None,
        compress: str | None = None,
    ) -> int:
        """Apply `grad` with the tensor's server-side optimizer; returns the new
        version. `base_version`: the version the gradient was computed on (for
        max_staleness / the `scale` staleness policy). A partitioned tensor's
        parts are pushed in parallel, each applied atomically; the version is
        the lowest part's.

        `wire_dtype` ("float16", "bfloat16", "int8"): send the gradient
        narrowed; the server widens it to the tensor's dtype. `compress=
        "topk:0.01"`: send only the largest 1% of entries of grad + this
        tensor's residual (as flat indices and values, float32 or `wire_dtype`
        float16 / bfloat16) and keep the rest as the residual for the next
        push (error feedback; `residual(name)`). A compressed gradient of a
        partitioned tensor goes whole to the server, which splits it."""
        if wire_dtype is None and compress is None:
            version = self._with_parts(name, lambda lay: self._push_parts(name, lay, grad, base_version))
            if version is not None:
                return self._saw(name, version)
        with self._residuals.grad_request(name, grad, wire_dtype, compress) as (body, headers):
            if base_version is not None:
                headers["X-Base-Version"] = str(int(base_version))
            r = self._transport.request("POST", f"/v1/tensors/{name}/grad", headers=headers, content=body, write=True)
        if "X-Versions" in r.headers:  # partitioned: next time, straight to the parts
            self._learn_from(name, self._transport.request("HEAD", f"/v1/tensors/{name}"))
        return self._saw(name, version_of(r))

    def residual(self, name: str) -> np.ndarray | None:
        """What top-k compression of `name` has not sent yet (a copy), if anything."""
        return self._residuals.peek(name)

    def push_grads(
        self,
        grads: Mapping[str, Any],
        base_versions: Mapping[str, int] | None = None,
        wire_dtype: str | None = None,
    ) -> dict[str, int]:
        """Push many gradients in ONE request (safetensors). The tensors of each
        shard are applied atomically as one Raft entry; returns new versions.
        `wire_dtype` as for `push_grad` (the tensors must be float)."""
        body = batch_grads_body(grads, wire_dtype_of(wire_dtype))
        headers = {"Content-Type": SAFETENSORS}
        if base_versions:
            headers["X-Base-Versions"] = json.dumps({k: int(v) for k, v in base_versions.items()})
        r = self._transport.request("POST", "/v1/grads:batch", headers=headers, content=body, write=True)
        return {name: self._saw(name, v) for name, v in r.json()["versions"].items()}

    def delete(self, name: str, if_version: int | None = None) -> None:
        headers = {"If-Match": f'"{int(if_version)}"'} if if_version is not None else {}
        self._transport.request("DELETE", f"/v1/tensors/{name}", headers=headers, write=True)
        with self._lock:
            self.session.pop(name, None)
            self._layouts.pop(name, None)
        self._residuals.forget(name)

    # ---- reads -----------------------------------------------------------------------
    def pull(self, name: str, wire_dtype: str | None = None) -> tuple[np.ndarray, int]:
        """(value, version); the value is a read-only view of the response body.
        Never older than what this session already wrote or read. A
        partitioned tensor's parts are pulled in parallel (a writable array;
        the version is the lowest part's). `wire_dtype` ("float16",
        "bfloat16", "int8"): the server sends the value narrowed, returned
        decoded as float32 (a float tensor only; a partitioned one whole)."""
        if wire_dtype_of(wire_dtype) is None:
            pulled = self._with_parts(name, lambda lay: self._pull_parts(name, lay))
            if pulled is not None:
                return pulled[0], self._saw(name, pulled[1])
        params: dict[str, Any] = {}
        seen = self.session.get(name)
        if seen is not None:
            # Bound the replica-side wait so a lagging replica gives way to another.
            params = {"min_version": seen, "timeout": max(0.5, self.timeout / 2)}
        headers = {"Accept": OCTET} if wire_dtype is None else {"X-Wire-Dtype": wire_dtype}
        r = self._transport.request("GET", f"/v1/tensors/{name}", params=params, headers=headers)
        self._learn_from(name, r)
        arr = decode_tensor(r) if wire_dtype is not None else array_from(r)
        return arr, self._saw(name, version_of(r))

    def pull_many(self, names: Iterable[str], wire_dtype: str | None = None) -> dict[str, tuple[np.ndarray, int]]:
        """Many tensors in ONE request (safetensors), with session consistency;
        `wire_dtype` as for `pull` (every tensor decoded to float32)."""
        from safetensors.numpy import load

        names = builtins.list(names)
        with self._lock:
            seen = {n: self.session[n] for n in names if n in self.session}
        headers = {"Accept": SAFETENSORS}
        if seen:
            headers["X-Min-Versions"] = json.dumps(seen)
        if wire_dtype_of(wire_dtype) is not None:
            headers["X-Wire-Dtype"] = str(wire_dtype)
        r = self._transport.request("GET", "/v1/tensors:batch", params={"names": ",".join(names)}, headers=headers)
        arrays = decode_batch(r.content, names) if wire_dtype is not None else load(r.content)
        versions = json.loads(safetensors_metadata(r.content)["versions"])
        return {n: (arrays[n], self._saw(n, versions[n])) for n in names}

    def list(self) -> builtins.list[dict[str, Any]]:
        """Every tensor's name, dtype, shape, version and shard."""
        tensors: builtins.list[dict[str, Any]] = self._transport.request("GET", "/v1/tensors").json()
        return tensors

    def wait_for(self, name: str, version_gt: int, timeout: float) -> int | None:
        """Block until `name` has a version > `version_gt` (returned), or
        `timeout` seconds pass (None). The server caps one wait at
        limits.max_wait_seconds (60 s by default)."""
        r = self._transport.request(
            "HEAD",
            f"/v1/tensors/{name}",
            params={"wait_version_gt": int(version_gt), "timeout": timeout},
            attempt_timeout=timeout + self.timeout,
            deadline=timeout + self.deadline,
            ok=(200, 304),
        )
        if r.status_code == 304:
            return None
        return self._saw(name, version_of(r))

    def cluster(self) -> dict[str, Any]:
        """The answering replica's view of the shards, their leaders and members."""
        doc: dict[str, Any] = self._transport.request("GET", "/v1/cluster").json()
        return doc

    # ---- plumbing ---------------------------------------------------------------------
    def _saw(self, name: str, version: int) -> int:
        with self._lock:
            if version > self.session.get(name, 0):
                self.session[name] = version
        return version
