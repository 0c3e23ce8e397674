"""Verification keys from a JWKS URL: fetched in the background, looked up from memory.

One cache for the gateway's workers (:mod:`fanout.worker.jwks`, aiohttp) and for
backend services (:mod:`fanout.service.jwks`, the standard library in a thread,
so a service needs no aiohttp): subclasses only say how to download the
document. The rules live here once: keys are read from memory (the handshake's
hot path does no I/O); an unknown ``kid`` (key rotation) triggers at most one
refetch per interval, shared by all callers, so random kids from an attacker
cannot turn us into a flood against the identity provider; a failed or
suspicious fetch (error status, over 1 MiB, not JSON, nested too deeply, no
usable key, or anything else that raises while fetching or parsing) keeps the
keys we already have, is logged and reported, and is retried with backoff —
the background refresh never ends on a bad document.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable

from fanout.core.auth import Key, KeySet
from fanout.core.jwks import JwksError, parse_jwks
from fanout.core.protocol import clip
from fanout.errors import Code

log = logging.getLogger("fanout.jwks")

_CODE = Code.TOKEN_INVALID.value


def retry_delay_s(failures_in_row: int, refetch_interval_s: float, refresh_s: float) -> float:
    """Seconds to the next background fetch: ``refresh_s`` while fetches succeed, else a
    backoff from ``refetch_interval_s`` doubling per failure, never beyond ``refresh_s``."""
    if failures_in_row <= 0:
        return refresh_s
    return min(refresh_s, refetch_interval_s * 2.0 ** min(failures_in_row - 1, 32))


class JwksKeys:
    """The cache; :meth:`download` (one GET of ``url``) is the subclass's."""

    #: Failures with a message worth logging as is (anything else is "unexpected").
    known_errors: tuple[type[Exception], ...] = (JwksError, OSError, ValueError)

    def __init__(
        self,
        url: str,
        *,
        refetch_interval_s: float = 30.0,
        refresh_s: float = 300.0,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        """``on_failure(reason)`` sees every failed fetch (the worker counts them in a metric)."""
        self.url = url
        self.refetch_interval_s = refetch_interval_s
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self.last_error: str | None = None
        self.keys_loaded = 0
        self.failures_in_row = 0
        self._on_failure = on_failure
        self._clock = clock
        self._keys = KeySet([])
        self._last_kid_refetch = -math.inf
        self._inflight: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None

    async def download(self) -> bytes:
        """The document's bytes (at most :data:`~fanout.core.jwks.MAX_JWKS_BYTES`)."""
        raise NotImplementedError

    async def start(self) -> None:
        """First fetch (failures are logged, not raised), then refresh every ``refresh_s``."""
        await self._fetch_shared()
        self._refresher = asyncio.create_task(self._refresh_loop(), name="jwks-refresh")

    async def close(self) -> None:
        for task in (self._refresher, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._refresher = self._inflight = None

    def find(self, kid: str | None) -> Key | None:
        """The cached key for ``kid`` (the handshake's hot path: no I/O)."""
        return self._keys.find(kid)

    async def find_or_refetch(self, kid: str | None) -> Key | None:
        """Like :meth:`find`, but an unknown ``kid`` may trigger one (rate-limited) refetch."""
        key = self._keys.find(kid)
        if key is not None:
            return key
        if self._inflight is None:
            now = self._clock()
            if now - self._last_kid_refetch < self.refetch_interval_s:
                return None
            self._last_kid_refetch = now
        await self._fetch_shared()
        return self._keys.find(kid)

    async def _fetch_shared(self) -> None:
        """Join the fetch in flight or start one; a cancelled caller does not cancel it."""
        if self._inflight is None:
            task = asyncio.create_task(self._fetch(), name="jwks-fetch")
            self._inflight = task
            task.add_done_callback(self._fetch_done)
        await asyncio.shield(self._inflight)

    def _fetch_done(self, task: asyncio.Task[None]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def _refresh_loop(self) -> None:
        while True:
            delay = retry_delay_s(self.failures_in_row, self.refetch_interval_s, self.refresh_s)
            await asyncio.sleep(delay)
            await self._fetch_shared()

    async def _fetch(self) -> None:
        """One fetch; whatever it raises is a failed fetch, never the end of the refresh."""
        try:
            body = await self.download()
            keys = await asyncio.to_thread(parse_jwks, body)
        except Exception as exc:  # a hostile or broken document may raise anything
            self._failed(exc)
            return
        self._keys = keys
        self.keys_loaded = len(keys)
        self.last_error = None
        self.failures_in_row = 0
        log.info("JWKS loaded: %d keys", len(keys), extra={"fields": {"url": self.url}})
        for skipped in keys.skipped:
            log.warning(
                "JWKS key skipped: %s",
                clip(skipped),
                extra={"code": _CODE, "fields": {"url": self.url}},
            )

    def _failed(self, exc: Exception) -> None:
        known = self.known_errors
        if isinstance(exc, TimeoutError):
            reason = f"timed out after {self.timeout_s} s"
        elif isinstance(exc, known):
            reason = str(exc) or type(exc).__name__
        else:
            reason = f"unexpected {type(exc).__name__} while fetching or parsing"
        reason = clip(reason)  # the document may be hostile: its text is quoted in the log
        self.last_error = reason
        self.failures_in_row += 1
        if self._on_failure is not None:
            self._on_failure(reason)
        log.warning(
            "JWKS fetch failed, keeping %d cached keys: %s",
            self.keys_loaded,
            reason,
            extra={"code": _CODE, "reason": reason, "fields": {"url": self.url}},
            exc_info=not isinstance(exc, known),
        )
