"""JWT verification rules for the handshake and the ``auth`` op (sans-I/O).

Owns: where a token is read from (subprotocol, Authorization, cookie, query),
which public keys may verify it (static PEM or a JWKS document), and every
check a token must pass. PyJWT alone accepts tokens without ``exp``, with
absurd ``exp`` and of any size, so signature checks use PyJWT's algorithm
objects directly and the rules around them are ours: size cap before any
decoding, an algorithm allow-list per key type (never ``none``, never HS*),
``exp`` and a non-empty ``sub`` required (a principal is always someone),
lifetime capped, ``nbf``/``iat`` against an injectable clock.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Protocol, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import Algorithm, get_default_algorithms

from fanout.errors import HTTP_STATUS, Code, FanoutError

PublicKey: TypeAlias = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)

#: Smallest RSA modulus accepted: shorter keys are forgeable in practice.
MIN_RSA_BITS = 2048

_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_JWK_CURVES = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}
#: Every algorithm a public key can verify; anything else (HS*, none, ES256K) is refused.
SUPPORTED_ALGORITHMS = _RSA_ALGS | frozenset(_EC_ALGS.values()) | {"EdDSA"}

_ALGORITHMS: dict[str, Algorithm] = {
    name: alg for name, alg in get_default_algorithms().items() if name in SUPPORTED_ALGORITHMS
}
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]+")
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


class AuthError(FanoutError):
    """A rejected or missing token; ``message`` is client-safe and never holds the token.

    ``status`` is the HTTP answer when it refuses a handshake (401 for both its codes).
    """

    @property
    def status(self) -> int:
        return HTTP_STATUS[self.code]


def _invalid(message: str) -> AuthError:
    return AuthError(Code.TOKEN_INVALID, message)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified token speaks for; ``claims`` is read-only; ``sub`` is never empty."""

    sub: str
    claims: Mapping[str, object]
    expires_at: int | None
    jti: str | None


@dataclass(frozen=True, slots=True)
class Key:
    """One verification key and the algorithms it may be used with."""

    kid: str | None
    public_key: PublicKey
    algorithms: frozenset[str]


class KeyLookup(Protocol):
    """Anything that finds a key by ``kid``: a :class:`KeySet` or the worker's JWKS cache."""

    def find(self, kid: str | None) -> Key | None: ...


def _algorithms_for(public_key: PublicKey) -> frozenset[str]:
    """The algorithms a key type allows; raises ValueError for unusable keys."""
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA key of {public_key.key_size} bits (minimum {MIN_RSA_BITS})")
        return _RSA_ALGS
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        alg = _EC_ALGS.get(public_key.curve.name)
        if alg is None:
            raise ValueError(f"unsupported EC curve {public_key.curve.name}")
        return frozenset({alg})
    return frozenset({"EdDSA"})


def _b64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _jwk_int(jwk: Mapping[str, object], name: str) -> int:
    return int.from_bytes(_jwk_bytes(jwk, name), "big")


def _jwk_bytes(jwk: Mapping[str, object], name: str) -> bytes:
    value = jwk.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"missing or non-string {name!r}")
    value = value.rstrip("=")
    if _B64URL_RE.fullmatch(value) is None:
        raise ValueError(f"{name!r} is not base64url")
    try:
        return _b64url(value)
    except binascii.Error:
        raise ValueError(f"{name!r} is not base64url") from None


def _jwk_public_key(jwk: Mapping[str, object]) -> PublicKey:
    """Build the public key from a JWK's public members only (``d`` and friends are ignored)."""
    kty = jwk.get("kty")
    if kty == "RSA":
        return rsa.RSAPublicNumbers(_jwk_int(jwk, "e"), _jwk_int(jwk, "n")).public_key()
    if kty == "EC":
        curve = _JWK_CURVES.get(str(jwk.get("crv")))
        if curve is None:
            raise ValueError(f"unsupported EC curve {jwk.get('crv')!r}")
        x, y = _jwk_int(jwk, "x"), _jwk_int(jwk, "y")
        return ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
    if kty == "OKP":
        crv = jwk.get("crv")
        if crv == "Ed25519":
            return ed25519.Ed25519PublicKey.from_public_bytes(_jwk_bytes(jwk, "x"))
        if crv == "Ed448":
            return ed448.Ed448PublicKey.from_public_bytes(_jwk_bytes(jwk, "x"))
        raise ValueError(f"unsupported OKP curve {crv!r}")
    raise ValueError(f"unsupported kty {kty!r}")


class KeySet:
    """Keys usable for verification, by ``kid``; immutable once built."""

    __slots__ = ("_by_kid", "_keys", "_static", "skipped")

    def __init__(self, keys: Sequence[Key], *, static: bool = False, skipped: Sequence[str] = ()):
        self._keys = tuple(keys)
        self._by_kid = {k.kid: k for k in self._keys if k.kid is not None}
        self._static = self._keys[0] if static else None
        #: Why JWKS entries were left out (for the log), e.g. ``"kid 'a': unsupported kty 'oct'"``.
        self.skipped = tuple(skipped)

    def __len__(self) -> int:
        return len(self._keys)

    @classmethod
    def from_pem(cls, pem_or_path: str) -> KeySet:
        """A static key from PEM text (``\\n`` escapes allowed) or a path to a PEM file."""
        text = pem_or_path.strip()
        if "-----BEGIN" not in text:
            try:
                text = Path(text).read_text()
            except OSError as exc:
                raise ValueError(f"cannot read public key file {text!r}: {exc.strerror}") from None
            except UnicodeDecodeError:
                raise ValueError(f"public key file {text!r} is not PEM text") from None
        elif "\n" not in text:
            text = text.replace("\\n", "\n")
        if "PRIVATE KEY-----" in text:
            raise ValueError("a private key was given: configure the public key only")
        data = text.encode()
        public_key: object
        try:
            if "-----BEGIN CERTIFICATE-----" in text:
                public_key = x509.load_pem_x509_certificate(data).public_key()
            else:
                public_key = load_pem_public_key(data)
        except ValueError as exc:
            raise ValueError(f"not a PEM public key or certificate: {exc}") from None
        if not isinstance(public_key, PublicKey):
            raise ValueError(f"unsupported key type {type(public_key).__name__}")
        return cls([Key(None, public_key, _algorithms_for(public_key))], static=True)

    @classmethod
    def from_jwks(cls, jwks: Mapping[str, object]) -> KeySet:
        """Signature keys of a JWKS document; unusable entries are skipped with a reason."""
        entries = jwks.get("keys")
        if not isinstance(entries, list):
            raise ValueError("JWKS has no 'keys' list")
        keys: list[Key] = []
        skipped: list[str] = []
        seen: set[str | None] = set()
        for index, jwk in enumerate(entries):
            if not isinstance(jwk, dict):
                skipped.append(f"key #{index}: not an object")
                continue
            kid = jwk.get("kid")
            label = f"kid {kid!r}" if kid is not None else f"key #{index}"
            try:
                key = cls._jwk_key(jwk, kid)
            except ValueError as exc:
                skipped.append(f"{label}: {exc}")
                continue
            if key.kid is not None and key.kid in seen:
                skipped.append(f"{label}: duplicate kid")
                continue
            seen.add(key.kid)
            keys.append(key)
        return cls(keys, skipped=skipped)

    @staticmethod
    def _jwk_key(jwk: Mapping[str, object], kid: object) -> Key:
        if kid is not None and not isinstance(kid, str):
            raise ValueError("kid is not a string")
        if jwk.get("use", "sig") != "sig":
            raise ValueError(f"use {jwk.get('use')!r} is not 'sig'")
        ops = jwk.get("key_ops")
        if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
            raise ValueError("key_ops does not include 'verify'")
        public_key = _jwk_public_key(jwk)
        algorithms = _algorithms_for(public_key)
        declared = jwk.get("alg")
        if declared is not None:
            if not isinstance(declared, str):
                raise ValueError(f"alg {declared!r} is not a string")
            if declared not in algorithms:
                raise ValueError(f"alg {declared!r} does not fit the key type")
            algorithms = frozenset({str(declared)})
        return Key(kid, public_key, algorithms)

    def find(self, kid: str | None) -> Key | None:
        """The key for ``kid``: a static PEM key matches any kid; no kid needs a one-key JWKS."""
        if self._static is not None:
            return self._static
        if kid is None:
            return self._keys[0] if len(self._keys) == 1 else None
        return self._by_kid.get(kid)


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate member")
    return out


def _json_object(segment: str) -> dict[str, object]:
    try:
        value = json.loads(_b64url(segment), object_pairs_hook=_reject_duplicates)
    except (binascii.Error, ValueError, RecursionError):
        raise _invalid("malformed token") from None
    if not isinstance(value, dict):
        raise _invalid("malformed token")
    return value


def _numeric(claims: Mapping[str, object], name: str) -> float | None:
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _invalid(f"claim {name!r} must be a number")
    return float(value)


class TokenVerifier:
    """Verifies compact JWS tokens against one policy (algorithms, iss, aud, lifetime)."""

    __slots__ = (
        "algorithms",
        "audience",
        "clock",
        "issuer",
        "leeway_s",
        "max_lifetime_s",
        "max_token_bytes",
    )

    def __init__(
        self,
        *,
        algorithms: Sequence[str],
        issuer: str | None,
        audience: str | None,
        max_token_bytes: int = 8192,
        max_lifetime_s: int = 86_400,
        leeway_s: int = 30,
        clock: Callable[[], float] = time.time,
    ) -> None:
        refused = [a for a in algorithms if a not in SUPPORTED_ALGORITHMS]
        if refused:
            raise ValueError(
                f"algorithms {refused} cannot be verified with a public key "
                f"(supported: {sorted(SUPPORTED_ALGORITHMS)})"
            )
        self.algorithms = frozenset(algorithms)
        self.issuer = issuer
        self.audience = audience
        self.max_token_bytes = max_token_bytes
        self.max_lifetime_s = max_lifetime_s
        self.leeway_s = leeway_s
        self.clock = clock

    def _split(self, token: str) -> tuple[str, str | None, list[str]]:
        if len(token) > self.max_token_bytes:
            raise _invalid("token too large")
        if not token.isascii() or _TOKEN_RE.fullmatch(token) is None:
            raise _invalid("malformed token")
        parts = token.split(".")
        header = _json_object(parts[0])
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or (kid is not None and not isinstance(kid, str)):
            raise _invalid("malformed token header")
        if "crit" in header or header.get("b64", True) is not True:
            raise _invalid("unsupported token header")
        if alg not in self.algorithms:
            raise _invalid("algorithm not allowed")
        return alg, kid, parts

    def header(self, token: str) -> tuple[str, str | None]:
        """``(alg, kid)`` after the size cap, a structural check and the alg allow-list."""
        alg, kid, _ = self._split(token)
        return alg, kid

    def verify(self, token: str, key: Key, *, max_lifetime_s: int | None = None) -> Principal:
        """Check signature and claims; ``max_lifetime_s`` tightens the cap (query tokens)."""
        alg, _, (head, body, sig) = self._split(token)
        if alg not in key.algorithms:
            raise _invalid("algorithm does not match the key")
        try:
            signature = _b64url(sig)
            # Only the canonical encoding counts: one signature, one token string.
            canonical = base64.urlsafe_b64encode(signature).rstrip(b"=") == sig.encode()
            signing_input = f"{head}.{body}".encode()
            valid = canonical and _ALGORITHMS[alg].verify(signing_input, key.public_key, signature)
        except (binascii.Error, ValueError, TypeError):
            valid = False
        if not valid:
            raise _invalid("invalid signature")
        claims = _json_object(body)
        return self._principal(claims, max_lifetime_s)

    def _principal(self, claims: dict[str, object], max_lifetime_s: int | None) -> Principal:
        now = self.clock()
        exp = _numeric(claims, "exp")
        if exp is None:
            raise _invalid("token has no exp")
        if exp <= now - self.leeway_s:
            raise _invalid("token expired")
        nbf = _numeric(claims, "nbf")
        if nbf is not None and nbf > now + self.leeway_s:
            raise _invalid("token not yet valid (nbf)")
        iat = _numeric(claims, "iat")
        if iat is not None and iat > now + self.leeway_s:
            raise _invalid("token issued in the future (iat)")
        cap = self.max_lifetime_s
        if max_lifetime_s is not None:
            cap = min(cap, max_lifetime_s)
        if exp - (now if iat is None else iat) > cap:
            raise _invalid("token lifetime exceeds the maximum")
        if self.issuer is not None and claims.get("iss") != self.issuer:
            raise _invalid("wrong issuer")
        if self.audience is not None:
            aud = claims.get("aud")
            if not (aud == self.audience or (isinstance(aud, list) and self.audience in aud)):
                raise _invalid("wrong audience")
        sub, jti = claims.get("sub"), claims.get("jti")
        if not isinstance(sub, str) or not sub:
            raise _invalid("claim 'sub' must be a non-empty string")
        if jti is not None and not isinstance(jti, str):
            raise _invalid("claim 'jti' must be a string")
        return Principal(sub, MappingProxyType(claims), math.floor(exp), jti)


def _bearer_subprotocol(headers: Sequence[tuple[str, str]]) -> str | None:
    entries = [
        item.strip()
        for name, value in headers
        if name == "sec-websocket-protocol"
        for item in value.split(",")
    ]
    if entries.count("bearer") > 1:
        raise _invalid("duplicate bearer subprotocol")
    if "bearer" not in entries:
        return None
    at = entries.index("bearer") + 1
    if at >= len(entries) or not entries[at]:
        raise _invalid("bearer subprotocol without a token")
    return entries[at]


def _bearer_authorization(headers: Sequence[tuple[str, str]]) -> str | None:
    values = [value for name, value in headers if name == "authorization"]
    if len(values) > 1:
        raise _invalid("duplicate Authorization header")
    if not values:
        return None
    scheme, _, credentials = values[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    credentials = credentials.strip()
    if not credentials:
        raise _invalid("empty bearer token")
    return credentials


def _cookie(headers: Sequence[tuple[str, str]], cookie_name: str) -> str | None:
    for name, value in headers:
        if name != "cookie":
            continue
        for pair in value.split(";"):
            key, sep, val = pair.strip().partition("=")
            if sep and key.strip() == cookie_name:
                val = val.strip().strip('"')
                if val:
                    return val
    return None


def extract_token(
    headers: Sequence[tuple[str, str]],
    query: Mapping[str, Sequence[str]],
    *,
    cookie_name: str | None,
    allow_query: bool,
) -> tuple[str | None, str]:
    """``(token, source)`` from the handshake; ``(None, "")`` when there is none.

    ``headers`` are ``(name, value)`` pairs with lower-cased names, repeats kept.
    Sources, first found wins: ``subprotocol``, ``authorization``, ``cookie``
    (when ``cookie_name``), ``query`` (when ``allow_query``). Ambiguity is an
    error whatever the winner: two Authorization headers or two ``bearer``
    subprotocols raise :class:`AuthError` ``XYW005``.
    """
    from_protocol = _bearer_subprotocol(headers)
    from_header = _bearer_authorization(headers)
    if from_protocol is not None:
        return from_protocol, "subprotocol"
    if from_header is not None:
        return from_header, "authorization"
    if cookie_name:
        from_cookie = _cookie(headers, cookie_name)
        if from_cookie is not None:
            return from_cookie, "cookie"
    if allow_query:
        values = [v for v in query.get("token", ()) if v]
        if len(values) > 1:
            raise _invalid("duplicate token parameter")
        if values:
            return values[0], "query"
    return None, ""
