"""uvicorn's httptools protocol with the two timeouts it lacks.

uvicorn (0.54) closes idle keep-alive connections, but waits forever for a
request head or body that arrives slowly, so a few hundred slow-loris clients
can hold every connection slot (`limit_concurrency`). This subclass adds:

- `first_byte_timeout`: a new connection that sends nothing this long is
  closed without an answer (a socket opened and left idle holds a
  connection; api/connection_caps.py, the base class, has the caps on them).
- `header_timeout`: the request line and headers must be complete within this
  many seconds of the connection opening (or, on a kept-alive connection, of
  the request's first byte). Trickling bytes does not extend it.
- `body_idle_timeout`: while a request body is arriving, a silence this long
  ends it. Time during which uvicorn itself stopped reading (the handler has
  not consumed the body yet, or waits to send `100 Continue`) does not count;
  bytes of a body whose request was already answered (401, 413) do not count
  as activity, so such a connection ends within this time too.

Either answers `408 Request Timeout` (if this request sent anything and no
response has started) and closes the connection. 0 turns a timeout off.

And a cap on the request head (`max_head_bytes`): httptools buffers a header
that never ends for as long as it keeps coming (a probe saw ~180 MB and a full
core per connection until the timeout); past the cap the request gets 431 with
the JSON error body and the connection closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from store.config import LimitSettings

from .connection_caps import ConnectionCaps

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024  # request line and headers; h11's default cap, which httptools lacks
_HEAD_TOO_LARGE = b'{"error":"request_header_fields_too_large","detail":"request line and headers exceed 65536 bytes"}'
HEAD_TOO_LARGE = (
    STATUS_LINE[431] + b"content-type: application/json\r\n"
    b"content-length: " + str(len(_HEAD_TOO_LARGE)).encode() + b"\r\nconnection: close\r\n\r\n" + _HEAD_TOO_LARGE
)

REQUEST_TIMEOUT = (
    STATUS_LINE[408] + b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: 16\r\nconnection: close\r\n\r\nrequest timeout\n"
)


class SlowClientTimeouts(ConnectionCaps):
    header_timeout = 10.0
    body_idle_timeout = 30.0
    first_byte_timeout = 5.0

    _timer: asyncio.TimerHandle | None = None
    _in_head = False  # bytes of a request head arrived, its end did not
    _in_body = False
    _last_body = 0.0
    _head_bytes = 0  # bytes fed to the parser since the last request head ended
    _silent_since: float | None = None  # the connection opened and has sent nothing yet

    def data_received(self, data: bytes) -> None:
        if self._silent_since is not None:  # its first bytes: the rest of header_timeout applies
            elapsed = self.loop.time() - self._silent_since
            self._silent_since = None
            if self.header_timeout > 0:
                self._arm(max(self.header_timeout - elapsed, 0.0), self._head_expired)
            else:
                self._disarm()
        if self._in_body:
            super().data_received(data)
            return
        self._head_bytes += len(data)
        super().data_received(data)  # may end the head (on_headers_complete resets the count)
        if not self._in_body and self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            log.info("closing a connection from %s: request head over %d bytes", self._peer(), MAX_HEAD_BYTES)
            if self.cycle is not None:
                self.cycle.keep_alive = False
            self.transport.write(HEAD_TOO_LARGE)
            self.transport.close()

    # Narrows asyncio.Protocol's BaseTransport to Transport, as uvicorn's own does (mypy: override).
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        first, head = self.first_byte_timeout, self.header_timeout
        if first > 0 and (head <= 0 or first < head):
            self._silent_since = self.loop.time()
            self._arm(self.first_byte_timeout, self._silent_expired)
        else:
            self._arm(self.header_timeout, self._head_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # ---- parser callbacks --------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        if self._timer is None:  # a kept-alive connection's next request
            self._arm(self.header_timeout, self._head_expired)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._disarm()
        super().on_headers_complete()
        self._in_body = True
        self._last_body = self.loop.time()
        self._arm(self.body_idle_timeout, self._body_check)

    def on_body(self, body: bytes) -> None:
        if not self.cycle.response_complete:  # the rest of an answered request is no activity
            self._last_body = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_body = False
        self._head_bytes = 0
        self._disarm()
        super().on_message_complete()

    # ---- timers --------------------------------------------------------------
    def _arm(self, seconds: float, fire: Callable[[], None]) -> None:
        self._disarm()
        if seconds > 0:
            self._timer = self.loop.call_later(seconds, fire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _silent_expired(self) -> None:
        self._timer = None
        log.debug("closing a connection from %s: no byte within %.1fs", self._peer(), self.first_byte_timeout)
        self._close(answer=False)

    def _head_expired(self) -> None:
        self._timer = None
        log.info(
            "closing a connection from %s: request head not complete within %.1fs", self._peer(), self.header_timeout
        )
        self._close(answer=self._in_head)

    def _body_check(self) -> None:
        """Fires at most once per idle period; re-arms for the rest of it."""
        self._timer = None
        if not self._in_body or self.transport.is_closing():
            return
        now = self.loop.time()
        cycle = self.cycle
        if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
            self._last_body = now  # we are not reading: the client cannot be late
        silent = now - self._last_body
        if silent < self.body_idle_timeout:
            self._arm(self.body_idle_timeout - silent, self._body_check)
            return
        log.info("closing a connection from %s: no request body bytes for %.1fs", self._peer(), silent)
        self._close(answer=cycle is not None and not cycle.response_started)

    def _close(self, answer: bool) -> None:
        if self.transport.is_closing():
            return
        if answer:
            if self.cycle is not None:
                self.cycle.keep_alive = False
            self.transport.write(REQUEST_TIMEOUT)
        self.transport.close()

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "?"


def protocol_class(limits: LimitSettings, max_connections: int | None = None) -> type[SlowClientTimeouts]:
    """The protocol class to pass as uvicorn's `http=` with these limits (one per server:
    it holds the server's connection bookkeeping)."""
    return type(
        "HttpToolsWithLimits",
        (SlowClientTimeouts,),
        {
            "header_timeout": limits.header_timeout,
            "body_idle_timeout": limits.body_idle_timeout,
            "first_byte_timeout": limits.first_byte_timeout,
            "max_active": limits.max_active_requests,
            "max_connections": max_connections if max_connections is not None else limits.max_connections,
            "max_per_peer": limits.max_connections_per_peer,
            "_idle": OrderedDict(),
            "_per_peer": {},
        },
    )
