"""A backend service's JWKS keys, fetched with the standard library (a service needs no aiohttp).

:class:`fanout.jwks_cache.JwksKeys` with a download that runs ``urllib`` in a
thread (it blocks; the service's event loop must not): the caching, refetch and
failure rules are the gateway's own.
"""

from __future__ import annotations

import asyncio
import urllib.request

from fanout.core.jwks import MAX_JWKS_BYTES, JwksError
from fanout.jwks_cache import JwksKeys


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


class ServiceJwks(JwksKeys):
    """Verification keys from ``url`` for :class:`~fanout.service.auth.JwtAuth`."""

    async def download(self) -> bytes:
        return await asyncio.to_thread(download, self.url, self.timeout_s)
