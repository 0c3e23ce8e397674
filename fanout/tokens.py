"""The one token-verification flow: header, key, JWKS refetch, signature and claims.

The gateway (handshake and ``auth`` op, :class:`~fanout.worker.gateway.Gateway`)
and a backend service (:class:`~fanout.service.auth.JwtAuth`) verify a token
the same way, here: the size cap and the algorithm allow-list before any key
is looked up; the key by ``kid`` from memory; an unknown ``kid`` may make a
JWKS cache refetch once (rate-limited by the cache, so random kids cannot turn
us into a flood against the identity provider); then the signature and the
claims (:class:`~fanout.core.auth.TokenVerifier`). Every refusal is an
:class:`~fanout.core.auth.AuthError` ``XYW005``. What differs stays with the
caller: the gateway's query-token lifetime and jti denylist, the service's
span attributes. No aiohttp here: a service imports this module.
"""

from __future__ import annotations

from fanout.core.auth import AuthError, KeyLookup, Principal, TokenVerifier
from fanout.errors import Code
from fanout.jwks_cache import JwksKeys


class TokenCheck:
    """A verifier's policy and where its keys come from; :meth:`verify` is the flow."""

    __slots__ = ("keys", "verifier")

    def __init__(self, verifier: TokenVerifier, keys: KeyLookup | None) -> None:
        """``keys`` None: no key configured, every token is refused (the gateway without JWT)."""
        self.verifier = verifier
        self.keys = keys

    async def verify(self, token: str, *, max_lifetime_s: int | None = None) -> Principal:
        """The token's principal; ``max_lifetime_s`` tightens the lifetime cap (query tokens)."""
        _, kid = self.verifier.header(token)
        keys = self.keys
        if keys is None:
            raise AuthError(Code.TOKEN_INVALID, "no verification key configured")
        key = keys.find(kid)
        if key is None and isinstance(keys, JwksKeys):
            key = await keys.find_or_refetch(kid)
        if key is None:
            raise AuthError(Code.TOKEN_INVALID, "unknown signing key")
        return self.verifier.verify(token, key, max_lifetime_s=max_lifetime_s)
