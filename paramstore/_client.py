"""`Client`: numpy arrays in and out of a paramstore cluster over its HTTP API."""

from __future__ import annotations

import builtins
import json
import os
import random
import ssl
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import httpx
import numpy as np

from ._errors import ParamStoreError, PreconditionFailedError, UnavailableError, error_from
from ._wire import (
    OCTET,
    SAFETENSORS,
    array_from,
    le_contiguous,
    safetensors_array,
    safetensors_body,
    safetensors_metadata,
    tensor_request,
    version_of,
)

__all__ = ["Client"]

_BACKOFF_BASE = 0.05
_BACKOFF_CAP = 1.0
# Answers another replica (or a later try) may do better on. 503: no leader, not
# caught up, or the store's deadline passed. 408: this replica stopped waiting,
# e.g. for the session's min_version, or for a body that stalled in transit.
# A retried write carries the same X-Request-Id, so it still applies at most once.
_RETRY_STATUSES = (408, 503)


class _Retry(Exception):
    """An attempt that another replica (or a later try) may succeed at."""

    def __init__(self, cause: BaseException, retry_after: float = 0.0) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.retry_after = retry_after


class Client:
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
        self.urls = [u.strip().rstrip("/") for u in urls if u.strip()]
        if not self.urls:
            raise ValueError("Client needs at least one replica URL")
        self.timeout = timeout
        self.deadline = deadline
        self.session: dict[str, int] = session if session is not None else {}
        self._lock = threading.Lock()
        self._preferred = 0
        token = token if token is not None else os.environ.get("PARAMSTORE_TOKEN")
        if isinstance(verify, str):  # a CA bundle file
            verify = ssl.create_default_context(cafile=verify)
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = [
            httpx.Client(
                base_url=u,
                timeout=timeout,
                follow_redirects=True,
                headers=auth,
                verify=verify,
                limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
            )
            for u in self.urls
        ]

    # ---- lifecycle ------------------------------------------------------------------
    def close(self) -> None:
        for c in self._http:
            c.close()

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
    ) -> int:
        """Create `name` (If-None-Match: *). Returns its version: 1, or with
        `exist_ok` the current version of an existing tensor (left unchanged)."""
        body, headers = tensor_request(value)
        headers["If-None-Match"] = "*"
        if optimizer is not None:
            headers["X-Optimizer"] = json.dumps(optimizer)
        if max_staleness is not None:
            headers["X-Max-Staleness"] = str(int(max_staleness))
        if staleness_policy is not None:
            headers["X-Staleness-Policy"] = staleness_policy
        try:
            r = self._request("PUT", f"/v1/tensors/{name}", headers=headers, content=body, write=True)
        except PreconditionFailedError as e:
            if not exist_ok or e.current_version is None:
                raise
            self._saw(name, e.current_version)
            return int(e.current_version)
        version = version_of(r)
        with self._lock:
            self.session[name] = version  # a fresh tensor: forget any older incarnation
        return version

    def set(self, name: str, value: Any, if_version: int | None = None) -> int:
        """Replace the value (same dtype and shape); compare-and-set with `if_version`."""
        body, headers = tensor_request(value)
        if if_version is not None:
            headers["If-Match"] = f'"{int(if_version)}"'
        r = self._request("PUT", f"/v1/tensors/{name}", headers=headers, content=body, write=True)
        return self._saw(name, version_of(r))

    def push_grad(self, name: str, grad: Any, base_version: int | None = None) -> int:
        """Apply `grad` with the tensor's server-side optimizer; returns the new
        version. `base_version`: the version the gradient was computed on (for
        max_staleness / the `scale` staleness policy)."""
        body, headers = tensor_request(grad)
        if base_version is not None:
            headers["X-Base-Version"] = str(int(base_version))
        r = self._request("POST", f"/v1/tensors/{name}/grad", headers=headers, content=body, write=True)
        return self._saw(name, version_of(r))

    def push_grads(self, grads: Mapping[str, Any], base_versions: Mapping[str, int] | None = None) -> dict[str, int]:
        """Push many gradients in ONE request (safetensors). The tensors of each
        shard are applied atomically as one Raft entry; returns new versions."""
        from safetensors.numpy import save

        body = save({name: le_contiguous(g) for name, g in grads.items()})
        headers = {"Content-Type": SAFETENSORS}
        if base_versions:
            headers["X-Base-Versions"] = json.dumps({k: int(v) for k, v in base_versions.items()})
        r = self._request("POST", "/v1/grads:batch", headers=headers, content=body, write=True)
        return {name: self._saw(name, v) for name, v in r.json()["versions"].items()}

    def delete(self, name: str, if_version: int | None = None) -> None:
        headers = {"If-Match": f'"{int(if_version)}"'} if if_version is not None else {}
        self._request("DELETE", f"/v1/tensors/{name}", headers=headers, write=True)
        with self._lock:
            self.session.pop(name, None)

    # ---- reads -----------------------------------------------------------------------
    def pull(self, name: str) -> tuple[np.ndarray, int]:
        """(value, version); the value is a read-only view of the response body.
        Never older than what this session already wrote or read."""
        params: dict[str, Any] = {}
        seen = self.session.get(name)
        if seen is not None:
            # Bound the replica-side wait so a lagging replica gives way to another.
            params = {"min_version": seen, "timeout": max(0.5, self.timeout / 2)}
        r = self._request("GET", f"/v1/tensors/{name}", params=params, headers={"Accept": OCTET})
        arr = array_from(r)
        return arr, self._saw(name, version_of(r))

    def pull_many(self, names: Iterable[str]) -> dict[str, tuple[np.ndarray, int]]:
        """Many tensors in ONE request (safetensors), with session consistency."""
        from safetensors.numpy import load

        names = builtins.list(names)
        with self._lock:
            seen = {n: self.session[n] for n in names if n in self.session}
        headers = {"Accept": SAFETENSORS}
        if seen:
            headers["X-Min-Versions"] = json.dumps(seen)
        r = self._request("GET", "/v1/tensors:batch", params={"names": ",".join(names)}, headers=headers)
        arrays = load(r.content)
        versions = json.loads(safetensors_metadata(r.content)["versions"])
        return {n: (arrays[n], self._saw(n, versions[n])) for n in names}

    def list(self) -> builtins.list[dict[str, Any]]:
        """Every tensor's name, dtype, shape, version and shard."""
        tensors: builtins.list[dict[str, Any]] = self._request("GET", "/v1/tensors").json()
        return tensors

    def wait_for(self, name: str, version_gt: int, timeout: float) -> int | None:
        """Block until `name` has a version > `version_gt` (returned), or
        `timeout` seconds pass (None). The server caps one wait at
        limits.max_wait_seconds (60 s by default)."""
        r = self._request(
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
        doc: dict[str, Any] = self._request("GET", "/v1/cluster").json()
        return doc

    # ---- embedding tables (docs/api.md, "Embedding tables") ----------------------------
    def create_table(
        self,
        name: str,
        dim: int,
        dtype: str = "float32",
        id_dtype: str = "int64",
        initializer: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        admission: Mapping[str, Any] | None = None,
        eviction: Mapping[str, Any] | None = None,
        exist_ok: bool = False,
        **config: Any,
    ) -> dict[str, Any]:
        """Create a table of `dim`-wide rows keyed by 64-bit IDs; returns its
        description. `config` takes the other table fields (max_staleness, ...)."""
        body: dict[str, Any] = {"dim": dim, "dtype": dtype, "id_dtype": id_dtype, **config}
        for key, value in (
            ("initializer", initializer),
            ("optimizer", optimizer),
            ("admission", admission),
            ("eviction", eviction),
        ):
            if value is not None:
                body[key] = dict(value)
        try:
            self._request(
                "PUT",
                f"/v1/tables/{name}",
                headers={"Content-Type": "application/json"},
                content=json.dumps(body).encode(),
                write=True,
            )
        except ParamStoreError as e:
            if not (exist_ok and e.code == "already_exists"):
                raise
        return self.table_info(name)

    def lookup(self, name: str, ids: Any, consistency: str = "local") -> np.ndarray:
        """Rows for `ids` (int64 or uint64), in order: float32 (float16 tables:
        float16). IDs never pushed read their initial value; nothing is created."""
        body = safetensors_body({"ids": np.asarray(ids)})
        r = self._request(
            "POST",
            f"/v1/tables/{name}:lookup",
            params={"consistency": consistency},
            headers={"Content-Type": SAFETENSORS, "Accept": SAFETENSORS},
            content=body,
        )
        return safetensors_array(r.content, "rows")

    def push_rows(self, name: str, ids: Any, grads: Any, base_version: int | None = None) -> dict[str, Any]:
        """Row gradients (n x dim) for `ids`; duplicates are summed. The store
        applies one atomic command per shard the IDs live on; returns each
        shard's outcome (its new version) under "shards"."""
        body = safetensors_body({"ids": np.asarray(ids), "grads": np.asarray(grads, dtype=np.float32)})
        headers = {"Content-Type": SAFETENSORS}
        if base_version is not None:
            headers["X-Base-Version"] = str(int(base_version))
        result: dict[str, Any] = self._request(
            "POST", f"/v1/tables/{name}:push", headers=headers, content=body, write=True
        ).json()
        return result

    def table_info(self, name: str) -> dict[str, Any]:
        """Rows, bytes in memory and on disk, version (summed over shards), config."""
        info: dict[str, Any] = self._request("GET", f"/v1/tables/{name}").json()
        return info

    def list_tables(self) -> builtins.list[dict[str, Any]]:
        tables: builtins.list[dict[str, Any]] = self._request("GET", "/v1/tables").json()
        return tables

    def delete_table(self, name: str, if_version: int | None = None) -> None:
        headers = {"If-Match": f'"{int(if_version)}"'} if if_version is not None else {}
        self._request("DELETE", f"/v1/tables/{name}", headers=headers, write=True)

    # ---- plumbing ---------------------------------------------------------------------
    def _saw(self, name: str, version: int) -> int:
        with self._lock:
            if version > self.session.get(name, 0):
                self.session[name] = version
        return version

    def _request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
        content: Any = None,
        write: bool = False,
        attempt_timeout: float | None = None,
        deadline: float | None = None,
        ok: tuple[int, ...] = (200, 201),
    ) -> httpx.Response:
        """One logical call: retried across replicas until it gets a definite
        answer or the deadline passes. Writes keep one X-Request-Id throughout."""
        headers = dict(headers or {})
        if write:
            headers["X-Request-Id"] = uuid.uuid4().hex
        end = time.monotonic() + (self.deadline if deadline is None else deadline)
        per_try = self.timeout if attempt_timeout is None else attempt_timeout
        n = len(self.urls)
        start = self._preferred
        attempt = 0
        while True:
            i = (start + attempt) % n
            remaining = end - time.monotonic()
            try:
                r = self._attempt(i, method, path, headers, params, content, max(0.05, min(per_try, remaining)), ok)
                self._preferred = i
                return r
            except _Retry as e:
                cause, retry_after = e.cause, e.retry_after
            attempt += 1
            # After a full round of replicas, honour the server's Retry-After (capped).
            pause = min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** min(attempt - 1, 10))
            pause *= random.uniform(0.5, 1.5)
            if attempt % n == 0:
                pause = max(pause, min(retry_after, _BACKOFF_CAP))
            if time.monotonic() + pause >= end:
                msg = (
                    f"{method} {path}: no replica answered within the deadline "
                    f"({attempt} attempts over {', '.join(self.urls)}); last: {cause}"
                )
                if isinstance(cause, ParamStoreError):
                    raise UnavailableError(msg, status=cause.status, code=cause.code, body=cause.body) from cause
                raise UnavailableError(msg) from cause
            time.sleep(pause)

    def _attempt(
        self,
        i: int,
        method: str,
        path: str,
        headers: dict[str, str],
        params: dict[str, Any] | None,
        content: Any,
        timeout: float,
        ok: tuple[int, ...],
    ) -> httpx.Response:
        http = self._http[i]
        try:
            request = http.build_request(method, path, headers=headers, params=params, content=content, timeout=timeout)
            r = http.send(request)
        except httpx.TransportError as e:  # refused, reset, timed out: outcome may be unknown
            raise _Retry(e) from e
        if r.status_code in ok:
            return r
        err = error_from(r)
        if r.status_code in _RETRY_STATUSES:
            try:
                retry_after = float(r.headers.get("Retry-After", "0"))
            except ValueError:
                retry_after = 0.0
            raise _Retry(err, retry_after)
        raise err
