"""uvicorn's httptools protocol with the two timeouts it lacks.

uvicorn (0.54) closes idle keep-alive connections, but waits forever for a
request head or body that arrives slowly, so a few hundred slow-loris clients
can hold every connection slot (`limit_concurrency`). This subclass adds:

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
from collections.abc import Callable

from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.protocols.http import flow_control
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

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


PROBES = ("/healthz", "/readyz")  # answered even when every connection slot is taken
_BUSY = b'{"error":"unavailable","detail":"this replica has no free connection slot; retry shortly or elsewhere"}'


async def service_unavailable(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """uvicorn's answer once `limit_concurrency` is spent, as every other 503:
    the JSON error body and Retry-After (uvicorn's own is plain text)."""
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(_BUSY)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": _BUSY, "more_body": False})


class SlowClientTimeouts(HttpToolsProtocol):
    header_timeout = 10.0
    body_idle_timeout = 30.0

    _timer: asyncio.TimerHandle | None = None
    _in_head = False  # bytes of a request head arrived, its end did not
    _in_body = False
    _last_body = 0.0
    _head_bytes = 0  # bytes fed to the parser since the last request head ended

    def data_received(self, data: bytes) -> None:
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
        self._arm(self.header_timeout, self._head_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        if app is flow_control.service_unavailable:
            # Probes still get the truth: an orchestrator must not restart or
            # drain a replica whose slots idle sockets hold (they cost a task each).
            app = self.app if cycle.scope["path"] in PROBES else service_unavailable
        super()._start_asgi_task(cycle, app)

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


def protocol_class(header_timeout: float, body_idle_timeout: float) -> type[SlowClientTimeouts]:
    """The protocol class to pass as uvicorn's `http=` with these timeouts."""
    return type(
        "HttpToolsWithTimeouts",
        (SlowClientTimeouts,),
        {"header_timeout": header_timeout, "body_idle_timeout": body_idle_timeout},
    )
