"""A backend service's JWKS keys, fetched with the standard library (a service needs no aiohttp).

Same contract as the gateway's :class:`fanout.worker.jwks.JwksCache`, and the
same parser (:func:`fanout.core.jwks.parse_jwks`): keys are looked up from
memory, refreshed every ``refresh_s`` (every ``refetch_interval_s`` while
failing), an unknown ``kid`` triggers at most one shared refetch per
interval, and a failed fetch keeps the keys we have. The HTTP GET runs in a
thread: ``urllib`` blocks, the service's event loop must not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import urllib.request
from collections.abc import Callable
from urllib.error import URLError

from fanout.core.auth import Key, KeySet
from fanout.core.jwks import MAX_JWKS_BYTES, JwksError, parse_jwks
from fanout.errors import Code

log = logging.getLogger("fanout.service.jwks")


def download(url: str, timeout_s: float) -> bytes:
    """GET ``url`` (http or https only), refusing error statuses and bodies over 1 MiB."""
    if not url.startswith(("http://", "https://")):
        raise JwksError(f"not an http(s) URL: {url}")
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as resp:
        if resp.status != 200:
            raise JwksError(f"HTTP status {resp.status}")
        body: bytes = resp.read(MAX_JWKS_BYTES + 1)
    if len(body) > MAX_JWKS_BYTES:
        raise JwksError(f"response too large (over {MAX_JWKS_BYTES} bytes)")
    return body


class ServiceJwks:
    """Verification keys from ``url`` for :class:`~fanout.service.auth.JwtAuth`."""

    def __init__(
        self,
        url: str,
        *,
        refetch_interval_s: float = 30.0,
        refresh_s: float = 300.0,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.refetch_interval_s = refetch_interval_s
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self.last_error: str | None = None
        self.keys_loaded = 0
        self._clock = clock
        self._keys = KeySet([])
        self._last_kid_refetch = -math.inf
        self._inflight: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """First fetch (failures are logged, not raised), then refresh in the background."""
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
            failing = self.last_error is not None or not self.keys_loaded
            await asyncio.sleep(self.refetch_interval_s if failing else self.refresh_s)
            await self._fetch_shared()

    async def _fetch(self) -> None:
        try:
            body = await asyncio.to_thread(download, self.url, self.timeout_s)
            keys = parse_jwks(body)
        except (JwksError, URLError, TimeoutError, OSError, ValueError) as exc:
            self.last_error = str(exc) or type(exc).__name__
            log.warning(
                "JWKS fetch failed, keeping %d cached keys: %s",
                self.keys_loaded,
                self.last_error,
                extra={"code": Code.TOKEN_INVALID.value, "fields": {"url": self.url}},
            )
            return
        self._keys, self.keys_loaded, self.last_error = keys, len(keys), None
        log.info("JWKS loaded: %d keys", len(keys), extra={"fields": {"url": self.url}})
