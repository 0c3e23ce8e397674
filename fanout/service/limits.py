"""Service-side rate limit and circuit breaker interceptors, on the gateway's sans-I/O parts.

Both reuse the gateway's parts (:class:`~fanout.core.ratelimit.KeyedRateLimiter`,
:class:`~fanout.core.interceptors.BreakerBoard`), so a service and the gateway count the same way.
They add attributes to the request's span, never spans of their own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Literal

from fanout.core.interceptors import Admission, BreakerBoard, Outcome, retry_ms
from fanout.core.ratelimit import KeyedRateLimiter
from fanout.service.context import (
    HANDLER_TIMEOUT,
    RATE_LIMITED,
    UNAVAILABLE,
    Next,
    Request,
    ServiceError,
)


def rate_identity(req: Request) -> tuple[str, str]:
    """``(key, identity_type)`` of the caller, most trustworthy first.

    1. the principal an auth interceptor verified (``jwt_sub``);
    2. the principal the gateway asserts in ``Fanout-Principal`` (``gateway_principal``);
    3. the gateway connection, ``Fanout-Conn`` (``gateway_conn``): an anonymous browser;
    4. otherwise one bucket shared by every anonymous caller (``anonymous``).

    2 and 3 are headers: they hold only where NATS permissions let nobody but
    the gateway publish to the service's subjects.
    """
    principal = req.context.principal
    if principal is not None:
        return "sub:" + principal.sub, "jwt_sub"
    meta = req.metadata
    if meta is not None and meta.principal:
        return "principal:" + meta.principal, "gateway_principal"
    if meta is not None and meta.conn:
        return "conn:" + meta.conn, "gateway_conn"
    return "anonymous", "anonymous"


class RateLimit:
    """Token bucket per caller (``per="principal"``) or one for the service (``per="service"``).

    Over the limit: ``429`` with the wait in the message, and the span's
    ``nats.feature.ratelimit.triggered`` is true.
    """

    def __init__(
        self,
        *,
        rate: float,
        burst: float,
        per: Literal["principal", "service"] = "principal",
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per not in ("principal", "service"):
            raise ValueError("per must be 'principal' or 'service'")
        self.per = per
        self.limiter = KeyedRateLimiter(rate, burst, max_keys)
        self.clock = clock

    async def __call__(self, req: Request, call_next: Next) -> Any:
        key, identity = ("service", "service") if self.per == "service" else rate_identity(req)
        wait = self.limiter.check(key, self.clock())
        req.span.set_attribute("ratelimit.identity_type", identity)
        req.span.set_attribute("nats.feature.ratelimit.triggered", wait is not None)
        if wait is not None:
            raise ServiceError(RATE_LIMITED, f"rate limited; retry after {retry_ms(wait)} ms")
        return await call_next(req)


class CircuitBreaker:
    """A breaker per endpoint around the rest of the chain.

    ``failures`` consecutive failures (exceptions, 5xx ServiceErrors, and
    handler timeouts when ``timeout`` is set) open it: requests get ``503``
    without reaching the handler; ``reset_after`` seconds later one probe goes
    through and its result closes or reopens it. 4xx errors are the caller's
    fault and count as successes. The span's ``nats.feature.circuitbreaker.state``
    is the state the request found.
    """

    def __init__(
        self,
        *,
        failures: int = 5,
        reset_after: float = 10.0,
        timeout: float | None = None,
        max_entries: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.board = BreakerBoard(failures, reset_after, max_entries)
        self.timeout = timeout
        self.clock = clock

    async def __call__(self, req: Request, call_next: Next) -> Any:
        key = req.endpoint
        admission = self.board.allow(key, self.clock())
        state = self.board.state(key)
        req.span.set_attribute("nats.feature.circuitbreaker.state", state.name.lower())
        if admission == Admission.REJECT:
            wait = retry_ms(self.board.retry_after(key, self.clock()))
            raise ServiceError(UNAVAILABLE, f"circuit open; retry after {wait} ms")
        outcome = Outcome.NEUTRAL
        try:
            result = await self._call(req, call_next)
        except ServiceError as exc:
            outcome = Outcome.FAILURE if exc.server_fault else Outcome.SUCCESS
            raise
        except Exception:
            outcome = Outcome.FAILURE
            raise
        else:
            outcome = Outcome.SUCCESS
            return result
        finally:
            self.board.record(key, admission, outcome, self.clock())

    async def _call(self, req: Request, call_next: Next) -> Any:
        if self.timeout is None:
            return await call_next(req)
        deadline = asyncio.timeout(self.timeout)
        try:
            async with deadline:
                return await call_next(req)
        except TimeoutError:
            if deadline.expired():
                raise ServiceError(HANDLER_TIMEOUT, "handler timed out") from None
            raise
