"""The one table of error codes, HTTP statuses and WebSocket close codes.

Dashboards, the browser client and the load tools depend on these exact
values (see the protocol contract); every other module refers to them by name.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import ClassVar


class Code(StrEnum):
    """Stable error codes (``XYW…``) carried in HTTP bodies, frames and logs."""

    UNAUTHORIZED = "XYW001"
    SUBJECT_DENIED = "XYW002"
    BACKPRESSURE = "XYW003"
    NATS_DOWN = "XYW004"
    TOKEN_INVALID = "XYW005"
    ORIGIN_DENIED = "XYW006"
    LIMIT_EXCEEDED = "XYW007"
    MALFORMED = "XYW008"
    INTERNAL = "XYW009"
    RATE_LIMITED = "XYW010"
    CIRCUIT_OPEN = "XYW011"
    REQUEST_TIMEOUT = "XYW012"
    NO_RESPONDERS = "XYW013"


class Close(IntEnum):
    """WebSocket close codes used by the gateway."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    INVALID_DATA = 1007
    POLICY = 1008
    TOO_BIG = 1009
    INTERNAL = 1011
    RESTARTING = 1012
    TRY_AGAIN_LATER = 1013
    UNAUTHORIZED = 4001
    SLOW_CONSUMER = 4003
    NATS_UNAVAILABLE = 4004
    TOKEN_EXPIRED = 4005


#: HTTP status for each code when it is the answer to a handshake.
HTTP_STATUS: dict[Code, int] = {
    Code.UNAUTHORIZED: 401,
    Code.TOKEN_INVALID: 401,
    Code.ORIGIN_DENIED: 403,
    Code.LIMIT_EXCEEDED: 503,
    Code.NATS_DOWN: 503,
    Code.MALFORMED: 426,
    Code.INTERNAL: 500,
}

#: The code a log line and metric carry when a connection is closed with a close code.
CLOSE_REASON_CODE: dict[Close, Code] = {
    Close.PROTOCOL_ERROR: Code.MALFORMED,
    Close.UNSUPPORTED_DATA: Code.MALFORMED,
    Close.INVALID_DATA: Code.MALFORMED,
    Close.POLICY: Code.LIMIT_EXCEEDED,
    Close.TOO_BIG: Code.MALFORMED,
    Close.TRY_AGAIN_LATER: Code.LIMIT_EXCEEDED,
    Close.UNAUTHORIZED: Code.UNAUTHORIZED,
    Close.SLOW_CONSUMER: Code.BACKPRESSURE,
    Close.NATS_UNAVAILABLE: Code.NATS_DOWN,
    Close.TOKEN_EXPIRED: Code.TOKEN_INVALID,
    Close.INTERNAL: Code.INTERNAL,
}


class FanoutError(Exception):
    """The root of every error fanout raises: a stable ``code`` and a ``message``.

    For an error that answers a client the message is client-safe, and the
    subclass adds how the answer travels (``status`` for an HTTP refusal,
    ``close_code`` for a WebSocket close); an :class:`OperatorError` is read by
    the operator only. ``text`` overrides ``str(exc)`` so each keeps the log
    text it always had. The one exception to the rule is
    ``fanout.service.ServiceError``: a backend service's codes are its own.
    """

    def __init__(self, code: Code, message: str, text: str | None = None) -> None:
        super().__init__(f"{code}: {message}" if text is None else text)
        self.code = code
        self.message = message


class OperatorError(FanoutError):
    """An error for the operator (a setting, a file, a port, credentials), never a client.

    ``str(exc)`` is the one line shown at exit or logged: the message as given
    unless ``text`` says more. ``CODE`` is the code it carries (what failed:
    XYW009 the gateway itself, XYW004 NATS, XYW005 the token keys).
    """

    CODE: ClassVar[Code] = Code.INTERNAL

    def __init__(self, message: str, text: str | None = None) -> None:
        super().__init__(self.CODE, message, message if text is None else text)


def close_reason_code(close_code: int) -> Code:
    """The error code of a close code; ``MALFORMED`` for the RFC 6455 ones not in the table."""
    try:
        return CLOSE_REASON_CODE[Close(close_code)]
    except (ValueError, KeyError):
        return Code.MALFORMED
