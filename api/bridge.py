"""Awaiting the store from the event loop: its concurrent Futures, with
deadlines, and reads that may copy a large tensor."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Any, TypeVar

import anyio

from store.errors import Timeout
from store.interface import StoreAPI
from store.record import Tensor

from .errors import WaitExpired

T = TypeVar("T")
COPY_IN_THREAD_BYTES = 1 << 20


async def read_tensor(store: StoreAPI, name: str) -> tuple[Tensor, int]:
    """`store.get(name)` without stalling the loop: a tensor that sparse
    pushes update in place is copied by the read, in a worker thread if large."""
    live, _ = store.peek(name)
    if live.in_place and live.nbytes > COPY_IN_THREAD_BYTES:
        return await anyio.to_thread.run_sync(store.get, name)
    return store.get(name)


async def wait(fut: Future[T], timeout: float, what: str, write: bool = True) -> T:
    """Await a store Future; on deadline raise Timeout (a write's outcome may
    still happen later, which is why writes carry request ids).

    One loop future, one timer and one thread-safe callback: this runs for
    every write, and `wait_for(wrap_future(...))` costs twice the objects."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[T] = loop.create_future()

    def landed(_: Future[T]) -> None:  # on whichever thread completed `fut`
        if not loop.is_closed():
            loop.call_soon_threadsafe(_copy_outcome, fut, waiter)

    fut.add_done_callback(landed)
    timer = loop.call_later(timeout, _expire, waiter)
    try:
        return await waiter
    except (_Expired, TimeoutError):  # ours, or one the store raised (as wait_for turned it into Timeout)
        fut.cancel()
        hint = (
            "outcome unknown, retry with the same X-Request-Id to be safe"
            if write
            else "retry, or read from another replica"
        )
        raise Timeout(f"{what} did not complete within {timeout:g}s; {hint}") from None
    except asyncio.CancelledError:
        fut.cancel()
        raise
    finally:
        timer.cancel()


def _copy_outcome(src: Future[T], dst: asyncio.Future[T]) -> None:
    if dst.done():
        return
    if src.cancelled():
        dst.cancel()
        return
    exc = src.exception()
    if exc is not None:
        dst.set_exception(exc)
    else:
        dst.set_result(src.result())


class _Expired(Exception):
    """The deadline of `wait` passed (not a TimeoutError the store raised)."""


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(_Expired())


async def wait_optional(fut: Future[Any], timeout: float) -> bool:
    """True if `fut` completed within `timeout`."""
    if fut.done():
        # wrap_future hands the result over with call_soon_threadsafe: with a
        # zero timeout it would look pending even though it is already there.
        return True
    try:
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), timeout)
        return True
    except asyncio.TimeoutError:
        return False


async def wait_within(fut: Future[T], deadline: float, caller_bound: bool, what: str) -> T:
    """`wait` for a read. If the caller's own `timeout` set the deadline
    (`caller_bound`), running out is WaitExpired (408), not Timeout (503):
    nothing is wrong with the server."""
    try:
        return await wait(fut, deadline, what, write=False)
    except Timeout:
        if not caller_bound:
            raise
        raise WaitExpired(f"{what} did not complete within the request's timeout={deadline:g}s") from None
