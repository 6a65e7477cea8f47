"""Small helpers for concurrent.futures.Future plumbing."""

from __future__ import annotations

from concurrent.futures import Future, InvalidStateError
from typing import Any


def settle(dst: Future[Any], value: Any = None, exc: BaseException | None = None) -> None:
    """Complete `dst` unless it is already done (answered by another attempt,
    or cancelled by a caller that gave up waiting)."""
    if dst.done():
        return
    try:
        if exc is not None:
            dst.set_exception(exc)
        else:
            dst.set_result(value)
    except InvalidStateError:
        pass


def forward(src: Any, dst: Future[Any]) -> None:
    """Complete `dst` like `src` (a Future, or a plain value) completes."""
    if not isinstance(src, Future):
        settle(dst, src)
        return

    def copy(f: Future[Any]) -> None:
        exc = f.exception()
        settle(dst, None if exc is not None else f.result(), exc)

    src.add_done_callback(copy)
