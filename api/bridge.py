"""Awaiting the store's concurrent Futures from the event loop, with deadlines."""
from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Any, TypeVar

from store.errors import Timeout

T = TypeVar("T")


async def wait(fut: "Future[T]", timeout: float, what: str, write: bool = True) -> T:
    """Await a store Future; on deadline raise Timeout (a write's outcome may
    still happen later, which is why writes carry request ids)."""
    try:
        return await asyncio.wait_for(asyncio.wrap_future(fut), timeout)
    except asyncio.TimeoutError:
        hint = ("outcome unknown, retry with the same X-Request-Id to be safe" if write
                else "retry, or read from another replica")
        raise Timeout(f"{what} did not complete within {timeout:g}s; {hint}") from None


async def wait_optional(fut: "Future[Any]", timeout: float) -> bool:
    """True if `fut` completed within `timeout`."""
    try:
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), timeout)
        return True
    except asyncio.TimeoutError:
        return False
