"""Structured logs: one JSON object per line, secrets never printed."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from fanout import logs

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
SEED = "SUAMLK2ZNL35WSMW37E7UD4VZ7ELPKW7DHC3BWBSD2GCZ7IUQQXZIORRBU"


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Iterator[logging.Logger]:
    monkeypatch.setattr(logs, "_worker_id", None)  # restored after the test
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    logs.setup("debug", worker=3)
    stream = io.StringIO()
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    logger = logging.getLogger("fanout.test")
    logger.stream = stream  # type: ignore[attr-defined]
    yield logger
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def lines(logger: logging.Logger) -> list[dict[str, object]]:
    return [json.loads(line) for line in logger.stream.getvalue().splitlines()]  # type: ignore[attr-defined]


def test_one_json_object_per_line_with_fields(captured: logging.Logger) -> None:
    captured.warning("handshake refused", extra={"code": "XYW005", "conn": "a-1", "status": 401})
    (line,) = lines(captured)
    assert line["level"] == "warning" and line["msg"] == "handshake refused"
    assert (line["code"], line["conn"], line["status"], line["worker"]) == ("XYW005", "a-1", 401, 3)
    assert str(line["time"]).endswith("Z")


def test_tokens_and_seeds_are_redacted_everywhere(captured: logging.Logger) -> None:
    captured.error(
        f"bad header Authorization: Bearer {JWT}",
        extra={"reason": f"seed {SEED}", "fields": {"header": f"bearer, {JWT}"}},
    )
    text = captured.stream.getvalue()  # type: ignore[attr-defined]
    assert JWT not in text and "eyJzdWIi" not in text and SEED not in text
    (line,) = lines(captured)
    assert "<token>" in str(line["msg"]) and "<seed>" in str(line["reason"])


def test_aiohttp_style_truncated_token_is_redacted() -> None:
    assert "eyJ" not in logs.redact("Got more than 8190 bytes when reading: eyJhbGciOiJSUzI1Ni")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_client_event_lines_are_cut_rate_limited_and_summarised(captured: logging.Logger) -> None:
    """A client decides how often these lines happen and what they quote: both are bounded."""
    clock = Clock()
    events = logs.ClientEventLog(rate=2, burst=3, clock=clock)
    for i in range(1000):
        events.log(captured, "k" * (1 << 20), code="XYW008", conn=f"c-{i}")
    events.flush(captured)
    events.flush(captured)  # nothing more suppressed: no second summary
    out = lines(captured)
    assert len(out) == 4
    for line in out[:3]:
        assert line["msg"] == "k" * 200 + "…(cut)" and line["code"] == "XYW008"
    assert (out[3]["msg"], out[3]["suppressed"], out[3]["level"]) == (
        "client error lines suppressed",
        997,
        "warning",
    )
    assert len(captured.stream.getvalue()) < 2000  # type: ignore[attr-defined]
    clock.now += 1.0  # the bucket refills at ``rate``
    events.log(captured, "again", conn="c-x")
    events.log(captured, "again", conn="c-y")
    events.log(captured, "again", conn="c-z")
    events.flush(captured)
    assert [line["msg"] for line in lines(captured)[4:]] == [
        "again",
        "again",
        "client error lines suppressed",
    ]
