"""Optional OpenTelemetry for ``fanout.service`` (the ``otel`` extra).

With ``opentelemetry-api`` installed and tracing on, every request gets one
SERVER span whose parent is the caller's ``traceparent`` (a remote parent, so
the trace continues across NATS), and the client helper gets one CLIENT span
whose context it sends. Interceptors add attributes to that one span rather
than spans of their own. Without OpenTelemetry nothing is recorded, and the
W3C headers still travel: the service passes the caller's ``traceparent`` on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

from fanout.service.context import NO_SPAN, ServiceError, SpanLike

try:
    from opentelemetry import context as otel_context  # type: ignore[import-not-found, unused-ignore]
    from opentelemetry import trace  # type: ignore[import-not-found, unused-ignore]
    from opentelemetry.trace.propagation.tracecontext import (  # type: ignore[import-not-found, unused-ignore]
        TraceContextTextMapPropagator,
    )
except ImportError:  # the otel extra is not installed: propagation only
    HAVE_OTEL = False
else:
    HAVE_OTEL = True
    _PROPAGATOR = TraceContextTextMapPropagator()

TRACER_NAME = "fanout.service"


class Telemetry:
    """Spans for one service or client; a no-op without OpenTelemetry or with ``enabled=False``.

    ``tracer_provider`` defaults to the global one (``trace.set_tracer_provider``).
    """

    def __init__(self, tracer_provider: Any = None, *, enabled: bool = True) -> None:
        self.tracer: Any = None
        if enabled and HAVE_OTEL:
            self.tracer = trace.get_tracer(TRACER_NAME, tracer_provider=tracer_provider)

    @property
    def active(self) -> bool:
        return self.tracer is not None

    @contextmanager
    def span(
        self,
        name: str,
        kind: Literal["server", "client"],
        headers: Mapping[str, str] | None,
        attributes: Mapping[str, str | bool | int | float],
    ) -> Iterator[tuple[SpanLike, object | None]]:
        """A current span and its context; a server span continues the caller's trace."""
        if self.tracer is None:
            yield NO_SPAN, None
            return
        parent = None
        if kind == "server" and headers:
            parent = _PROPAGATOR.extract(carrier={k.lower(): v for k, v in headers.items()})
        span_kind = trace.SpanKind.SERVER if kind == "server" else trace.SpanKind.CLIENT
        with self.tracer.start_as_current_span(
            name,
            context=parent,
            kind=span_kind,
            attributes=dict(attributes),
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            yield span, otel_context.get_current()

    def inject(self, carrier: dict[str, str]) -> bool:
        """Write the current span's ``traceparent`` (and ``tracestate``); False when inactive."""
        if self.tracer is None:
            return False
        _PROPAGATOR.inject(carrier)
        return "traceparent" in carrier

    @staticmethod
    def failed(span: SpanLike, error: ServiceError) -> None:
        """Mark the span: ``error.type`` always, ERROR status only for the service's own faults."""
        span.set_attribute("error.type", error.code)
        if HAVE_OTEL and error.server_fault and span.is_recording():
            span.set_status(trace.Status(trace.StatusCode.ERROR, error.message))  # type: ignore[attr-defined]
