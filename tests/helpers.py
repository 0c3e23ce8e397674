"""Waiting on conditions: the one way tests wait for something to happen.

A test never sleeps a fixed time hoping the system is ready; it polls a
condition with a generous timeout and fails naming what it waited for. The
timeout is a bound on a broken run, not a performance assertion: on a busy
machine a passing run may take most of it.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, overload

T = TypeVar("T")

#: How often a condition is polled; small, since most conditions are cheap reads.
INTERVAL_S = 0.02
#: The default bound for a wait: long enough for a loaded 2-core CI machine.
TIMEOUT_S = 10.0


def wait_for(
    condition: Callable[[], T], timeout: float = TIMEOUT_S, what: str = "the condition"
) -> T:
    """The first truthy value of ``condition()``, polled until ``timeout`` seconds pass.

    For synchronous tests and fixtures; async tests use :func:`async_wait_for` so the
    event loop keeps running while they wait.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what} (last: {value!r})"
            )
        time.sleep(INTERVAL_S)  # poll interval of wait_for


@overload
async def async_wait_for(
    condition: Callable[[], Awaitable[T]],
    timeout: float = ...,
    what: str = ...,
    interval: float = ...,
) -> T: ...


@overload
async def async_wait_for(
    condition: Callable[[], T],
    timeout: float = ...,
    what: str = ...,
    interval: float = ...,
) -> T: ...


async def async_wait_for(
    condition: Callable[[], T | Awaitable[T]],
    timeout: float = TIMEOUT_S,
    what: str = "the condition",
    interval: float = INTERVAL_S,
) -> T:
    """:func:`wait_for` for async tests: ``condition`` may be a plain or an async callable.

    Blocking conditions (HTTP via urllib, /proc reads) are cheap enough to run inline;
    ``interval`` is for conditions that publish a probe each time they are polled.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what} (last: {value!r})"
            )
        await asyncio.sleep(interval)  # poll interval of async_wait_for
