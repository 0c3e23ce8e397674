"""The worker's JWKS cache: :class:`fanout.jwks_cache.JwksKeys` downloading with aiohttp.

``PyJWKClient`` does blocking HTTP, which would stall every client of the
worker, so the document comes from aiohttp here; the caching, refetch and
failure rules are the shared cache's.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import aiohttp

from fanout.core.jwks import MAX_JWKS_BYTES, JwksError
from fanout.jwks_cache import JwksKeys

_CHUNK = 64 * 1024


class JwksCache(JwksKeys):
    """Verification keys from ``url``, refreshed in the background and on unknown ``kid``."""

    known_errors = (*JwksKeys.known_errors, aiohttp.ClientError)

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
        super().__init__(
            url,
            refetch_interval_s=refetch_interval_s,
            refresh_s=refresh_s,
            timeout_s=timeout_s,
            clock=clock,
            on_failure=on_failure,
        )
        self._session = session
        self._own_session = session is None

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        await super().start()

    async def close(self) -> None:
        await super().close()
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def download(self) -> bytes:
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
