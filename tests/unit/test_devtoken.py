"""Dev tokens: TTL parsing, signing per key type, and that the gateway accepts them."""

from __future__ import annotations

import json
import re

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from fanout.core.auth import KeySet, TokenVerifier
from fanout.devtoken import generate_keypair, make_token, parse_ttl

NOW = 1_700_000_000
KEYS = {kind: generate_keypair(kind) for kind in ("rsa", "ec", "ed25519")}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("2d", 172_800), (" 5m ", 300)],
)
def test_parse_ttl(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0h", "-5", "1.5h", "1w", "h", "1H", "1 h", "1h30m"])
def test_parse_ttl_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid TTL"):
        parse_ttl(text)


@given(
    st.integers(1, 10**6),
    st.sampled_from([("", 1), ("s", 1), ("m", 60), ("h", 3600), ("d", 86_400)]),
)
def test_parse_ttl_property(n: int, unit: tuple[str, int]) -> None:
    assert parse_ttl(f"{n}{unit[0]}") == n * unit[1]


def header_of(token: str) -> dict[str, object]:
    head = token.split(".")[0]
    decoded: dict[str, object] = json.loads(jwt.utils.base64url_decode(head))
    return decoded


@pytest.mark.parametrize(("kind", "alg"), [("rsa", "RS256"), ("ec", "ES256"), ("ed25519", "EdDSA")])
def test_token_verifies_at_the_gateway(kind: str, alg: str) -> None:
    private, public = KEYS[kind]
    token = make_token(
        private_key_pem=private,
        sub="alice",
        subjects=["xy.md.*", "orders.{sub}.>"],
        ttl_s=3600,
        kid="k1",
        issuer="dev",
        audience="fanout",
        requests=["svc.>"],
        extra={"role": "trader"},
        now=NOW,
    )
    assert header_of(token) == {"alg": alg, "kid": "k1", "typ": "JWT"}
    verifier = TokenVerifier(
        algorithms=[alg], issuer="dev", audience="fanout", clock=lambda: NOW + 10
    )
    key = KeySet.from_pem(public.decode()).find("k1")
    assert key is not None
    principal = verifier.verify(token, key)
    claims = dict(principal.claims)
    jti = claims.pop("jti")
    assert isinstance(jti, str) and re.fullmatch(r"[0-9a-f]{32}", jti)
    assert principal.jti == jti
    assert claims == {
        "sub": "alice",
        "subjects": ["xy.md.*", "orders.{sub}.>"],
        "requests": ["svc.>"],
        "iat": NOW,
        "exp": NOW + 3600,
        "iss": "dev",
        "aud": "fanout",
        "role": "trader",
    }
    assert principal.expires_at == NOW + 3600


def test_minimal_token_has_no_optional_claims_and_fresh_jti() -> None:
    private, _ = KEYS["ed25519"]
    first, second = (
        make_token(private_key_pem=private, sub="bob", subjects=[], ttl_s=60, now=NOW)
        for _ in range(2)
    )
    assert header_of(first) == {"alg": "EdDSA", "typ": "JWT"}
    payload = jwt.decode(first, options={"verify_signature": False})
    assert set(payload) == {"sub", "subjects", "iat", "exp", "jti"}
    assert payload["jti"] != jwt.decode(second, options={"verify_signature": False})["jti"]


def test_p384_key_signs_es384() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    token = make_token(private_key_pem=pem, sub="a", subjects=[], ttl_s=60)
    assert header_of(token)["alg"] == "ES384"


def test_make_token_errors() -> None:
    private, public = KEYS["rsa"]
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        make_token(private_key_pem=public, sub="a", subjects=[], ttl_s=60)
    with pytest.raises(ValueError, match="ttl_s must be positive"):
        make_token(private_key_pem=private, sub="a", subjects=[], ttl_s=0)
    with pytest.raises(ValueError, match=r"extra claims may not set \['exp', 'sub'\]"):
        make_token(
            private_key_pem=private, sub="a", subjects=[], ttl_s=60, extra={"exp": 1, "sub": "x"}
        )
    k1 = ec.generate_private_key(ec.SECP256K1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError, match="unsupported private key type"):
        make_token(private_key_pem=k1, sub="a", subjects=[], ttl_s=60)


def test_generate_keypair_kinds() -> None:
    for kind, (private, public) in KEYS.items():
        assert private.startswith(b"-----BEGIN PRIVATE KEY-----"), kind
        assert public.startswith(b"-----BEGIN PUBLIC KEY-----"), kind
    with pytest.raises(ValueError, match="unknown key kind 'dsa'"):
        generate_keypair("dsa")
