"""The ``request`` op (protocol v1.1): a browser's request becomes a NATS request.

:meth:`RequestBroker.handle` runs on the connection's read path and never
awaits: it validates the subject and the client's headers, caps the requests
in flight on the connection, runs the interceptor chain of
``fanout.core.interceptors`` (ACL, rate limit, circuit breaker, deadline,
tracing, in the configured order) and, when all pass, starts one task that
sends the NATS request with the protocol's metadata headers and writes the
``reply`` or ``error`` frame. Refusals before NATS are answered at once, in
the same write as the connection's other replies.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Callable

import nats.errors

from fanout import metrics
from fanout.core import metadata, protocol, websocket
from fanout.core.interceptors import (
    BreakerBoard,
    BreakerState,
    ChainContext,
    ChainInterceptor,
    Deadline,
    InterceptorChain,
    Outcome,
    PrincipalRateLimit,
    RequestAcl,
    SubjectCircuitBreaker,
    Tracing,
    timeout_outcome,
)
from fanout.core.ratelimit import KeyedRateLimiter
from fanout.core.subjects import SubjectError, matches, validate_subject
from fanout.errors import Code
from fanout.logs import ClientEventLog
from fanout.settings import Settings
from fanout.worker.connection import OPEN, WsConnection
from fanout.worker.nats_link import NatsLink

log = logging.getLogger("fanout.requests")

#: nats.micro's error reply header: a 4xx code is the caller's fault, anything else the service's.
SERVICE_ERROR_CODE = "Nats-Service-Error-Code"
#: Outcomes whose request reached NATS: these are timed.
_TIMED = frozenset({"ok", "service_error", "timeout", "no_responders"})
_UNAVAILABLE = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionDrainingError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
)


def _service_failed(code: str) -> bool:
    """A nats.micro error reply counts against the breaker unless it is a 4xx."""
    return not (len(code) == 3 and code.isdigit() and code[0] == "4")


class RequestBroker:
    """Answers ``request`` ops for one worker (the gateway's ``RequestHandler``)."""

    def __init__(
        self,
        settings: Settings,
        link: NatsLink,
        *,
        client_log: ClientEventLog,
        entropy: Callable[[int], bytes] = os.urandom,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        req = settings.requests
        self.link = link
        self.client_log = client_log
        self.entropy = entropy
        self.clock = clock
        self.wall = wall
        self.max_subject_bytes = settings.ws.max_subject_bytes
        self.max_in_flight = req.max_in_flight
        self.timeout_floor_ms = req.breaker_timeout_floor_ms
        self.forward_token = req.forward_token
        self.allowed_headers = {name.lower(): name for name in req.allowed_headers}
        self.patterns = tuple(req.whitelist)
        self.breakers = BreakerBoard(
            req.breaker_failures, req.breaker_reset_s, req.max_breakers, self._on_transition
        )
        available: dict[str, ChainInterceptor] = {
            "acl": RequestAcl(
                req.whitelist, settings.jwt.requests_claim, max_bytes=self.max_subject_bytes
            ),
            "rate_limit": PrincipalRateLimit(
                KeyedRateLimiter(req.rate, req.burst, req.max_principals)
            ),
            "circuit_breaker": SubjectCircuitBreaker(self.breakers),
            "deadline": Deadline(req.default_timeout_ms, req.max_timeout_ms),
            "tracing": Tracing(entropy),
        }
        self.chain = InterceptorChain.from_order(req.interceptors, available)
        self.in_flight: dict[WsConnection, int] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self._breaker_states: dict[str, Counter[BreakerState]] = {}
        for pattern in self.patterns:
            self._breaker_states[pattern] = Counter()
            metrics.CIRCUIT_STATE.labels(pattern).set(BreakerState.CLOSED)

    # -- the read path ------------------------------------------------------------------------
    def handle(self, conn: WsConnection, op: protocol.RequestOp) -> bytes | None:
        start = self.clock()
        try:
            validate_subject(op.subject, self.max_subject_bytes)
        except SubjectError as exc:
            message = f"invalid subject: {exc}"
            return self._refuse(conn, op.id, Code.SUBJECT_DENIED, message, "denied")
        try:
            extra, correlation, causation, traceparent, tracestate = self._client_headers(
                op.headers
            )
        except metadata.MetadataError as exc:
            return self._refuse(conn, op.id, exc.code, exc.message, "malformed")
        pending = self.in_flight.get(conn, 0)
        if pending >= self.max_in_flight:
            message = f"more than {self.max_in_flight} requests in flight"
            return self._refuse(conn, op.id, Code.LIMIT_EXCEEDED, message, "limit")
        if not self.link.connected:
            return self._refuse(conn, op.id, Code.NATS_DOWN, "NATS is unavailable", "unavailable")
        principal = conn.principal
        sub = principal.sub if principal is not None else None
        if sub is not None and not metadata.valid_header_value(sub):
            message = "the token's sub cannot be sent in a header"
            return self._refuse(conn, op.id, Code.SUBJECT_DENIED, message, "denied")
        ctx = ChainContext(
            op.subject,
            principal,
            conn.peer,
            requested_timeout_ms=op.timeout_ms,
            client_traceparent=traceparent,
            client_tracestate=tracestate,
        )
        rejection = self.chain.before(ctx, start)
        if rejection is not None:
            return self._refuse(
                conn,
                op.id,
                rejection.code,
                rejection.message,
                rejection.outcome,
                rejection.retry_after_ms,
            )
        headers = self._headers(conn, ctx, sub, correlation, causation)
        headers.update(extra)
        self.in_flight[conn] = pending + 1
        task = asyncio.get_running_loop().create_task(
            self._run(conn, op.id, ctx, bytes(op.data), headers, start)
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return None

    def _client_headers(
        self, headers: dict[str, str]
    ) -> tuple[dict[str, str], str | None, str | None, str | None, str | None]:
        """Allow-listed extra headers, correlation id, causation id, traceparent, tracestate.

        MetadataError (``XYW008``, naming the key) when one of them cannot be sent.
        """
        extra: dict[str, str] = {}
        correlation = causation = traceparent = tracestate = None
        for key, value in headers.items():
            if key in (metadata.CLIENT_CORRELATION_ID, metadata.CLIENT_CAUSATION_ID):
                if not metadata.valid_id(value):
                    raise metadata.MetadataError(f"headers.{key}: 1..128 visible ASCII characters")
                if key == metadata.CLIENT_CORRELATION_ID:
                    correlation = value
                else:
                    causation = value
                continue
            low = key.lower()
            if low == metadata.TRACEPARENT:
                traceparent = value
            elif low == metadata.TRACESTATE:
                tracestate = value
            elif low in self.allowed_headers:
                if not metadata.valid_header_value(value):
                    raise metadata.MetadataError(f"headers.{key}: not a valid header value")
                extra[self.allowed_headers[low]] = value
        return extra, correlation, causation, traceparent, tracestate

    def _headers(
        self,
        conn: WsConnection,
        ctx: ChainContext,
        sub: str | None,
        correlation: str | None,
        causation: str | None,
    ) -> dict[str, str]:
        now = self.wall()
        message_id = metadata.new_ulid(now, self.entropy(10))
        token = conn.token if self.forward_token else None
        meta = metadata.MessageMetadata(
            message_id=message_id,
            timestamp=metadata.iso_timestamp(now),
            correlation=metadata.Correlation(correlation or message_id, causation),
            authentication=metadata.JwtAuthentication(token) if token else None,
            principal=sub,
            conn=conn.conn_id,
            traceparent=ctx.traceparent,
            tracestate=ctx.tracestate,
        )
        return metadata.to_headers(meta)

    def _refuse(
        self,
        conn: WsConnection,
        op_id: int,
        code: Code,
        message: str,
        outcome: str,
        retry_after_ms: int | None = None,
    ) -> bytes:
        metrics.REQUESTS.labels(outcome).inc()
        metrics.CLIENT_ERRORS.labels(code).inc()
        self.client_log.log(log, message, code=code, conn=conn.conn_id, reason=outcome)
        if retry_after_ms is None:
            return protocol.error(op_id, code, message)
        return protocol.error(op_id, code, message, retry_after_ms)

    # -- the NATS round trip --------------------------------------------------------------------
    async def _run(
        self,
        conn: WsConnection,
        op_id: int,
        ctx: ChainContext,
        payload: bytes,
        headers: dict[str, str],
        start: float,
    ) -> None:
        outcome = Outcome.NEUTRAL
        label = "failed"
        code: Code | None = None
        message = ""
        frame = b""
        try:
            try:
                msg = await self.link.request(ctx.subject, payload, ctx.timeout_ms / 1000, headers)
            except nats.errors.NoRespondersError:
                outcome = Outcome.FAILURE
                label, code, message = "no_responders", Code.NO_RESPONDERS, "no responders"
            except nats.errors.TimeoutError:
                outcome = timeout_outcome(ctx.timeout_ms, self.timeout_floor_ms)
                label, code = "timeout", Code.REQUEST_TIMEOUT
                message = f"no reply within {ctx.timeout_ms} ms"
            except nats.errors.MaxPayloadError:
                label, code = "limit", Code.LIMIT_EXCEEDED
                message = "payload larger than NATS allows"
            except _UNAVAILABLE:
                label, code, message = "unavailable", Code.NATS_DOWN, "NATS is unavailable"
            except nats.errors.Error as exc:
                log.warning(
                    "request failed", extra={"code": Code.INTERNAL, "reason": type(exc).__name__}
                )
                label, code, message = "failed", Code.INTERNAL, "request failed"
            else:
                hdr = dict(msg.headers) if msg.headers else {}
                service_code = hdr.get(SERVICE_ERROR_CODE)
                if service_code is None:
                    label, outcome = "ok", Outcome.SUCCESS
                else:
                    label = "service_error"
                    failed = _service_failed(service_code)
                    outcome = Outcome.FAILURE if failed else Outcome.SUCCESS
                hdr[metadata.TRACEPARENT] = ctx.traceparent
                if ctx.tracestate is not None:
                    hdr[metadata.TRACESTATE] = ctx.tracestate
                else:
                    hdr.pop(metadata.TRACESTATE, None)
                hdr.setdefault(metadata.CORRELATION_ID, headers[metadata.CORRELATION_ID])
                if conn.state == OPEN:  # a reply to a closed client is dropped unencoded
                    frame = protocol.reply(op_id, msg.data, hdr)
        finally:
            left = self.in_flight.pop(conn, 1) - 1
            if left > 0:
                self.in_flight[conn] = left
            self.chain.after(ctx, outcome, self.clock())
        if label in _TIMED:
            metrics.REQUEST_DURATION.observe(self.clock() - start)
        if code is None:
            metrics.REQUESTS.labels(label).inc()
        else:
            frame = self._refuse(conn, op_id, code, f"{message} on {ctx.subject}", label)
        if conn.state == OPEN:
            self._deliver(conn, websocket.text_frame(frame))

    @staticmethod
    def _deliver(conn: WsConnection, frame: bytes) -> None:
        """Write a reply under the client's outbox byte cap, or cut the client (4003).

        Replies can be as large as NATS allows and a client picks how many it
        asks for: one that stops reading must not make the worker hold them.
        What the client has not taken yet (transport buffer + outbox) plus
        this reply must fit in ``outbox.max_bytes``; a reply alone may exceed
        it when nothing else is pending, as a message may.
        """
        pending = conn.transport.get_write_buffer_size() + conn.queue.nbytes
        if pending and pending + len(frame) > conn.queue.max_bytes:
            conn.hub.cut_slow_consumer(conn, "outbox full")
            return
        conn.send_control(frame)

    # -- circuit state gauge --------------------------------------------------------------------
    def _on_transition(self, subject: str, old: BreakerState, new: BreakerState) -> None:
        pattern = next((p for p in self.patterns if matches(p, subject)), None)
        if pattern is None:
            return
        states = self._breaker_states[pattern]
        if old != BreakerState.CLOSED:
            states[old] -= 1
        if new != BreakerState.CLOSED:
            states[new] += 1
        worst = max((s for s, n in states.items() if n > 0), default=BreakerState.CLOSED)
        metrics.CIRCUIT_STATE.labels(pattern).set(worst)
        opened = new == BreakerState.OPEN
        self.client_log.log(  # clients can open circuits (no responders on many subjects)
            log,
            f"circuit {new.name.lower()} for {subject}",
            level=logging.WARNING if opened else logging.INFO,
            code=Code.CIRCUIT_OPEN if opened else None,
            subject=subject,
            fields={"from": old.name.lower(), "to": new.name.lower()},
        )
