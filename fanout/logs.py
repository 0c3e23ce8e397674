"""Structured logging: JSON lines for machines or one text line for people, secrets redacted.

Every line carries time, level, logger, msg, and when known code, conn and worker.
aiohttp's own loggers are routed through here too, because its error log
prints the start of an oversize header, which may be a JWT. The gateway's own
repeated warnings (a NATS server that refuses every half second, forever) are
summarised by :class:`RepeatSummary`; lines that clients cause are bounded by
:class:`ClientEventLog`.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from fanout.core.protocol import clip
from fanout.core.ratelimit import TokenBucket

if TYPE_CHECKING:
    from fanout.core.auth import Principal

_JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]{4,}(?:\.[A-Za-z0-9_-]*){0,2}")
_BEARER_RE = re.compile(r"(?i)(bearer[ ,]+)[^\s,\"']+")
_SEED_RE = re.compile(r"\bS[UAONC][A-Z2-7]{40,}\b")
_FIELDS = ("code", "conn", "worker", "pid", "peer", "subject", "status", "close_code", "reason")
_BARE_RE = re.compile(r"[^\s\"=\\]+")

#: How long identical warnings are counted before their summary line is due.
REPEAT_WINDOW_S = 60.0
#: Distinct warnings tracked at once; the oldest is summarised and forgotten beyond it.
REPEAT_MAX_KEYS = 128

_encoder = msgspec.json.Encoder()
_worker_id: int | None = None


def redact(text: str) -> str:
    """Remove anything that looks like a JWT, bearer credential or NKey seed."""
    text = _JWT_RE.sub("<token>", text)
    text = _BEARER_RE.sub(r"\1<token>", text)
    return _SEED_RE.sub("<seed>", text)


def _timestamp(record: logging.LogRecord) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z"
    )


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    """The record's known fields and ``fields`` dict, redacted, in a stable order."""
    out: dict[str, Any] = {}
    if _worker_id is not None:
        out["worker"] = _worker_id
    for name in _FIELDS:
        value = record.__dict__.get(name)
        if value is not None:
            out[name] = redact(value) if isinstance(value, str) else value
    extra = record.__dict__.get("fields")
    if isinstance(extra, dict):
        for key, value in extra.items():
            out[key] = redact(value) if isinstance(value, str) else value
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what log shippers parse."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        line.update(_extra(record))
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info))
        return _encoder.encode(line).decode()


def _text_value(value: object) -> str:
    if not isinstance(value, str):
        return _encoder.encode(value).decode()
    return value if _BARE_RE.fullmatch(value) else _encoder.encode(value).decode()


class TextFormatter(logging.Formatter):
    """``time LEVEL logger message key=value…`` on one line: what a person at a terminal reads.

    Values with spaces, quotes or ``=`` are JSON-quoted so the line still splits
    unambiguously; a traceback, if any, follows on its own lines.
    """

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), f"{record.levelname:<7}", record.name]
        parts.append(redact(record.getMessage()))
        parts.extend(f"{key}={_text_value(value)}" for key, value in _extra(record).items())
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + redact(self.formatException(record.exc_info))
        return line


@dataclass(slots=True)
class _Repeat:
    template: logging.LogRecord
    window_end: float
    since: float
    count: int = 0


class RepeatSummary:
    """Collapse identical warnings into the first one plus "… repeated N times in S s".

    Identical means same logger, level, message, code and pid (other fields, such
    as the error text, may differ; a line about another process, such as the
    supervisor's "worker exited", is another event). The first line goes out; the rest within
    ``window_s`` are counted. The summary goes out with the first line logged
    after the window ends, or earlier, just before a differing line of level
    ``flush_level`` or above (so "NATS connected" follows the count of failures
    it ends); debug lines never flush, or a chatty debug log would undo the
    summarising. At most ``max_keys`` warnings are tracked: beyond that the
    oldest is summarised and forgotten, so memory stays bounded whatever is logged.
    A record with ``summarised=True`` in its extra is already a count (e.g.
    :class:`ClientEventLog`'s) and passes as is.
    """

    def __init__(
        self,
        window_s: float = REPEAT_WINDOW_S,
        max_keys: int = REPEAT_MAX_KEYS,
        *,
        level: int = logging.WARNING,
        flush_level: int = logging.INFO,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self.max_keys = max_keys
        self.level = level
        self.flush_level = flush_level
        self._clock = clock
        self._tracked: dict[tuple[str, int, str, object, object], _Repeat] = {}

    def admit(self, record: logging.LogRecord) -> list[logging.LogRecord]:
        """What to write now: due summaries, then ``record`` unless it is counted."""
        now = self._clock()
        out = self._expired(now)
        fields = record.__dict__
        key = (
            record.name,
            record.levelno,
            record.getMessage(),
            fields.get("code"),
            fields.get("pid"),
        )
        tracked = record.levelno >= self.level and not record.__dict__.get("summarised")
        seen = self._tracked.get(key) if tracked else None
        if seen is not None:
            seen.count += 1
            return out
        if record.levelno >= self.flush_level:
            out.extend(self._summarise(entry, now) for entry in self._pending())
        if tracked:
            if len(self._tracked) >= self.max_keys:
                oldest = self._tracked.pop(next(iter(self._tracked)))
                if oldest.count:
                    out.append(self._summarise(oldest, now))
            self._tracked[key] = _Repeat(record, now + self.window_s, now)
        out.append(record)
        return out

    def flush(self) -> list[logging.LogRecord]:
        """Summaries of everything counted so far (at exit), forgetting every window."""
        now = self._clock()
        out = [self._summarise(entry, now) for entry in self._pending()]
        self._tracked.clear()
        return out

    def _pending(self) -> list[_Repeat]:
        return [entry for entry in self._tracked.values() if entry.count]

    def _expired(self, now: float) -> list[logging.LogRecord]:
        out: list[logging.LogRecord] = []
        tracked = self._tracked
        # Insertion order is window order: stop at the first window still open.
        while tracked:
            key = next(iter(tracked))
            entry = tracked[key]
            if entry.window_end > now:
                break
            del tracked[key]
            if entry.count:
                out.append(self._summarise(entry, now))
        return out

    @staticmethod
    def _summarise(entry: _Repeat, now: float) -> logging.LogRecord:
        first = entry.template
        seconds = max(0, round(now - entry.since))
        summary = logging.makeLogRecord(
            {
                "name": first.name,
                "levelno": first.levelno,
                "levelname": first.levelname,
                "msg": "%s … repeated %d times in %d s",
                "args": (first.getMessage(), entry.count, seconds),
                "code": first.__dict__.get("code"),
                "pid": first.__dict__.get("pid"),
                "fields": {"repeated": entry.count, "seconds": seconds},
            }
        )
        entry.count = 0
        entry.since = now
        return summary


class SummarisingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler whose lines pass through a :class:`RepeatSummary` first."""

    def __init__(self, stream: Any, summary: RepeatSummary) -> None:
        super().__init__(stream)
        self.summary = summary

    def emit(self, record: logging.LogRecord) -> None:
        for line in self.summary.admit(record):
            super().emit(line)

    def close(self) -> None:
        """Write what is still counted (``logging.shutdown`` calls this at exit)."""
        self.acquire()
        try:
            for line in self.summary.flush():
                super().emit(line)
        finally:
            self.release()
        super().close()


class ClientEventLog:
    """Log lines that clients cause (refused ops, malformed frames): bounded in size and rate.

    A client chooses how often these happen and what text they quote, so each
    message is cut to ``clip``'s limit and lines beyond ``rate`` per second
    (after ``burst``) are only counted; :meth:`flush`, once a sweep, writes
    one summary line for them. One instance per worker (the gateway's): every
    client-caused log path goes through it: error frames, request refusals and
    circuit changes, refused handshakes, connections the gateway closes.
    """

    __slots__ = ("_bucket", "_clock", "suppressed")

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._bucket = TokenBucket(rate, burst, clock())
        self._clock = clock
        self.suppressed = 0

    def log(
        self, logger: logging.Logger, message: str, *, level: int = logging.INFO, **extra: object
    ) -> None:
        """One line with ``extra`` fields, unless over the rate (then counted)."""
        if self._bucket.take(1, self._clock()):
            logger.log(level, clip(message), extra=extra)
        else:
            self.suppressed += 1

    def flush(self, logger: logging.Logger) -> None:
        """The summary of the lines suppressed since the last flush, if any."""
        if self.suppressed:
            logger.warning(
                "client error lines suppressed",
                extra={"fields": {"suppressed": self.suppressed}, "summarised": True},
            )
            self.suppressed = 0


class Connection(Protocol):
    """What :func:`connection_event` reads from a WebSocket connection."""

    conn_id: str
    peer: str
    principal: Principal | None
    opened_at: float


def connection_event(
    logger: logging.Logger,
    event: str,
    conn: Connection,
    close_code: int | None = None,
    why: str | None = None,
) -> None:
    """A debug line for a connection opening or ending: who, from where, for how long, why.

    Off the message path and free unless debug is on (one level check).
    """
    if not logger.isEnabledFor(logging.DEBUG):
        return
    principal = conn.principal.sub if conn.principal is not None else "anonymous"
    duration = round(time.monotonic() - conn.opened_at, 3)
    fields: dict[str, object] = {"principal": principal, "duration_s": duration}
    extra: dict[str, object] = {"conn": conn.conn_id, "peer": conn.peer, "fields": fields}
    if close_code is not None:
        extra["close_code"] = close_code
    if why is not None:
        extra["reason"] = why
    logger.debug(event, extra=extra)


def resolve_format(fmt: str, stream: Any = None) -> str:
    """``auto`` is text when the stream (stderr) is a terminal, else json."""
    if fmt != "auto":
        return fmt
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def setup(level: str = "info", worker: int | None = None, fmt: str = "auto") -> None:
    """Install the handler on the root logger (idempotent; called again after fork).

    ``fmt``: ``json``, ``text`` or ``auto`` (see :func:`resolve_format`).
    """
    global _worker_id
    _worker_id = worker
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = SummarisingHandler(sys.stderr, RepeatSummary())
    formatter = TextFormatter() if resolve_format(fmt) == "text" else JsonFormatter()
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("aiohttp.access",):
        logging.getLogger(name).setLevel(logging.WARNING)
