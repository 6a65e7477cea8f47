"""`Transport`: one HTTP connection pool per replica, and the retry loop that
turns a request into one logical call across them (failover, backoff,
deadline, one X-Request-Id per write)."""

from __future__ import annotations

import random
import ssl
import time
import uuid
from typing import Any

import httpx

from ._errors import ParamStoreError, UnavailableError, error_from

_BACKOFF_BASE = 0.05
_BACKOFF_CAP = 1.0
# Answers another replica (or a later try) may do better on. 503: no leader, not
# caught up, or the store's deadline passed. 408: this replica stopped waiting,
# e.g. for the session's min_version, or for a body that stalled in transit.
# A retried write carries the same X-Request-Id, so it still applies at most once.
_RETRY_STATUSES = (408, 503)
# A replica answers 307 with the URL of one that hosts the tensor's shard.
_MAX_REDIRECTS = 5


class _Retry(Exception):
    """An attempt that another replica (or a later try) may succeed at."""

    def __init__(self, cause: BaseException, retry_after: float = 0.0) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.retry_after = retry_after


class Transport:
    """Thread-safe. `timeout`: per attempt; `deadline`: per call, across all retries."""

    def __init__(
        self,
        urls: list[str],
        timeout: float,
        deadline: float,
        token: str | None,
        verify: bool | str | ssl.SSLContext,
    ) -> None:
        self.urls = urls
        self.timeout = timeout
        self.deadline = deadline
        self.preferred = 0  # the replica that answered last: tried first next time
        if isinstance(verify, str):  # a CA bundle file
            verify = ssl.create_default_context(cafile=verify)
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = [
            httpx.Client(
                base_url=u,
                timeout=timeout,
                follow_redirects=False,  # followed in _attempt, keeping the token for known replicas
                headers=auth,
                verify=verify,
                limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
            )
            for u in urls
        ]

    def _replica_of(self, url: httpx.URL) -> int | None:
        """The index of the replica `url` is on (same scheme, host and port), if any."""
        for j, c in enumerate(self.http):
            b = c.base_url
            if (b.scheme, b.host, b.port) == (url.scheme, url.host, url.port):
                return j
        return None

    def close(self) -> None:
        for c in self.http:
            c.close()

    def request(
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
        first: int | None = None,
        request_id: str | None = None,
    ) -> httpx.Response:
        """One logical call: retried across replicas until it gets a definite
        answer or the deadline passes. Writes keep one X-Request-Id throughout
        (`request_id`, or a fresh one): a caller that retries a failed call with
        the same id gets it applied at most once. `first`: the index of the
        replica to try first (default: the one that answered last)."""
        headers = dict(headers or {})
        if write:
            headers["X-Request-Id"] = request_id or uuid.uuid4().hex
        end = time.monotonic() + (self.deadline if deadline is None else deadline)
        per_try = self.timeout if attempt_timeout is None else attempt_timeout
        n = len(self.urls)
        start = self.preferred if first is None else first
        attempt = 0
        while True:
            i = (start + attempt) % n
            remaining = end - time.monotonic()
            try:
                r = self._attempt(i, method, path, headers, params, content, max(0.05, min(per_try, remaining)), ok)
                self.preferred = i
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
        http = self.http[i]
        try:
            request = http.build_request(method, path, headers=headers, params=params, content=content, timeout=timeout)
            r = http.send(request)
            for _ in range(_MAX_REDIRECTS):
                if r.status_code not in (307, 308) or "Location" not in r.headers:
                    break
                # httpx would drop Authorization on a redirect to another origin:
                # one of this client's replicas gets the same request through its
                # own pool, token included; any other host, without the token.
                target = r.url.join(r.headers["Location"])
                j = self._replica_of(target)
                if j is not None:
                    http = self.http[j]
                request = http.build_request(method, target, headers=headers, content=content, timeout=timeout)
                if j is None:
                    request.headers.pop("Authorization", None)
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
