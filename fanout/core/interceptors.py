"""The request interceptors (protocol v1.1), sans-I/O: small classes, time passed in.

A gateway ``request`` runs through a chain in a configured order: ACL →
per-principal rate limit → per-subject circuit breaker → deadline → tracing
by default. Each interceptor's ``before`` may reject (a :class:`Rejection`
becomes an ``error`` frame) or enrich the :class:`ChainContext`; ``after``
learns the outcome (the breaker counts failures there). When one rejects,
the ones before it get ``after(NEUTRAL)`` so, say, a half-open breaker's
probe slot is released.

:class:`~fanout.core.ratelimit.KeyedRateLimiter` and :class:`BreakerBoard` are the
reusable parts: ``fanout.service`` builds its own interceptors on them. Both keep bounded
maps: a full bucket and a closed breaker with no failures are the same as no
entry, so only clients and subjects with a recent history take memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Protocol

from fanout.core.acl import SubjectAcl
from fanout.core.auth import Principal
from fanout.core.metadata import new_traceparent, parse_traceparent, valid_tracestate
from fanout.core.ratelimit import KeyedRateLimiter
from fanout.errors import Code

#: Without these a request cannot be built safely; the other two may be left out.
REQUIRED_INTERCEPTORS = frozenset({"acl", "deadline", "tracing"})


class Outcome(StrEnum):
    """What a request's result means for a breaker."""

    SUCCESS = "success"
    FAILURE = "failure"
    NEUTRAL = "neutral"


@dataclass(frozen=True, slots=True)
class Rejection:
    """A request refused before NATS; ``outcome`` is its metric label."""

    code: Code
    message: str
    outcome: str
    retry_after_ms: int | None = None


def retry_ms(seconds: float) -> int:
    """Seconds → whole milliseconds, rounded up, at least 1."""
    return max(1, math.ceil(seconds * 1000))


class ChainContext:
    """One request on its way through the chain."""

    __slots__ = (
        "admission",
        "client_traceparent",
        "client_tracestate",
        "peer",
        "principal",
        "requested_timeout_ms",
        "subject",
        "timeout_ms",
        "traceparent",
        "tracestate",
    )

    def __init__(
        self,
        subject: str,
        principal: Principal | None,
        peer: str,
        *,
        requested_timeout_ms: int | None = None,
        client_traceparent: str | None = None,
        client_tracestate: str | None = None,
    ) -> None:
        self.subject = subject
        self.principal = principal
        self.peer = peer
        self.requested_timeout_ms = requested_timeout_ms
        self.client_traceparent = client_traceparent
        self.client_tracestate = client_tracestate
        self.timeout_ms = 0
        self.traceparent = ""
        self.tracestate: str | None = None
        self.admission: Admission | None = None


class ChainInterceptor(Protocol):
    """A gateway-side step (``fanout.service.Interceptor`` is the service's async kind)."""

    name: str

    def before(self, ctx: ChainContext, now: float) -> Rejection | None: ...

    def after(self, ctx: ChainContext, outcome: Outcome, now: float) -> None: ...


# -- rate limits --------------------------------------------------------------------------------
def rate_key(principal: Principal | None, peer: str) -> str:
    """The verified ``sub``; anonymous clients by address."""
    if principal is not None:
        return "sub:" + principal.sub
    return "ip:" + peer


class PrincipalRateLimit:
    """Per-principal token bucket: ``XYW010`` with ``retry_after_ms`` when it is empty."""

    name = "rate_limit"

    def __init__(self, limiter: KeyedRateLimiter) -> None:
        self.limiter = limiter

    def before(self, ctx: ChainContext, now: float) -> Rejection | None:
        wait = self.limiter.check(rate_key(ctx.principal, ctx.peer), now)
        if wait is None:
            return None
        return Rejection(Code.RATE_LIMITED, "request rate limited", "rate_limited", retry_ms(wait))

    def after(self, ctx: ChainContext, outcome: Outcome, now: float) -> None:
        return None


# -- circuit breakers ---------------------------------------------------------------------------
class BreakerState(IntEnum):
    """Also the value of the ``fanout_circuit_state`` gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Admission(IntEnum):
    REJECT = 0
    PASS = 1
    PROBE = 2


class _Breaker:
    __slots__ = ("failures", "opened_at", "probe_at", "state")

    def __init__(self) -> None:
        self.failures = 0
        self.state = BreakerState.CLOSED
        self.opened_at = 0.0
        self.probe_at: float | None = None


OnTransition = Callable[[str, BreakerState, BreakerState], None]


class BreakerBoard:
    """One circuit breaker per key (a subject): closed → open → half-open → closed.

    ``failures`` consecutive failures open a breaker; while open, requests are
    refused without touching the backend; ``reset_after_s`` later one request
    goes through as a probe (half-open): its success closes the breaker, its
    failure opens it again. A probe that never reports is replaced after
    another ``reset_after_s``. Late results of requests admitted before the
    breaker opened do not move an open breaker.

    Only breakers with failures are stored (``max_entries`` of them; when full,
    the oldest closed one, else the oldest of all, is dropped).
    ``on_transition(key, old, new)`` sees every state change.
    """

    __slots__ = ("_entries", "failures", "max_entries", "on_transition", "reset_after_s")

    def __init__(
        self,
        failures: int,
        reset_after_s: float,
        max_entries: int = 1000,
        on_transition: OnTransition | None = None,
    ) -> None:
        if failures < 1 or reset_after_s <= 0 or max_entries < 1:
            raise ValueError("failures >= 1, reset_after_s > 0 and max_entries >= 1 are required")
        self.failures = failures
        self.reset_after_s = reset_after_s
        self.max_entries = max_entries
        self.on_transition = on_transition
        self._entries: dict[str, _Breaker] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def state(self, key: str) -> BreakerState:
        entry = self._entries.get(key)
        return BreakerState.CLOSED if entry is None else entry.state

    def _move(self, key: str, entry: _Breaker, new: BreakerState) -> None:
        old, entry.state = entry.state, new
        if old != new and self.on_transition is not None:
            self.on_transition(key, old, new)

    def allow(self, key: str, now: float) -> Admission:
        entry = self._entries.get(key)
        if entry is None or entry.state == BreakerState.CLOSED:
            return Admission.PASS
        if entry.state == BreakerState.OPEN:
            if now - entry.opened_at < self.reset_after_s:
                return Admission.REJECT
            self._move(key, entry, BreakerState.HALF_OPEN)
        elif entry.probe_at is not None and now - entry.probe_at < self.reset_after_s:
            return Admission.REJECT
        entry.probe_at = now
        return Admission.PROBE

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until the next probe may go (0 when one may go now)."""
        entry = self._entries.get(key)
        if entry is None or entry.state == BreakerState.CLOSED:
            return 0.0
        since = entry.opened_at if entry.state == BreakerState.OPEN else entry.probe_at
        return 0.0 if since is None else max(0.0, since + self.reset_after_s - now)

    def record(self, key: str, admission: Admission, outcome: Outcome, now: float) -> None:
        entry = self._entries.get(key)
        if entry is None:
            if outcome == Outcome.FAILURE:
                entry = self._insert(key)
            else:
                return
        state = entry.state
        if state == BreakerState.OPEN:
            return
        if state == BreakerState.HALF_OPEN:
            if admission != Admission.PROBE:
                return
            if outcome == Outcome.NEUTRAL:
                entry.probe_at = None
            elif outcome == Outcome.SUCCESS:
                self._move(key, entry, BreakerState.CLOSED)
                del self._entries[key]
            else:
                entry.opened_at = now
                entry.probe_at = None
                self._move(key, entry, BreakerState.OPEN)
            return
        if outcome == Outcome.SUCCESS:
            del self._entries[key]
        elif outcome == Outcome.FAILURE:
            entry.failures += 1
            if entry.failures >= self.failures:
                entry.opened_at = now
                self._move(key, entry, BreakerState.OPEN)

    def _insert(self, key: str) -> _Breaker:
        entries = self._entries
        if len(entries) >= self.max_entries:
            victim = next(
                (k for k, e in entries.items() if e.state == BreakerState.CLOSED),
                next(iter(entries)),
            )
            gone = entries.pop(victim)
            if gone.state != BreakerState.CLOSED and self.on_transition is not None:
                self.on_transition(victim, gone.state, BreakerState.CLOSED)
        entry = entries[key] = _Breaker()
        return entry


def timeout_outcome(timeout_ms: int, floor_ms: int) -> Outcome:
    """A timeout is the service's failure only when it had at least ``floor_ms`` to answer.

    Clients choose ``timeout_ms``: counting ``timeout_ms: 1`` against a healthy
    service would let any user open its circuit for everyone.
    """
    return Outcome.FAILURE if timeout_ms >= floor_ms else Outcome.NEUTRAL


class SubjectCircuitBreaker:
    """Per-subject breaker: ``XYW011`` (NATS untouched) while the subject's circuit is open."""

    name = "circuit_breaker"

    def __init__(self, board: BreakerBoard) -> None:
        self.board = board

    def before(self, ctx: ChainContext, now: float) -> Rejection | None:
        admission = self.board.allow(ctx.subject, now)
        if admission != Admission.REJECT:
            ctx.admission = admission
            return None
        wait = self.board.retry_after(ctx.subject, now)
        return Rejection(
            Code.CIRCUIT_OPEN, f"circuit open for {ctx.subject}", "circuit_open", retry_ms(wait)
        )

    def after(self, ctx: ChainContext, outcome: Outcome, now: float) -> None:
        if ctx.admission is not None:
            self.board.record(ctx.subject, ctx.admission, outcome, now)


# -- ACL, deadline, tracing ---------------------------------------------------------------------
class RequestAcl:
    """Requests only on subjects in the request whitelist ∩ the token's ``requests`` claim.

    Same rules and templates as subscriptions (:class:`SubjectAcl`), except
    that it fails closed: a verified token without the claim may request
    nothing (a token minted for subscribing must not reach every service);
    only anonymous connections, where auth is off, get the whole whitelist. The ACL
    of a principal is built once and cached (by identity, bounded): a
    re-authenticated connection has a new principal, hence a fresh ACL.
    """

    name = "acl"

    def __init__(
        self,
        whitelist: Sequence[str],
        claim_name: str,
        *,
        max_bytes: int = 256,
        cache_size: int = 4096,
    ) -> None:
        self.whitelist = tuple(whitelist)
        self.claim_name = claim_name
        self.max_bytes = max_bytes
        self.cache_size = cache_size
        self._anonymous = SubjectAcl(self.whitelist, None, max_bytes=max_bytes)
        self._unclaimed = SubjectAcl(self.whitelist, (), max_bytes=max_bytes)
        self._cache: dict[int, tuple[Principal, SubjectAcl]] = {}

    def acl_for(self, principal: Principal | None) -> SubjectAcl:
        if principal is None:
            return self._anonymous
        if self.claim_name not in principal.claims:
            return self._unclaimed
        cached = self._cache.get(id(principal))
        if cached is not None and cached[0] is principal:
            return cached[1]
        acl = SubjectAcl.from_claims(
            self.whitelist, principal.claims, self.claim_name, max_bytes=self.max_bytes
        )
        if len(self._cache) >= self.cache_size:
            del self._cache[next(iter(self._cache))]
        self._cache[id(principal)] = (principal, acl)
        return acl

    def before(self, ctx: ChainContext, now: float) -> Rejection | None:
        if self.acl_for(ctx.principal).allows_subject(ctx.subject):
            return None
        return Rejection(Code.SUBJECT_DENIED, f"requests not allowed on {ctx.subject}", "denied")

    def after(self, ctx: ChainContext, outcome: Outcome, now: float) -> None:
        return None


class Deadline:
    """The request's timeout: the client's ``timeout_ms`` (else the default), capped."""

    name = "deadline"

    def __init__(self, default_ms: int, max_ms: int) -> None:
        if not 0 < default_ms <= max_ms:
            raise ValueError("0 < default_ms <= max_ms is required")
        self.default_ms = default_ms
        self.max_ms = max_ms

    def before(self, ctx: ChainContext, now: float) -> Rejection | None:
        asked = ctx.requested_timeout_ms
        ctx.timeout_ms = min(self.default_ms if asked is None else asked, self.max_ms)
        return None

    def after(self, ctx: ChainContext, outcome: Outcome, now: float) -> None:
        return None


class Tracing:
    """W3C trace context: the client's ``traceparent`` when valid, else a new trace.

    ``tracestate`` travels only with the client's own valid ``traceparent``.
    """

    name = "tracing"

    def __init__(self, entropy: Callable[[int], bytes] = os.urandom) -> None:
        self.entropy = entropy

    def before(self, ctx: ChainContext, now: float) -> Rejection | None:
        raw = ctx.client_traceparent
        parsed = None if raw is None else parse_traceparent(raw)
        if parsed is None:
            ctx.traceparent = str(new_traceparent(self.entropy(24)))
            ctx.tracestate = None
            return None
        ctx.traceparent = str(parsed)
        state = ctx.client_tracestate
        ctx.tracestate = state if state is not None and valid_tracestate(state) else None
        return None

    def after(self, ctx: ChainContext, outcome: Outcome, now: float) -> None:
        return None


# -- the chain ----------------------------------------------------------------------------------
class InterceptorChain:
    """Interceptors in order; ``before`` stops at the first rejection."""

    __slots__ = ("interceptors",)

    def __init__(self, interceptors: Sequence[ChainInterceptor]) -> None:
        self.interceptors = tuple(interceptors)

    @classmethod
    def from_order(
        cls, order: Sequence[str], available: Mapping[str, ChainInterceptor]
    ) -> InterceptorChain:
        """The chain named by ``order``; ValueError for unknown, duplicate or missing names."""
        unknown = [name for name in order if name not in available]
        if unknown:
            raise ValueError(f"unknown interceptors {unknown} (known: {sorted(available)})")
        if len(set(order)) != len(order):
            raise ValueError("an interceptor is named twice")
        missing = REQUIRED_INTERCEPTORS.difference(order)
        if missing:
            raise ValueError(f"required interceptors missing: {sorted(missing)}")
        return cls([available[name] for name in order])

    def before(self, ctx: ChainContext, now: float) -> Rejection | None:
        interceptors = self.interceptors
        for index, interceptor in enumerate(interceptors):
            rejection = interceptor.before(ctx, now)
            if rejection is not None:
                for passed in reversed(interceptors[:index]):
                    passed.after(ctx, Outcome.NEUTRAL, now)
                return rejection
        return None

    def after(self, ctx: ChainContext, outcome: Outcome, now: float) -> None:
        for interceptor in reversed(self.interceptors):
            interceptor.after(ctx, outcome, now)
