"""Development tokens: what ``fanout token`` prints, and key pairs for dev and tests.

Tokens are signed with an asymmetric private key (the gateway only ever holds
the public half), always carry ``iat``, ``exp`` and ``jti``, and pick their
algorithm from the key type so they pass the gateway's per-key allow-list.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping, Sequence

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

_TTL_RE = re.compile(r"([0-9]{1,9})([smhd]?)")
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}
_EC_ALGS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_RESERVED = frozenset({"sub", "subjects", "requests", "iat", "exp", "jti", "iss", "aud"})

SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def parse_ttl(text: str) -> int:
    """``"90"``, ``"90s"``, ``"15m"``, ``"1h"``, ``"2d"`` → seconds (> 0)."""
    match = _TTL_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"invalid TTL {text!r}: use e.g. 90, 90s, 15m, 1h or 2d")
    seconds = int(match[1]) * _TTL_UNITS[match[2]]
    if seconds <= 0:
        raise ValueError(f"invalid TTL {text!r}: must be positive")
    return seconds


def _load_signing_key(private_key_pem: bytes) -> tuple[SigningKey, str]:
    try:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an unencrypted PEM private key: {exc}") from None
    if isinstance(key, rsa.RSAPrivateKey):
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in _EC_ALGS:
        return key, _EC_ALGS[key.curve.name]
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key, "EdDSA"
    raise ValueError(f"unsupported private key type {type(key).__name__}")


def make_token(
    *,
    private_key_pem: bytes,
    sub: str,
    subjects: Sequence[str] | None,
    ttl_s: int,
    kid: str | None = None,
    issuer: str | None = None,
    audience: str | None = None,
    requests: Sequence[str] = (),
    extra: Mapping[str, object] | None = None,
    now: float | None = None,
) -> str:
    """A signed JWT for ``sub``; ``extra`` adds claims but may not override the ones above.

    ``subjects=None`` leaves the claim out, so the gateway's whitelist alone applies;
    ``[]`` grants nothing.
    """
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    key, alg = _load_signing_key(private_key_pem)
    clashing = sorted(_RESERVED.intersection(extra or {}))
    if clashing:
        raise ValueError(f"extra claims may not set {clashing}")
    iat = int(time.time() if now is None else now)
    claims: dict[str, object] = dict(extra or {})
    claims.update(sub=sub, iat=iat, exp=iat + ttl_s, jti=uuid.uuid4().hex)
    if subjects is not None:
        claims["subjects"] = list(subjects)
    if requests:
        claims["requests"] = list(requests)
    if issuer is not None:
        claims["iss"] = issuer
    if audience is not None:
        claims["aud"] = audience
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


def generate_keypair(kind: str = "rsa") -> tuple[bytes, bytes]:
    """``(private PEM, public PEM)`` for ``kind`` in ``rsa`` (2048), ``ec`` (P-256), ``ed25519``."""
    private: SigningKey
    if kind == "rsa":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif kind == "ec":
        private = ec.generate_private_key(ec.SECP256R1())
    elif kind == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"unknown key kind {kind!r}: use rsa, ec or ed25519")
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem
