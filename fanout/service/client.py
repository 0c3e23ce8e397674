"""Calling a ``fanout.service`` from Python, with the same metadata the gateway sends.

The client side of docs/requests.md (Metadata headers): every request carries a
ULID message id, an ISO timestamp, a correlation id (given or new), an
optional causation id and, when ``token`` is given, ``Authorization: Bearer``
for the service's :class:`~fanout.service.JwtAuth`. With OpenTelemetry a
CLIENT span wraps the request and its context is what the service continues;
without it a new W3C ``traceparent`` is sent. A NATS micro error reply
raises :class:`~fanout.service.ServiceError` with the service's code.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from nats.aio.client import Client

from fanout.core import metadata as md
from fanout.core.subjects import validate_subject
from fanout.service.context import ServiceError
from fanout.service.telemetry import Telemetry

_default_telemetry = Telemetry()


@dataclass(frozen=True, slots=True)
class Response:
    """A successful reply."""

    raw: bytes
    headers: Mapping[str, str]

    @property
    def data(self) -> Any:
        """The reply as JSON (``None`` when empty)."""
        return msgspec.json.decode(self.raw) if self.raw else None

    @property
    def metadata(self) -> md.MessageMetadata | None:
        return md.from_headers(self.headers)


async def request(
    nc: Client,
    subject: str,
    data: Any = None,
    *,
    raw: bytes | None = None,
    timeout: float = 5.0,
    token: str | None = None,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    headers: Mapping[str, str] | None = None,
    telemetry: Telemetry | None = None,
) -> Response:
    """Send ``data`` as JSON (or ``raw`` bytes as is) and wait for the reply.

    Raises ServiceError for a micro error reply, ``nats.errors.TimeoutError``
    and ``NoRespondersError`` as nats-py does, ValueError for a bad subject or
    metadata value (subjects are checked token by token: nats-py only refuses
    whitespace).
    """
    validate_subject(subject)
    for value in (correlation_id, causation_id):
        if value is not None and not md.valid_id(value):
            raise ValueError(f"invalid correlation or causation id {value!r}")
    if token is not None and not md.valid_header_value(token):
        raise ValueError("token is not a valid header value")
    payload = raw if raw is not None else msgspec.json.encode(data)
    now = time.time()
    message_id = md.new_ulid(now)
    meta = md.MessageMetadata(
        message_id=message_id,
        timestamp=md.iso_timestamp(now),
        correlation=md.Correlation(correlation_id or message_id, causation_id),
        authentication=md.JwtAuthentication(token) if token is not None else None,
    )
    out = {k: v for k, v in (headers or {}).items() if not md.is_reserved(k)}
    out.update(md.to_headers(meta))
    tel = telemetry or _default_telemetry
    attributes = {
        "messaging.system": "nats",
        "messaging.operation.name": "send",
        "messaging.destination.name": subject,
        "messaging.nats.subject": subject,
        "messaging.message.id": message_id,
        "messaging.message.conversation_id": correlation_id or message_id,
    }
    with tel.span(f"send {subject}", "client", None, attributes) as (span, _):
        if not tel.inject(out):
            out[md.TRACEPARENT] = str(md.new_traceparent())
        msg = await nc.request(subject, payload, timeout=timeout, headers=out)
        reply_headers = msg.headers or {}
        code = reply_headers.get("Nats-Service-Error-Code")
        if code is not None:
            error = ServiceError(code, reply_headers.get("Nats-Service-Error", ""))
            tel.failed(span, error)
            raise error
    return Response(msg.data, reply_headers)
