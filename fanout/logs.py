"""Structured logging: one JSON object per line, secrets redacted.

Every line carries time, level, msg, and when known code, conn and worker.
aiohttp's own loggers are routed through here too, because its error log
prints the start of an oversize header, which may be a JWT.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec

from fanout.core.protocol import clip
from fanout.core.ratelimit import TokenBucket

_JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]{4,}(?:\.[A-Za-z0-9_-]*){0,2}")
_BEARER_RE = re.compile(r"(?i)(bearer[ ,]+)[^\s,\"']+")
_SEED_RE = re.compile(r"\bS[UAONC][A-Z2-7]{40,}\b")
_FIELDS = ("code", "conn", "worker", "pid", "peer", "subject", "status", "close_code", "reason")

_encoder = msgspec.json.Encoder()
_worker_id: int | None = None


def redact(text: str) -> str:
    """Remove anything that looks like a JWT, bearer credential or NKey seed."""
    text = _JWT_RE.sub("<token>", text)
    text = _BEARER_RE.sub(r"\1<token>", text)
    return _SEED_RE.sub("<seed>", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        if _worker_id is not None:
            line["worker"] = _worker_id
        for name in _FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = redact(value) if isinstance(value, str) else value
        extra = record.__dict__.get("fields")
        if isinstance(extra, dict):
            for key, value in extra.items():
                line[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info))
        return _encoder.encode(line).decode()


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
                "client error lines suppressed", extra={"fields": {"suppressed": self.suppressed}}
            )
            self.suppressed = 0


def setup(level: str = "info", worker: int | None = None) -> None:
    """Install the JSON handler on the root logger (idempotent; called again after fork)."""
    global _worker_id
    _worker_id = worker
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("aiohttp.access",):
        logging.getLogger(name).setLevel(logging.WARNING)
