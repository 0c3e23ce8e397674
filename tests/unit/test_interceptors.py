"""The request interceptors (fanout.core.interceptors): each on its own, then the chain."""

from __future__ import annotations

import typing
from types import MappingProxyType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fanout import settings
from fanout.core.auth import Principal
from fanout.core.interceptors import (
    REQUIRED_INTERCEPTORS,
    Admission,
    BreakerBoard,
    BreakerState,
    ChainContext,
    ChainInterceptor,
    Deadline,
    InterceptorChain,
    Outcome,
    PrincipalRateLimit,
    Rejection,
    RequestAcl,
    SubjectCircuitBreaker,
    Tracing,
    rate_key,
    retry_ms,
    timeout_outcome,
)
from fanout.core.ratelimit import KeyedRateLimiter
from fanout.errors import Code

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def principal(sub: str = "alice", **claims: object) -> Principal:
    claims["sub"] = sub
    return Principal(sub, MappingProxyType(claims), 2_000_000_000, None)


def ctx(
    subject: str = "svc.orders.get", p: Principal | None = None, **kw: typing.Any
) -> ChainContext:
    return ChainContext(subject, p, "10.0.0.1", **kw)


# -- rate limits --------------------------------------------------------------------------------
def test_rate_limiter_burst_then_wait() -> None:
    limiter = KeyedRateLimiter(rate=10, burst=3)
    assert [limiter.check("a", 100.0) for _ in range(3)] == [None, None, None]
    assert limiter.check("a", 100.0) == pytest.approx(0.1)
    assert limiter.check("b", 100.0) is None
    assert limiter.check("a", 100.05) == pytest.approx(0.05)
    assert limiter.check("a", 100.101) is None


def test_rate_limiter_is_bounded_and_evicts_least_recent() -> None:
    limiter = KeyedRateLimiter(rate=1, burst=1, max_keys=2)
    assert limiter.check("a", 0.0) is None
    assert limiter.check("b", 0.0) is None
    assert limiter.check("a", 0.0) is not None  # "a" is now the most recent
    assert limiter.check("c", 0.0) is None  # evicts "b"
    assert len(limiter) == 2
    assert limiter.check("a", 0.0) is not None  # "a" kept its debt
    assert limiter.check("b", 0.0) is None  # "b" was forgotten: a fresh bucket


@given(st.lists(st.floats(min_value=0, max_value=0.5), min_size=1, max_size=200))
def test_rate_limiter_never_exceeds_rate_plus_burst(gaps: list[float]) -> None:
    limiter = KeyedRateLimiter(rate=20, burst=5)
    now, allowed = 0.0, 0
    for gap in gaps:
        now += gap
        if limiter.check("k", now) is None:
            allowed += 1
    assert allowed <= 5 + 20 * now + 1e-6


def test_rate_key_prefers_the_principal() -> None:
    assert rate_key(principal("alice"), "10.0.0.1") == "sub:alice"
    assert rate_key(None, "10.0.0.1") == "ip:10.0.0.1"


def test_rate_limit_rejects_with_retry_after() -> None:
    limit = PrincipalRateLimit(KeyedRateLimiter(rate=4, burst=1))
    assert limit.before(ctx(p=principal()), 0.0) is None
    rejection = limit.before(ctx(p=principal()), 0.0)
    assert rejection == Rejection(Code.RATE_LIMITED, "request rate limited", "rate_limited", 250)
    assert limit.before(ctx(p=principal("bob")), 0.0) is None


def test_retry_ms_rounds_up() -> None:
    assert retry_ms(0.0) == 1
    assert retry_ms(0.2501) == 251
    assert retry_ms(2.0) == 2000


# -- circuit breakers ---------------------------------------------------------------------------
def board(**kw: typing.Any) -> tuple[BreakerBoard, list[tuple[str, BreakerState, BreakerState]]]:
    seen: list[tuple[str, BreakerState, BreakerState]] = []
    kw.setdefault("failures", 3)
    kw.setdefault("reset_after_s", 10.0)
    b = BreakerBoard(on_transition=lambda k, o, n: seen.append((k, o, n)), **kw)
    return b, seen


def fail(b: BreakerBoard, key: str, now: float, n: int = 1) -> None:
    for _ in range(n):
        b.record(key, b.allow(key, now), Outcome.FAILURE, now)


def test_breaker_opens_after_consecutive_failures() -> None:
    b, seen = board()
    fail(b, "s", 0.0, 2)
    b.record("s", b.allow("s", 0.0), Outcome.SUCCESS, 0.0)  # a success resets the count
    assert len(b) == 0
    fail(b, "s", 1.0, 2)
    assert b.state("s") == BreakerState.CLOSED
    fail(b, "s", 1.0)
    assert b.state("s") == BreakerState.OPEN
    assert seen == [("s", BreakerState.CLOSED, BreakerState.OPEN)]
    assert b.allow("s", 5.0) == Admission.REJECT
    assert b.retry_after("s", 5.0) == pytest.approx(6.0)
    assert b.allow("other", 5.0) == Admission.PASS


def test_half_open_probe_success_closes() -> None:
    b, seen = board()
    fail(b, "s", 0.0, 3)
    assert b.allow("s", 10.0) == Admission.PROBE
    assert b.state("s") == BreakerState.HALF_OPEN
    assert b.allow("s", 10.1) == Admission.REJECT  # one probe at a time
    b.record("s", Admission.PROBE, Outcome.SUCCESS, 10.2)
    assert b.state("s") == BreakerState.CLOSED and len(b) == 0
    assert [(o, n) for _, o, n in seen] == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]


def test_half_open_probe_failure_reopens_with_a_new_timer() -> None:
    b, _ = board()
    fail(b, "s", 0.0, 3)
    assert b.allow("s", 10.0) == Admission.PROBE
    b.record("s", Admission.PROBE, Outcome.FAILURE, 12.0)
    assert b.state("s") == BreakerState.OPEN
    assert b.allow("s", 21.9) == Admission.REJECT
    assert b.allow("s", 22.0) == Admission.PROBE


def test_neutral_probe_frees_the_slot_and_stale_probes_are_replaced() -> None:
    b, _ = board()
    fail(b, "s", 0.0, 3)
    assert b.allow("s", 10.0) == Admission.PROBE
    b.record("s", Admission.PROBE, Outcome.NEUTRAL, 10.0)
    assert b.allow("s", 10.0) == Admission.PROBE
    assert b.allow("s", 19.9) == Admission.REJECT
    assert b.allow("s", 20.0) == Admission.PROBE  # the first probe never reported


def test_late_results_do_not_move_an_open_breaker() -> None:
    b, _ = board()
    early = b.allow("s", 0.0)
    fail(b, "s", 0.0, 3)
    b.record("s", early, Outcome.SUCCESS, 1.0)
    assert b.state("s") == BreakerState.OPEN
    assert b.allow("s", 10.0) == Admission.PROBE
    b.record("s", early, Outcome.FAILURE, 10.5)  # not the probe
    b.record("s", early, Outcome.SUCCESS, 10.5)  # not the probe either
    assert b.state("s") == BreakerState.HALF_OPEN


def test_breaker_map_is_bounded_and_prefers_dropping_closed() -> None:
    b, seen = board(failures=1, max_entries=2)
    fail(b, "open", 0.0)
    b2 = b.allow("closed", 0.0)
    b.record("closed", b2, Outcome.FAILURE, 0.0)  # opens too (failures=1)
    assert len(b) == 2
    fail(b, "third", 0.0)
    assert len(b) == 2
    assert b.state("open") == BreakerState.CLOSED  # the oldest of all went (no closed one)
    assert ("open", BreakerState.OPEN, BreakerState.CLOSED) in seen

    c, _ = board(failures=2, max_entries=2)
    fail(c, "x", 0.0, 2)  # open
    fail(c, "y", 0.0)  # closed with one failure
    fail(c, "z", 0.0)
    assert c.state("x") == BreakerState.OPEN and len(c) == 2


def test_circuit_breaker_interceptor() -> None:
    b, _ = board(failures=1, reset_after_s=2.0)
    breaker = SubjectCircuitBreaker(b)
    first = ctx()
    assert breaker.before(first, 0.0) is None and first.admission == Admission.PASS
    breaker.after(first, Outcome.FAILURE, 0.5)
    rejection = breaker.before(ctx(), 1.0)
    assert rejection is not None
    assert (rejection.code, rejection.outcome, rejection.retry_after_ms) == (
        Code.CIRCUIT_OPEN,
        "circuit_open",
        1500,
    )
    unseen = ctx()
    breaker.after(unseen, Outcome.FAILURE, 1.0)  # never admitted: nothing recorded
    probe = ctx()
    assert breaker.before(probe, 2.5) is None and probe.admission == Admission.PROBE
    breaker.after(probe, Outcome.SUCCESS, 2.6)
    assert b.state("svc.orders.get") == BreakerState.CLOSED


def test_a_timeout_counts_against_the_service_only_at_or_above_the_floor() -> None:
    """``timeout_ms: 1`` from a client is its own choice: it must not open the circuit."""
    assert timeout_outcome(1, 1000) == Outcome.NEUTRAL
    assert timeout_outcome(999, 1000) == Outcome.NEUTRAL
    assert timeout_outcome(1000, 1000) == Outcome.FAILURE
    assert timeout_outcome(30_000, 1000) == Outcome.FAILURE
    b, _ = board(failures=2)
    for now in range(10):
        b.record("svc.orders.get", b.allow("svc.orders.get", now), timeout_outcome(1, 1000), now)
    assert b.state("svc.orders.get") == BreakerState.CLOSED and len(b) == 0


# -- ACL, deadline, tracing ---------------------------------------------------------------------
def test_acl_whitelist_and_claims() -> None:
    acl = RequestAcl(["svc.>"], "requests")
    assert acl.before(ctx("svc.orders.get"), 0) is None
    denied = acl.before(ctx("xy.md.tick"), 0)
    assert denied == Rejection(Code.SUBJECT_DENIED, "requests not allowed on xy.md.tick", "denied")
    limited = principal("bob", requests=["svc.orders.*", "svc.users.{sub}"])
    assert acl.before(ctx("svc.orders.get", limited), 0) is None
    assert acl.before(ctx("svc.users.bob", limited), 0) is None
    assert acl.before(ctx("svc.users.alice", limited), 0) is not None
    assert acl.before(ctx("svc.billing.get", limited), 0) is not None
    nothing = principal("carol", requests=[])
    assert acl.before(ctx("svc.orders.get", nothing), 0) is not None
    wrong_type = principal("dave", requests=42)
    assert acl.before(ctx("svc.orders.get", wrong_type), 0) is not None


def test_acl_verified_token_without_requests_claim_may_request_nothing() -> None:
    """Fail closed (protocol.md): whitelist ∩ claim, and no claim grants nothing.

    Only anonymous connections (auth off) get the whole whitelist.
    """
    acl = RequestAcl(["svc.>"], "requests")
    no_claim = principal("erin", subjects=["xy.md.>"])
    assert acl.before(ctx("svc.orders.get", no_claim), 0) == Rejection(
        Code.SUBJECT_DENIED, "requests not allowed on svc.orders.get", "denied"
    )
    assert acl.before(ctx("svc.orders.get", None), 0) is None


def test_acl_cache_follows_the_principal_object() -> None:
    acl = RequestAcl(["svc.>"], "requests", cache_size=2)
    p = principal("bob", requests=["svc.a"])
    assert acl.acl_for(p) is acl.acl_for(p)
    renewed = principal("bob", requests=["svc.b"])
    assert acl.acl_for(renewed).allows_subject("svc.b")
    assert not acl.acl_for(renewed).allows_subject("svc.a")
    for i in range(5):
        acl.acl_for(principal(f"u{i}"))
    assert len(acl._cache) == 2
    assert acl.acl_for(None) is acl.acl_for(None)


def test_deadline() -> None:
    deadline = Deadline(default_ms=2000, max_ms=5000)
    for asked, used in ((None, 2000), (100, 100), (60_000, 5000)):
        c = ctx(requested_timeout_ms=asked)
        assert deadline.before(c, 0) is None
        assert c.timeout_ms == used
    with pytest.raises(ValueError):
        Deadline(default_ms=6000, max_ms=5000)


def test_tracing_keeps_a_valid_client_trace() -> None:
    tracing = Tracing(entropy=lambda n: bytes(range(1, n + 1)))
    c = ctx(client_traceparent=TP, client_tracestate="congo=t61rcWkgMzE")
    tracing.before(c, 0)
    assert (c.traceparent, c.tracestate) == (TP, "congo=t61rcWkgMzE")
    c = ctx(client_traceparent=TP, client_tracestate="NOT VALID")
    tracing.before(c, 0)
    assert (c.traceparent, c.tracestate) == (TP, None)


@pytest.mark.parametrize("client", [None, "garbage", TP.upper()])
def test_tracing_starts_a_new_trace(client: str | None) -> None:
    tracing = Tracing(entropy=lambda n: bytes(range(1, n + 1)))
    c = ctx(client_traceparent=client, client_tracestate="congo=x")
    tracing.before(c, 0)
    assert c.traceparent == "00-0102030405060708090a0b0c0d0e0f10-1112131415161718-01"
    assert c.tracestate is None


# -- the chain ----------------------------------------------------------------------------------
class Recorder:
    def __init__(self, name: str, log: list[str], reject: bool = False) -> None:
        self.name = name
        self.log = log
        self.reject = reject

    def before(self, ctx: ChainContext, now: float) -> Rejection | None:
        self.log.append(f"before {self.name}")
        return Rejection(Code.SUBJECT_DENIED, self.name, "denied") if self.reject else None

    def after(self, ctx: ChainContext, outcome: Outcome, now: float) -> None:
        self.log.append(f"after {self.name} {outcome}")


def test_chain_order_and_unwinding() -> None:
    log: list[str] = []
    chain = InterceptorChain([Recorder("a", log), Recorder("b", log), Recorder("c", log)])
    assert chain.before(ctx(), 0) is None
    chain.after(ctx(), Outcome.SUCCESS, 0)
    assert log == [
        "before a",
        "before b",
        "before c",
        "after c success",
        "after b success",
        "after a success",
    ]
    log.clear()
    chain = InterceptorChain(
        [Recorder("a", log), Recorder("b", log, reject=True), Recorder("c", log)]
    )
    rejection = chain.before(ctx(), 0)
    assert rejection is not None and rejection.message == "b"
    assert log == ["before a", "before b", "after a neutral"]


def test_a_later_rejection_releases_the_probe() -> None:
    b, _ = board(failures=1, reset_after_s=1.0)
    fail(b, "svc.orders.get", 0.0)
    acl = RequestAcl(["svc.orders.list"], "requests")
    chain = InterceptorChain([SubjectCircuitBreaker(b), acl])
    assert chain.before(ctx(), 5.0) is not None  # breaker let a probe through, the ACL refused
    assert b.allow("svc.orders.get", 5.0) == Admission.PROBE  # the probe slot is free again


def names(chain: InterceptorChain) -> tuple[str, ...]:
    return tuple(i.name for i in chain.interceptors)


def test_from_order() -> None:
    available: dict[str, ChainInterceptor] = {
        "acl": RequestAcl(["svc.>"], "requests"),
        "rate_limit": PrincipalRateLimit(KeyedRateLimiter(1, 1)),
        "circuit_breaker": SubjectCircuitBreaker(BreakerBoard(1, 1.0)),
        "deadline": Deadline(1, 1),
        "tracing": Tracing(),
    }
    every = typing.get_args(settings.InterceptorName)
    assert names(InterceptorChain.from_order(every, available)) == every
    assert names(InterceptorChain.from_order(["tracing", "deadline", "acl"], available)) == (
        "tracing",
        "deadline",
        "acl",
    )
    with pytest.raises(ValueError, match="unknown"):
        InterceptorChain.from_order(["acl", "deadline", "tracing", "magic"], available)
    with pytest.raises(ValueError, match="twice"):
        InterceptorChain.from_order(["acl", "acl", "deadline", "tracing"], available)
    with pytest.raises(ValueError, match="acl"):
        InterceptorChain.from_order(["deadline", "tracing"], available)


def test_settings_know_the_same_names() -> None:
    """``settings`` keeps its own copy of the required set (importing this module would cost
    ``check-config`` 0.1 s): both must refuse the same orders."""
    every = typing.get_args(settings.InterceptorName)
    assert settings.Requests().interceptors == list(every)
    assert set(every) > REQUIRED_INTERCEPTORS
    for name in REQUIRED_INTERCEPTORS:
        without = [n for n in every if n != name]
        with pytest.raises(settings.ConfigError, match=f"required interceptors missing: .*{name}"):
            settings.load(
                environ={}, overrides={"demo.enabled": True, "requests.interceptors": without}
            )
