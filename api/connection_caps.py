"""Connections that send nothing must not starve requests that do.

uvicorn counts every open connection against `limit_concurrency`, idle or
not: 1,100 sockets that never sent a byte made almost every write and
`/readyz` answer 503. Here (a base of the protocol in api/slow_clients.py):

- only requests in flight count against `max_active` (uvicorn's
  `limit_concurrency` is off); beyond it a request gets the JSON 503 with
  Retry-After, except the probes (`/healthz`, `/readyz`);
- at most `max_connections` connections, and `max_per_peer` from one address:
  a connection past either cap closes the longest-idle connection (of that
  peer, for the per-peer cap) that has no request in flight: sockets that
  never sent a byte, kept-alive ones, heads still trickling in. Only when
  every one is busy do the newcomer's requests get the 503 (probes still
  answered), and it is closed after its answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import ClassVar

from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from store.refusals import RefusalLog

log = logging.getLogger(__name__)

PROBES = ("/healthz", "/readyz")  # answered even past every cap
_BUSY = b'{"error":"unavailable","detail":"this replica has no free connection slot; retry shortly or elsewhere"}'


async def service_unavailable(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """The answer past a cap, as every other 503: the JSON error body and
    Retry-After (uvicorn's own is plain text)."""
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(_BUSY)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": _BUSY, "more_body": False})


class ConnectionCaps(HttpToolsProtocol):
    max_active = 1024
    max_connections = 4096
    max_per_peer = 512
    # one of each per server (protocol_class makes a subclass per server)
    _idle: ClassVar[OrderedDict[ConnectionCaps, None]] = OrderedDict()  # no request in flight, longest idle first
    _per_peer: ClassVar[dict[str, int]] = {}
    _evictions = RefusalLog(log, "an idle connection (closed it)")

    _over_cap = False
    _peer_host = "?"

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._peer_host = str(self.client[0]) if self.client else "?"
        count = self._per_peer.get(self._peer_host, 0) + 1
        self._per_peer[self._peer_host] = count
        if count > self.max_per_peer and not self._evict(self._peer_host):
            self._over_cap = True
        if len(self.connections) > self.max_connections and not self._evict(None):
            self._over_cap = True
        self._idle[self] = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._idle.pop(self, None)
        left = self._per_peer.get(self._peer_host, 1) - 1
        if left > 0:
            self._per_peer[self._peer_host] = left
        else:
            self._per_peer.pop(self._peer_host, None)
        super().connection_lost(exc)

    def _evict(self, peer: str | None) -> bool:
        """Close the longest-idle connection (of `peer`, if given) other than this one."""
        for conn in self._idle:
            if conn is not self and (peer is None or conn._peer_host == peer):
                del self._idle[conn]
                self._evictions.refused(conn._peer_host, f"{'per-peer' if peer else 'total'} connection cap reached")
                conn.transport.close()
                return True
        return False

    def on_headers_complete(self) -> None:
        self._idle.pop(self, None)  # a request in flight: not evictable
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self._idle[self] = None  # idle again, the most recently

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        if cycle.scope["path"] not in PROBES and (self._over_cap or len(self.tasks) >= self.max_active):
            cycle.keep_alive = not self._over_cap
            app = service_unavailable
        super()._start_asgi_task(cycle, app)
