"""``fanout.service``: NATS request handlers that answer the gateway's ``request`` op (and anyone).

A standard NATS micro service (``nats.micro``: ``$SRV.PING/INFO/STATS``) whose
endpoints run an interceptor chain: message-level JWT (:class:`JwtAuth`),
per-principal rate limits, circuit breakers, your own interceptors, and one
OpenTelemetry span per request when the ``otel`` extra is installed::

    svc = (Service(nc, name="orders")
           .with_auth(JwtAuth(jwks_url=..., audience=...))
           .with_rate_limit(per="principal", rate=50, burst=100)
           .with_circuit_breaker(failures=5, reset_after=10.0)
           .with_interceptor(my_interceptor))

    @svc.handler("svc.orders.get")
    async def get_order(req: Request) -> dict: ...

    await svc.start()
"""

from fanout.core.metadata import MessageMetadata
from fanout.service.auth import JwtAuth
from fanout.service.builder import Service
from fanout.service.client import Response, request
from fanout.service.context import (
    BAD_REQUEST,
    FORBIDDEN,
    HANDLER_TIMEOUT,
    INTERNAL,
    RATE_LIMITED,
    UNAUTHORIZED,
    UNAVAILABLE,
    Handler,
    Interceptor,
    Next,
    Reply,
    Request,
    RequestContext,
    ServiceError,
)
from fanout.service.limits import CircuitBreaker, RateLimit, rate_identity
from fanout.service.telemetry import HAVE_OTEL, Telemetry

__all__ = [
    "BAD_REQUEST",
    "FORBIDDEN",
    "HANDLER_TIMEOUT",
    "HAVE_OTEL",
    "INTERNAL",
    "RATE_LIMITED",
    "UNAUTHORIZED",
    "UNAVAILABLE",
    "CircuitBreaker",
    "Handler",
    "Interceptor",
    "JwtAuth",
    "MessageMetadata",
    "Next",
    "RateLimit",
    "Reply",
    "Request",
    "RequestContext",
    "Response",
    "Service",
    "ServiceError",
    "Telemetry",
    "rate_identity",
    "request",
]
