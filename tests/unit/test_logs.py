"""Structured logs: one JSON object per line, secrets never printed."""

from __future__ import annotations

import io
import json
import logging
import time
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


def record(
    message: str,
    level: int = logging.WARNING,
    name: str = "fanout.nats",
    **extra: object,
) -> logging.LogRecord:
    return logging.makeLogRecord(
        {"name": name, "levelno": level, "levelname": logging.getLevelName(level), "msg": message}
        | extra
    )


def test_text_format_is_one_readable_line_with_fields_quoted_and_redacted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(logs, "_worker_id", 2)
    line = logs.TextFormatter().format(
        record(
            "NATS connect failed",
            code="XYW004",
            reason="[Errno 111] Connection refused",
            fields={"header": f"Bearer {JWT}", "seed": SEED, "n": 3, "ok": True},
        )
    )
    assert "\n" not in line and JWT not in line and "eyJzdWIi" not in line and SEED not in line
    stamp, level, name, rest = line.split(" ", 3)
    assert stamp.endswith("Z") and "T" in stamp
    assert (level, name) == ("WARNING", "fanout.nats")
    assert rest == (
        'NATS connect failed worker=2 code=XYW004 reason="[Errno 111] Connection refused"'
        ' header="Bearer <token>" seed=<seed> n=3 ok=true'
    )


def test_format_auto_is_text_on_a_terminal_else_json() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert logs.resolve_format("auto", Tty()) == "text"
    assert logs.resolve_format("auto", io.StringIO()) == "json"
    assert logs.resolve_format("json", Tty()) == "json"
    assert logs.resolve_format("text", io.StringIO()) == "text"


def messages(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records]


def test_repeated_warnings_are_summarised_once_per_window() -> None:
    clock = Clock()
    summary = logs.RepeatSummary(window_s=60, max_keys=8, clock=clock)
    out: list[logging.LogRecord] = []
    for i in range(240):  # twice a second for two minutes
        clock.now = 100.0 + i * 0.5
        out += summary.admit(record("NATS connect failed", code="XYW004", reason=f"try {i}"))
    clock.now = 220.0
    out += summary.admit(record("NATS connected", logging.INFO))
    assert messages(out) == [
        "NATS connect failed",
        "NATS connect failed … repeated 119 times in 60 s",
        "NATS connect failed",  # the first of the second window goes out again
        "NATS connect failed … repeated 119 times in 60 s",
        "NATS connected",
    ]
    first_summary = out[1]
    assert (first_summary.levelno, first_summary.name, first_summary.__dict__["code"]) == (
        logging.WARNING,
        "fanout.nats",
        "XYW004",
    )
    assert first_summary.__dict__["fields"] == {"repeated": 119, "seconds": 60}


def test_a_differing_line_flushes_the_count_but_alternating_repeats_stay_counted() -> None:
    clock = Clock()
    summary = logs.RepeatSummary(window_s=60, max_keys=8, clock=clock)
    out: list[logging.LogRecord] = []
    for i in range(10):
        clock.now = 100.0 + i
        out += summary.admit(record("A"))
        out += summary.admit(record("B", code="XYW004"))
        out += summary.admit(record("B", code="XYW009"))  # another code: another key
        out += summary.admit(record(f"debug {i}", logging.DEBUG))  # debug never flushes
    assert messages(out) == ["A", "B", "B"] + [f"debug {i}" for i in range(10)]
    clock.now = 120.0
    out = summary.admit(record("worker stopping", logging.INFO, name="fanout.worker"))
    assert messages(out) == [
        "A … repeated 9 times in 20 s",
        "B … repeated 9 times in 20 s",
        "B … repeated 9 times in 20 s",
        "worker stopping",
    ]
    clock.now = 121.0
    assert messages(summary.admit(record("A"))) == []  # its window is still open
    assert messages(summary.flush()) == ["A … repeated 1 times in 1 s"]
    assert messages(summary.admit(record("A"))) == ["A"]


def test_lines_about_different_processes_are_different_events() -> None:
    clock = Clock()
    summary = logs.RepeatSummary(window_s=60, max_keys=8, clock=clock)
    out: list[logging.LogRecord] = []
    for pid in (101, 102, 101):
        out += summary.admit(record("worker exited", name="fanout.supervisor", pid=pid))
    out += summary.admit(record("worker started", logging.INFO, name="fanout.supervisor"))
    assert [(r.getMessage(), r.__dict__.get("pid")) for r in out] == [
        ("worker exited", 101),
        ("worker exited", 102),
        ("worker exited … repeated 1 times in 0 s", 101),
        ("worker started", None),
    ]


def test_summarising_memory_is_bounded_by_max_keys() -> None:
    clock = Clock()
    summary = logs.RepeatSummary(window_s=60, max_keys=4, clock=clock)
    written = 0
    for i in range(10_000):
        written += len(summary.admit(record(f"distinct {i}")))
        assert len(summary._tracked) <= 4
    assert written == 10_000  # nothing repeated: every line goes out, nothing invented
    for _ in range(100):
        assert summary.admit(record("distinct 9999")) == []
    out = summary.admit(record("fresh"))
    assert messages(out) == ["distinct 9999 … repeated 100 times in 0 s", "fresh"]


def test_a_full_table_summarises_the_oldest_before_forgetting_it() -> None:
    clock = Clock()
    summary = logs.RepeatSummary(window_s=60, max_keys=2, flush_level=logging.CRITICAL, clock=clock)
    for _ in range(6):
        summary.admit(record("old"))
    summary.admit(record("new"))
    assert messages(summary.admit(record("newer"))) == ["old … repeated 5 times in 0 s", "newer"]
    assert messages(summary.admit(record("old"))) == ["old"]  # forgotten: it starts again


def test_handler_summarises_client_event_summaries_never(captured: logging.Logger) -> None:
    """ClientEventLog's own count lines are summaries already: each goes out."""
    clock = Clock()
    events = logs.ClientEventLog(rate=1, burst=1, clock=clock)
    for _ in range(3):
        events.log(captured, "refused")
        events.log(captured, "refused")
        events.flush(captured)
        clock.now += 1.0
    assert [(line["msg"], line.get("suppressed")) for line in lines(captured)] == [
        ("refused", None),
        ("client error lines suppressed", 1),
    ] * 3


def test_connection_event_is_a_debug_line_with_who_where_how_long_why(
    captured: logging.Logger,
) -> None:
    from fanout.core.auth import Principal

    class Conn:
        conn_id = "3-17"
        peer = "127.0.0.1"
        principal: Principal | None = Principal("alice", {}, None, None)
        opened_at = time.monotonic() - 2.0

    logs.connection_event(captured, "connection closed", Conn(), 4001, "token expired")
    Conn.principal = None
    logs.connection_event(captured, "connection opened", Conn())
    closed, opened = lines(captured)
    assert (closed["level"], closed["msg"], closed["conn"], closed["peer"]) == (
        "debug",
        "connection closed",
        "3-17",
        "127.0.0.1",
    )
    assert (closed["principal"], closed["close_code"], closed["reason"]) == (
        "alice",
        4001,
        "token expired",
    )
    assert isinstance(closed["duration_s"], float) and closed["duration_s"] >= 2.0
    assert opened["principal"] == "anonymous" and "close_code" not in opened
    captured.setLevel(logging.INFO)
    logs.connection_event(captured, "connection opened", Conn())
    assert len(lines(captured)) == 2
