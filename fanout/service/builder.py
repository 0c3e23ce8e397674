"""The ``Service`` builder: a NATS micro service whose endpoints run an interceptor chain.

Built on nats-py's ``nats.micro`` (the NATS Services API), so every
``fanout.service`` answers ``$SRV.PING``/``$SRV.INFO``/``$SRV.STATS`` and the
usual NATS tooling lists and monitors it; its request and error counts are
micro's own. For each request the builder decodes the metadata strictly,
opens the request's span, runs the interceptors in the order they were
added, then the handler, and replies: the handler's value as JSON (``bytes``
as is), with reply metadata (a new message id, the same correlation id, the
request's message id as causation id, the span's ``traceparent``). A
:class:`ServiceError` from anywhere becomes a micro error reply; any other
exception is logged here and answered ``500 internal error`` — the caller
never sees a stack trace.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Self

import msgspec
from nats import micro
from nats.aio.client import Client
from nats.micro.request import Request as MicroRequest
from nats.micro.request import ServiceError as MicroServiceError
from nats.micro.service import Service as MicroService

from fanout.core import metadata as md
from fanout.service.context import (
    BAD_REQUEST,
    INTERNAL,
    Handler,
    Interceptor,
    Next,
    Reply,
    Request,
    RequestContext,
    ServiceError,
)
from fanout.service.limits import CircuitBreaker, RateLimit
from fanout.service.telemetry import Telemetry

log = logging.getLogger("fanout.service")

_NAME_RE = re.compile(r"[^A-Za-z0-9_-]+")
_encode = msgspec.json.encode


@dataclass(frozen=True, slots=True)
class _Endpoint:
    subject: str
    name: str
    handler: Handler
    queue_group: str | None
    metadata: Mapping[str, str] | None


def _compose(interceptors: list[Interceptor], handler: Handler) -> Next:
    """``interceptors[0]`` runs first; each decides whether and how to call the next."""
    call: Next = handler
    for interceptor in reversed(interceptors):
        call = _bind(interceptor, call)
    return call


def _bind(interceptor: Interceptor, call_next: Next) -> Next:
    async def step(req: Request) -> Any:
        return await interceptor(req, call_next)

    return step


def _encode_result(result: Any) -> tuple[bytes, Mapping[str, str] | None]:
    headers = None
    if isinstance(result, Reply):
        result, headers = result.data, result.headers
    if isinstance(result, bytes | bytearray | memoryview):
        return bytes(result), headers
    try:
        return _encode(result), headers
    except (TypeError, msgspec.EncodeError) as exc:
        raise TypeError(f"handler returned a value that is not JSON-able: {exc}") from None


class Service:
    """A NATS micro service with interceptors, built fluently; see ``docs/requests.md``."""

    def __init__(
        self,
        nc: Client,
        *,
        name: str,
        version: str = "0.1.0",
        description: str | None = None,
        metadata: Mapping[str, str] | None = None,
        queue_group: str | None = None,
        tracer_provider: Any = None,
        tracing: bool = True,
    ) -> None:
        self.nc = nc
        self.name = name
        self.version = version
        self.description = description
        self.metadata = dict(metadata or {})
        self.queue_group = queue_group
        self.telemetry = Telemetry(tracer_provider, enabled=tracing)
        self.interceptors: list[Interceptor] = []
        self.endpoints: list[_Endpoint] = []
        self._micro: MicroService | None = None

    # -- building ---------------------------------------------------------------------------
    def with_interceptor(self, interceptor: Interceptor) -> Self:
        """Add an interceptor; interceptors run in the order they were added."""
        self._not_started()
        self.interceptors.append(interceptor)
        return self

    def with_auth(self, auth: Interceptor) -> Self:
        """Message-level authentication, e.g. :class:`~fanout.service.JwtAuth`."""
        return self.with_interceptor(auth)

    def with_rate_limit(
        self,
        *,
        rate: float,
        burst: float,
        per: Literal["principal", "service"] = "principal",
        max_keys: int = 10_000,
    ) -> Self:
        """A token bucket per principal (see :class:`RateLimit` for the fallbacks) or one in all."""
        return self.with_interceptor(RateLimit(rate=rate, burst=burst, per=per, max_keys=max_keys))

    def with_circuit_breaker(
        self,
        *,
        failures: int = 5,
        reset_after: float = 10.0,
        timeout: float | None = None,
    ) -> Self:
        """A breaker per endpoint around everything added after it (and the handler)."""
        return self.with_interceptor(
            CircuitBreaker(failures=failures, reset_after=reset_after, timeout=timeout)
        )

    def handler(
        self,
        subject: str,
        *,
        name: str | None = None,
        queue_group: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Callable[[Handler], Handler]:
        """Register ``async def handler(req) -> value`` for ``subject`` (before :meth:`start`)."""
        self._not_started()

        def register(fn: Handler) -> Handler:
            endpoint_name = name or _NAME_RE.sub("-", subject).strip("-") or "endpoint"
            self.endpoints.append(_Endpoint(subject, endpoint_name, fn, queue_group, metadata))
            return fn

        return register

    def _not_started(self) -> None:
        if self._micro is not None:
            raise RuntimeError("configure the service before start()")

    # -- running ----------------------------------------------------------------------------
    @property
    def micro(self) -> MicroService:
        """The underlying ``nats.micro`` service (``id``, ``stats()``, ``info()``)."""
        if self._micro is None:
            raise RuntimeError("the service is not started")
        return self._micro

    async def start(self) -> None:
        """Start interceptors that need it (JWKS fetch), then the micro service and endpoints."""
        if self._micro is not None:
            return
        for interceptor in self.interceptors:
            start = getattr(interceptor, "start", None)
            if start is not None:
                await start()
        service = await micro.add_service(
            self.nc,
            name=self.name,
            version=self.version,
            description=self.description,
            metadata=self.metadata,
            queue_group=self.queue_group,
        )
        for ep in self.endpoints:
            await service.add_endpoint(
                name=ep.name,
                subject=ep.subject,
                handler=self._micro_handler(ep),
                queue_group=ep.queue_group,
                metadata=dict(ep.metadata) if ep.metadata else None,
            )
        await self.nc.flush()
        self._micro = service

    async def stop(self) -> None:
        service, self._micro = self._micro, None
        if service is not None:
            await service.stop()
        for interceptor in self.interceptors:
            close = getattr(interceptor, "close", None)
            if close is not None:
                await close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- one request ------------------------------------------------------------------------
    def _micro_handler(self, ep: _Endpoint) -> Callable[[MicroRequest], Any]:
        chain = _compose(list(self.interceptors), ep.handler)
        telemetry = self.telemetry
        span_name = f"process {ep.subject}"

        async def handle(micro_req: MicroRequest) -> None:
            headers: Mapping[str, str] = micro_req.headers or {}
            meta: md.MessageMetadata | None = None
            invalid: ServiceError | None = None
            try:
                meta = md.from_headers(headers)
            except md.MetadataError as exc:
                invalid = ServiceError(BAD_REQUEST, str(exc))
            attributes = _span_attributes(self.name, ep, micro_req.subject, meta)
            with telemetry.span(span_name, "server", headers, attributes) as (span, otel_ctx):
                try:
                    if invalid is not None:
                        raise invalid
                    correlation = meta.correlation if meta is not None else None
                    context = RequestContext(
                        correlation_id=correlation.correlation_id if correlation else None,
                        causation_id=correlation.causation_id if correlation else None,
                        otel_context=otel_ctx,
                    )
                    req = Request(
                        micro_req.subject, ep.subject, micro_req.data, headers, meta, context, span
                    )
                    data, extra = _encode_result(await chain(req))
                    await micro_req.respond(data, headers=self._reply_headers(meta, headers, extra))
                except ServiceError as exc:
                    telemetry.failed(span, exc)
                    raise MicroServiceError(exc.code, exc.message) from None
                except Exception:
                    log.exception(
                        "handler failed", extra={"subject": micro_req.subject, "code": INTERNAL}
                    )
                    error = ServiceError(INTERNAL, "internal error")
                    telemetry.failed(span, error)
                    raise MicroServiceError(error.code, error.message) from None

        return handle

    def _reply_headers(
        self,
        meta: md.MessageMetadata | None,
        headers: Mapping[str, str],
        extra: Mapping[str, str] | None,
    ) -> dict[str, str]:
        now = time.time()
        out = {md.MSG_ID: md.new_ulid(now), md.TIMESTAMP: md.iso_timestamp(now)}
        if meta is not None:
            correlation = meta.correlation.correlation_id if meta.correlation else meta.message_id
            out[md.CORRELATION_ID] = correlation
            out[md.CAUSATION_ID] = meta.message_id
        if not self.telemetry.inject(out):
            traceparent = md.header(headers, md.TRACEPARENT)
            if traceparent is not None and md.parse_traceparent(traceparent) is not None:
                out[md.TRACEPARENT] = traceparent
        if extra:
            out.update(extra)
        return out


def _span_attributes(
    service: str, ep: _Endpoint, subject: str, meta: md.MessageMetadata | None
) -> dict[str, str | bool | int | float]:
    attributes: dict[str, str | bool | int | float] = {
        "messaging.system": "nats",
        "messaging.operation.name": "process",
        "messaging.destination.name": subject,
        "messaging.nats.subject": subject,
        "nats.service.name": service,
        "nats.service.endpoint": ep.name,
    }
    if meta is not None:
        attributes["messaging.message.id"] = meta.message_id
        if meta.correlation is not None:
            attributes["messaging.message.conversation_id"] = meta.correlation.correlation_id
            attributes["messaging.correlation_id"] = meta.correlation.correlation_id
            if meta.correlation.causation_id is not None:
                attributes["messaging.causation_id"] = meta.correlation.causation_id
        if meta.conn is not None:
            attributes["fanout.conn"] = meta.conn
    return attributes
