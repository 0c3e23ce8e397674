"""The one verification flow (fanout.tokens.TokenCheck), shared by the gateway and services."""

from __future__ import annotations

import json
import time

import jwt
import pytest
from jwt.algorithms import RSAAlgorithm

from fanout.core.auth import AuthError, KeySet, TokenVerifier
from fanout.devtoken import generate_keypair
from fanout.errors import Code
from fanout.jwks_cache import JwksKeys
from fanout.service.auth import JwtAuth
from fanout.tokens import TokenCheck

PRIV, PUB = generate_keypair("rsa")
VERIFIER = TokenVerifier(algorithms=["RS256"], issuer=None, audience=None)


def token(kid: str | None = None, ttl: int = 600, sub: str = "alice") -> str:
    now = int(time.time())
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode({"sub": sub, "iat": now, "exp": now + ttl}, PRIV, "RS256", headers=headers)


def jwks(kid: str) -> bytes:
    jwk = json.loads(RSAAlgorithm.to_jwk(RSAAlgorithm(RSAAlgorithm.SHA256).prepare_key(PUB)))
    return json.dumps({"keys": [{**jwk, "kid": kid, "alg": "RS256"}]}).encode()


class Rotating(JwksKeys):
    """The shared JWKS cache serving a scripted sequence of documents (one per fetch)."""

    def __init__(self, *documents: bytes) -> None:
        super().__init__("http://idp.invalid/jwks", refetch_interval_s=3600.0)
        self.documents = list(documents)
        self.fetches = 0

    async def download(self) -> bytes:
        self.fetches += 1
        return self.documents.pop(0)


async def test_static_key_verifies_and_the_lifetime_cap_tightens() -> None:
    check = TokenCheck(VERIFIER, KeySet.from_pem(PUB.decode()))
    assert (await check.verify(token())).sub == "alice"
    with pytest.raises(AuthError) as err:
        await check.verify(token(ttl=600), max_lifetime_s=300)
    assert (err.value.code, err.value.message) == (
        Code.TOKEN_INVALID,
        "token lifetime exceeds the maximum",
    )


async def test_no_key_configured_refuses_every_token() -> None:
    with pytest.raises(AuthError) as err:
        await TokenCheck(VERIFIER, None).verify(token())
    assert (err.value.code, err.value.message) == (
        Code.TOKEN_INVALID,
        "no verification key configured",
    )


async def test_header_is_checked_before_any_key_lookup() -> None:
    keys = Rotating(jwks("k1"))
    with pytest.raises(AuthError) as err:
        await TokenCheck(VERIFIER, keys).verify("x" * 9000)
    assert err.value.message == "token too large"
    assert keys.fetches == 0


async def test_unknown_kid_refetches_once_per_interval() -> None:
    keys = Rotating(jwks("k1"), jwks("k2"))
    await keys.start()
    check = TokenCheck(VERIFIER, keys)
    try:
        assert (await check.verify(token("k1"))).sub == "alice"
        assert (await check.verify(token("k2"))).sub == "alice"  # rotated: one refetch
        with pytest.raises(AuthError) as err:
            await check.verify(token("k3"))  # within the interval: no fetch at all
        assert (err.value.code, err.value.message) == (Code.TOKEN_INVALID, "unknown signing key")
        assert keys.fetches == 2
    finally:
        await keys.close()


async def test_service_verifies_through_the_same_flow() -> None:
    auth = JwtAuth(public_key=PUB.decode(), algorithms=["RS256"])
    assert isinstance(auth.tokens, TokenCheck)
    assert (await auth.verify(token())).sub == "alice"
    with pytest.raises(AuthError) as err:
        await auth.verify(token(sub=""))
    assert err.value.message == "claim 'sub' must be a non-empty string"
