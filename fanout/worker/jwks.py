"""The worker's JWKS cache: keys fetched asynchronously, looked up synchronously.

``PyJWKClient`` does blocking HTTP, which would stall every client of the
worker, so keys come from aiohttp here, are parsed off the loop, and the
handshake reads them from memory. An unknown ``kid`` (key rotation) triggers
at most one refetch per interval, shared by all callers, so random kids from
an attacker cannot turn the gateway into a flood against the identity
provider. A failed or suspicious fetch (error status, over 1 MiB, not JSON,
nested too deeply, no usable key, or anything else that raises while fetching
or parsing) keeps the keys we already have, is logged and counted, and is
retried with backoff: the background refresh never ends on a bad document.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable

import aiohttp

from fanout.core.auth import Key, KeySet
from fanout.core.jwks import MAX_JWKS_BYTES, JwksError, parse_jwks
from fanout.core.protocol import clip
from fanout.errors import Code

log = logging.getLogger("fanout.jwks")

_CHUNK = 64 * 1024
_CODE = Code.TOKEN_INVALID.value


def retry_delay_s(failures_in_row: int, refetch_interval_s: float, refresh_s: float) -> float:
    """Seconds to the next background fetch: ``refresh_s`` while fetches succeed, else a
    backoff from ``refetch_interval_s`` doubling per failure, never beyond ``refresh_s``."""
    if failures_in_row <= 0:
        return refresh_s
    return min(refresh_s, refetch_interval_s * 2.0 ** min(failures_in_row - 1, 32))


class JwksCache:
    """Verification keys from ``url``, refreshed in the background and on unknown ``kid``."""

    def __init__(
        self,
        url: str,
        *,
        refetch_interval_s: float = 30.0,
        refresh_s: float = 300.0,
        timeout_s: float = 5.0,
        session: aiohttp.ClientSession | None = None,
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
        self._session = session
        self._own_session = session is None
        self._clock = clock
        self._keys = KeySet([])
        self._last_kid_refetch = -math.inf
        self._inflight: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """First fetch (failures are logged, not raised), then refresh every ``refresh_s``."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        await self._fetch_shared()
        self._refresher = asyncio.create_task(self._refresh_loop(), name="jwks-refresh")

    async def close(self) -> None:
        for task in (self._refresher, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._refresher = self._inflight = None
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

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
            body = await self._download()
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
        known = (JwksError, aiohttp.ClientError, OSError, ValueError)
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

    async def _download(self) -> bytes:
        if self._session is None:
            raise RuntimeError("JwksCache.start() has not been called")
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        headers = {"Accept": "application/json"}
        async with self._session.get(
            self.url, timeout=timeout, headers=headers, max_redirects=3
        ) as resp:
            if resp.status != 200:
                raise JwksError(f"HTTP status {resp.status}")
            if resp.content_length is not None and resp.content_length > MAX_JWKS_BYTES:
                raise JwksError(f"response too large ({resp.content_length} bytes)")
            body = bytearray()
            while chunk := await resp.content.read(_CHUNK):
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise JwksError(f"response too large (over {MAX_JWKS_BYTES} bytes)")
            return bytes(body)
