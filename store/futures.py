"""Small helpers for concurrent.futures.Future plumbing."""
from __future__ import annotations

from concurrent.futures import Future
from typing import Any


def forward(src: Any, dst: Future) -> None:
    """Complete `dst` like `src` (a Future, or a plain value) completes."""
    if not isinstance(src, Future):
        dst.set_result(src)
        return

    def copy(f: Future) -> None:
        exc = f.exception()
        if exc is not None:
            dst.set_exception(exc)
        else:
            dst.set_result(f.result())

    src.add_done_callback(copy)
