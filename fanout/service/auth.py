"""Message-level JWT authentication for ``fanout.service`` (``Service.with_auth``).

The token comes from the request's metadata (``Authorization: Bearer``, which
the gateway sends only with ``requests.forward_token`` on, or any caller sets
itself) and is verified by the gateway's own flow (:class:`~fanout.tokens.TokenCheck`:
size cap, algorithm allow-list per key type, key by ``kid`` with a JWKS
refetch on an unknown one, ``exp`` required, lifetime cap, ``iss``/``aud``), against a static
PEM key or a JWKS document fetched by :class:`~fanout.service.jwks.ServiceJwks`
(the standard library's HTTP client in a thread: a service needs no aiohttp).
The verified principal lands in ``req.context.principal``.

This is about messages, not the NATS connection: how the service itself
connects to NATS (credentials, NKeys, TLS) is configured on the nats-py
client, never here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from fanout.core.auth import AuthError, KeyLookup, KeySet, Principal, TokenVerifier
from fanout.core.metadata import MetadataError, bearer_token
from fanout.service.context import UNAUTHORIZED, Next, Request, ServiceError
from fanout.service.jwks import ServiceJwks
from fanout.tokens import TokenCheck

DEFAULT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA")


class JwtAuth:
    """Verify the request's bearer JWT; ``401`` when it is missing (if ``required``) or invalid.

    Exactly one key source: ``jwks_url``, ``public_key`` (PEM text or a path)
    or ``keys`` (anything with ``find(kid)``, e.g. a :class:`KeySet`).
    Span attributes: ``nats.feature.auth.status`` and ``auth.message.status``
    (``success`` / ``failure`` / ``token_not_provided``), ``auth.message.method``
    and, on success, ``auth.message.principal_id``.
    """

    def __init__(
        self,
        *,
        jwks_url: str | None = None,
        public_key: str | None = None,
        keys: KeyLookup | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
        required: bool = True,
        max_token_bytes: int = 8192,
        max_lifetime_s: int = 86_400,
        leeway_s: int = 30,
        jwks_refetch_interval_s: float = 30.0,
        jwks_refresh_s: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if sum(x is not None for x in (jwks_url, public_key, keys)) != 1:
            raise ValueError("give exactly one of jwks_url, public_key, keys")
        verifier = TokenVerifier(
            algorithms=algorithms,
            issuer=issuer,
            audience=audience,
            max_token_bytes=max_token_bytes,
            max_lifetime_s=max_lifetime_s,
            leeway_s=leeway_s,
            clock=clock,
        )
        self.required = required
        self.jwks: ServiceJwks | None = None
        if jwks_url is not None:
            self.jwks = keys = ServiceJwks(
                jwks_url, refetch_interval_s=jwks_refetch_interval_s, refresh_s=jwks_refresh_s
            )
        elif public_key is not None:
            keys = KeySet.from_pem(public_key)
        self.tokens = TokenCheck(verifier, keys)

    async def start(self) -> None:
        """First JWKS fetch (a failure is logged; keys come with the next refresh)."""
        if self.jwks is not None:
            await self.jwks.start()

    async def close(self) -> None:
        if self.jwks is not None:
            await self.jwks.close()

    async def verify(self, token: str) -> Principal:
        """The token's principal; :class:`AuthError` (``XYW005``) when it does not verify."""
        return await self.tokens.verify(token)

    async def __call__(self, req: Request, call_next: Next) -> Any:
        span = req.span
        span.set_attribute("auth.message.method", "jwt")
        try:
            if req.metadata is not None:
                auth = req.metadata.authentication
            else:
                auth = bearer_token(req.headers)
        except MetadataError as exc:
            self._status(req, "failure")
            raise ServiceError(UNAUTHORIZED, str(exc)) from None
        if auth is None:
            self._status(req, "token_not_provided")
            if self.required:
                raise ServiceError(UNAUTHORIZED, "a bearer token is required")
            return await call_next(req)
        try:
            principal = await self.verify(auth.token)
        except AuthError as exc:
            self._status(req, "failure")
            raise ServiceError(UNAUTHORIZED, exc.message) from None
        self._status(req, "success")
        if principal.sub:
            span.set_attribute("auth.message.principal_id", principal.sub)
        req.context.principal = principal
        return await call_next(req)

    @staticmethod
    def _status(req: Request, status: str) -> None:
        req.span.set_attribute("nats.feature.auth.status", status)
        req.span.set_attribute("auth.message.status", status)
