"""One exception root: every error that answers a client is a FanoutError with its code."""

from __future__ import annotations

from fanout.core.auth import AuthError
from fanout.core.metadata import MetadataError
from fanout.core.protocol import FrameError
from fanout.core.subjects import SubjectError
from fanout.core.websocket import HandshakeError, ProtocolViolation
from fanout.errors import Close, Code, FanoutError


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
