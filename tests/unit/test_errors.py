"""One exception root: every exception fanout defines is a FanoutError with its code."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import fanout
from fanout.core.auth import AuthError
from fanout.core.jwks import JwksError
from fanout.core.metadata import MetadataError
from fanout.core.protocol import FrameError
from fanout.core.subjects import SubjectError
from fanout.core.websocket import HandshakeError, ProtocolViolation
from fanout.errors import Close, Code, FanoutError, OperatorError
from fanout.settings import ConfigError
from fanout.worker.history import Unavailable
from fanout.worker.nats_auth import NatsAuthError
from fanout.worker.revocation import DenylistError


def test_auth_error_keeps_its_text() -> None:
    exc = AuthError(Code.TOKEN_INVALID, "bad signature")
    assert isinstance(exc, FanoutError)
    assert (exc.code, exc.message, str(exc)) == (
        Code.TOKEN_INVALID,
        "bad signature",
        "XYW005: bad signature",
    )


def test_frame_error_is_a_fanout_error_with_malformed() -> None:
    exc = FrameError("not JSON", id=7)
    assert isinstance(exc, FanoutError)
    assert (exc.code, exc.message, exc.id, str(exc)) == (Code.MALFORMED, "not JSON", 7, "not JSON")


def test_handshake_error_carries_code_and_http_status() -> None:
    exc = HandshakeError(403, Code.ORIGIN_DENIED, "origin not allowed", [("X", "y")])
    assert isinstance(exc, FanoutError)
    assert (exc.status, exc.code, exc.message, exc.headers) == (
        403,
        Code.ORIGIN_DENIED,
        "origin not allowed",
        (("X", "y"),),
    )
    assert str(exc) == "403 XYW006: origin not allowed"


def test_protocol_violation_carries_close_code_and_its_error_code() -> None:
    exc = ProtocolViolation(Close.POLICY, "rate limit")
    assert isinstance(exc, FanoutError)
    assert (exc.close_code, exc.code, exc.reason, str(exc)) == (
        1008,
        Code.LIMIT_EXCEEDED,
        "rate limit",
        "1008: rate limit",
    )
    assert ProtocolViolation(1010, "extension").code == Code.MALFORMED


def test_subject_and_metadata_errors_are_fanout_and_value_errors() -> None:
    subject = SubjectError("empty subject")
    metadata = MetadataError("Authorization must be 'Bearer <jwt>'")
    assert isinstance(subject, FanoutError) and isinstance(subject, ValueError)
    assert (subject.code, str(subject)) == (Code.SUBJECT_DENIED, "empty subject")
    assert isinstance(metadata, FanoutError) and isinstance(metadata, ValueError)
    assert (metadata.code, metadata.message) == (Code.MALFORMED, str(metadata))


def test_auth_error_answers_a_handshake_with_401() -> None:
    assert AuthError(Code.TOKEN_INVALID, "token revoked").status == 401
    assert AuthError(Code.UNAUTHORIZED, "a token is required").status == 401


def test_operator_errors_keep_their_text_and_name_what_failed() -> None:
    cases = [
        (NatsAuthError("nats.creds: rejected"), Code.NATS_DOWN),
        (JwksError("HTTP status 500"), Code.TOKEN_INVALID),
        (DenylistError("deny.txt:3: not a token id"), Code.INTERNAL),
        (Unavailable("NATS is down"), Code.NATS_DOWN),
    ]
    for exc, code in cases:
        assert isinstance(exc, OperatorError)
        assert (exc.code, str(exc)) == (code, exc.message)


def test_config_error_keeps_its_line_and_field() -> None:
    exc = ConfigError("server.port", "must be <= 65535", "FANOUT_SERVER_PORT")
    assert isinstance(exc, FanoutError)
    assert (exc.code, exc.field, exc.message, exc.source) == (
        Code.INTERNAL,
        "server.port",
        "must be <= 65535",
        "FANOUT_SERVER_PORT",
    )
    assert str(exc) == "invalid config: server.port: must be <= 65535 (from FANOUT_SERVER_PORT)"


#: Exceptions defined in fanout that are not FanoutErrors, each with the reason.
NOT_FANOUT_ERRORS: dict[str, str] = {
    "fanout.service.context.ServiceError": (
        "a backend service's own refusal: its code is the application's (NATS micro, "
        "HTTP-like '404'), never a gateway XYW code"
    ),
}


def _exception_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined in a fanout module (private ones included), by full name."""
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(fanout.__path__, "fanout."):
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == info.name
            ):
                found[f"{info.name}.{obj.__qualname__}"] = obj
    return found


def test_every_exception_defined_in_fanout_is_a_fanout_error() -> None:
    classes = _exception_classes()
    outside = sorted(
        name
        for name, cls in classes.items()
        if not issubclass(cls, FanoutError) and name not in NOT_FANOUT_ERRORS
    )
    assert outside == []
    assert set(NOT_FANOUT_ERRORS) <= classes.keys()  # an exception to the rule that is gone
