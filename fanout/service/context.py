"""What a ``fanout.service`` handler and its interceptors see: the request, its context, errors.

A :class:`Request` carries the payload (``data`` decodes JSON on first use),
the NATS headers, the strictly decoded :class:`~fanout.core.metadata.MessageMetadata`,
a :class:`RequestContext` that interceptors enrich (the verified principal,
correlation ids, the OpenTelemetry context) and the request's span. An
interceptor or handler stops a request by raising :class:`ServiceError`: it
becomes a NATS micro error reply (``Nats-Service-Error-Code`` /
``Nats-Service-Error`` headers), never a stack trace.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import msgspec

from fanout.core.auth import Principal
from fanout.core.metadata import MessageMetadata

T = TypeVar("T")

#: Error codes of the built-in interceptors (HTTP-like, as NATS micro services use them).
BAD_REQUEST = "400"
UNAUTHORIZED = "401"
FORBIDDEN = "403"
RATE_LIMITED = "429"
INTERNAL = "500"
UNAVAILABLE = "503"
HANDLER_TIMEOUT = "504"


class ServiceError(Exception):
    """A typed refusal: ``code`` and ``message`` go back to the caller, nothing else does."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def server_fault(self) -> bool:
        """True unless the code is a 4xx (the caller's fault): what a circuit breaker counts."""
        code = self.code
        return not (len(code) == 3 and code.isdigit() and code[0] == "4")


AttributeValue = str | bool | int | float


class SpanLike(Protocol):
    """The part of an OpenTelemetry span that interceptors use."""

    def set_attribute(self, key: str, value: AttributeValue) -> Any: ...

    def add_event(
        self, name: str, attributes: Mapping[str, AttributeValue] | None = None
    ) -> Any: ...

    def is_recording(self) -> bool: ...


class NoSpan:
    """The span when OpenTelemetry is not installed (or tracing is off): records nothing."""

    __slots__ = ()

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        return None

    def add_event(self, name: str, attributes: Mapping[str, AttributeValue] | None = None) -> None:
        return None

    def is_recording(self) -> bool:
        return False


NO_SPAN = NoSpan()


@dataclass(slots=True)
class RequestContext:
    """Per-request state that interceptors fill in for the ones after them and the handler."""

    principal: Principal | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    #: The OpenTelemetry ``Context`` of the request's span (``None`` without OpenTelemetry).
    otel_context: object | None = None
    #: Free-form values an interceptor hands on (e.g. a tenant looked up from the principal).
    values: dict[str, object] = field(default_factory=dict)


class Request:
    """One request to an endpoint."""

    __slots__ = ("_data", "context", "endpoint", "headers", "metadata", "raw", "span", "subject")

    def __init__(
        self,
        subject: str,
        endpoint: str,
        raw: bytes,
        headers: Mapping[str, str],
        metadata: MessageMetadata | None,
        context: RequestContext,
        span: SpanLike = NO_SPAN,
    ) -> None:
        self.subject = subject
        #: The endpoint's subject (a pattern when the endpoint uses wildcards).
        self.endpoint = endpoint
        self.raw = raw
        self.headers = headers
        self.metadata = metadata
        self.context = context
        self.span = span
        self._data: object = _UNDECODED

    @property
    def data(self) -> Any:
        """The payload as JSON (``None`` when empty); a 400 ServiceError when it is not JSON."""
        if self._data is _UNDECODED:
            if not self.raw:
                self._data = None
            else:
                try:
                    self._data = msgspec.json.decode(self.raw)
                except msgspec.DecodeError:
                    raise ServiceError(BAD_REQUEST, "request body is not valid JSON") from None
        return self._data

    def decode(self, type_: type[T]) -> T:
        """The payload decoded and validated as ``type_`` (a msgspec Struct, say); 400 if not."""
        try:
            return msgspec.json.decode(self.raw, type=type_)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ServiceError(BAD_REQUEST, f"invalid request body: {exc}") from None


_UNDECODED = object()


@dataclass(frozen=True, slots=True)
class Reply:
    """A handler's answer with headers of its own; ``data`` is bytes (sent as is) or JSON-able."""

    data: Any
    headers: Mapping[str, str] | None = None


Next = Callable[[Request], Awaitable[Any]]
#: ``async def interceptor(req, call_next)``: enrich ``req.context``, raise ServiceError, or
#: return ``await call_next(req)`` (possibly after looking at the result).
Interceptor = Callable[[Request, Next], Awaitable[Any]]
Handler = Callable[[Request], Awaitable[Any]]
