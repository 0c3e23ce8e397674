"""JWT verification rules, with real keys and real signatures."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from fanout.core.auth import (
    AuthError,
    Key,
    KeySet,
    Principal,
    TokenVerifier,
    extract_token,
)
from fanout.devtoken import generate_keypair

NOW = 1_700_000_000
ALL_ALGS = ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"]

RSA_PRIV, RSA_PUB = generate_keypair("rsa")
OTHER_RSA_PRIV, _ = generate_keypair("rsa")
EC_PRIV, EC_PUB = generate_keypair("ec")
ED_PRIV, ED_PUB = generate_keypair("ed25519")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


Part = Mapping[str, Any] | bytes


def raw_token(header: Part, payload: Part, sig: bytes) -> str:
    def part(value: Part) -> str:
        return b64(value if isinstance(value, bytes) else json.dumps(value).encode())

    return f"{part(header)}.{part(payload)}.{b64(sig)}"


def claims(**overrides: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"sub": "alice", "iat": NOW, "exp": NOW + 600, "jti": "j1"}
    out.update(overrides)
    return {k: v for k, v in out.items() if v is not None}


def sign(
    payload: Mapping[str, Any],
    pem: bytes = RSA_PRIV,
    alg: str = "RS256",
    kid: str | None = None,
) -> str:
    key = serialization.load_pem_private_key(pem, password=None)
    headers = {"kid": kid} if kid else None
    return jwt.encode(dict(payload), key, algorithm=alg, headers=headers)  # type: ignore[arg-type]


def verifier(**kw: Any) -> TokenVerifier:
    kw.setdefault("algorithms", ALL_ALGS)
    kw.setdefault("issuer", None)
    kw.setdefault("audience", None)
    return TokenVerifier(clock=lambda: NOW, **kw)


def verify_by_kid(token: str, keys: KeySet) -> Principal:
    """What the gateway and the service do: the key the token's ``kid`` names, then verify."""
    key = keys.find(verifier().header(token)[1])
    assert key is not None, "no key for the token's kid"
    return verifier().verify(token, key)


def rsa_key() -> Key:
    key = KeySet.from_pem(RSA_PUB.decode()).find(None)
    assert key is not None
    return key


def rejects(token: str, key: Key | None = None, v: TokenVerifier | None = None, **kw: Any) -> str:
    """Verify must fail with XYW005; returns the message (checked never to hold the token)."""
    with pytest.raises(AuthError) as info:
        (v or verifier()).verify(token, key or rsa_key(), **kw)
    assert info.value.code == "XYW005"
    if len(token) > 8:
        assert token not in str(info.value)
    return info.value.message


# --- valid tokens -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("priv", "pub", "alg"),
    [
        (RSA_PRIV, RSA_PUB, "RS256"),
        (RSA_PRIV, RSA_PUB, "PS256"),
        (RSA_PRIV, RSA_PUB, "RS512"),
        (EC_PRIV, EC_PUB, "ES256"),
        (ED_PRIV, ED_PUB, "EdDSA"),
    ],
)
def test_valid_token_gives_principal(priv: bytes, pub: bytes, alg: str) -> None:
    token = sign(claims(aud="gw", iss="idp", subjects=["xy.md.>"]), priv, alg)
    key = KeySet.from_pem(pub.decode()).find("anything")
    assert key is not None
    v = verifier(issuer="idp", audience="gw")
    assert v.header(token) == (alg, None)
    p = v.verify(token, key)
    assert p == Principal(sub="alice", claims=p.claims, expires_at=NOW + 600, jti="j1")
    assert dict(p.claims)["subjects"] == ["xy.md.>"]
    with pytest.raises(TypeError):
        p.claims["sub"] = "mallory"  # type: ignore[index]


def test_principal_without_jti_and_fractional_exp() -> None:
    p = verifier().verify(sign({"sub": "alice", "exp": NOW + 60.9}), rsa_key())
    assert (p.sub, p.jti, p.expires_at) == ("alice", None, NOW + 60)


@pytest.mark.parametrize("sub", [None, "", 42, ["alice"]])
def test_token_without_a_non_empty_string_sub_is_rejected(sub: object) -> None:
    """protocol.md: a token must carry a non-empty ``sub`` (401 XYW005)."""
    payload = claims()
    if sub is None:
        del payload["sub"]
    else:
        payload["sub"] = sub
    assert rejects(sign(payload)) == "claim 'sub' must be a non-empty string"


def test_audience_list_containing_ours_is_accepted() -> None:
    p = verifier(audience="gw").verify(sign(claims(aud=["other", "gw"])), rsa_key())
    assert p.sub == "alice"


def test_audience_not_checked_when_not_configured() -> None:
    assert verifier().verify(sign(claims(aud="someone-else")), rsa_key()).sub == "alice"


# --- algorithms ---------------------------------------------------------------------------


def test_alg_none_is_rejected_before_anything_else() -> None:
    token = raw_token({"alg": "none"}, claims(), b"x")
    assert rejects(token) == "algorithm not allowed"
    unsigned = raw_token({"alg": "none"}, claims(), b"")
    assert rejects(unsigned) == "malformed token"


def test_hs256_signed_with_the_rsa_public_pem_fails() -> None:
    header = {"alg": "HS256", "typ": "JWT"}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims()).encode())}"
    mac = hmac.new(RSA_PUB, signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{b64(mac)}"
    assert rejects(token) == "algorithm not allowed"


@pytest.mark.parametrize("alg", ["HS256", "HS512", "none", "NONE", "ES256K", "RS1"])
def test_verifier_refuses_to_allow_symmetric_or_unknown_algs(alg: str) -> None:
    with pytest.raises(ValueError, match="cannot be verified with a public key"):
        TokenVerifier(algorithms=["RS256", alg], issuer=None, audience=None)


def test_alg_not_allow_listed() -> None:
    token = sign(claims(), alg="RS512")
    assert rejects(token, v=verifier(algorithms=["RS256"])) == "algorithm not allowed"
    with pytest.raises(AuthError, match="algorithm not allowed"):
        verifier(algorithms=["RS256"]).header(token)


def test_alg_must_fit_the_key_type() -> None:
    ec_token = sign(claims(), EC_PRIV, "ES256")
    assert rejects(ec_token, rsa_key()) == "algorithm does not match the key"
    ec_key = KeySet.from_pem(EC_PUB.decode()).find(None)
    assert ec_key is not None and ec_key.algorithms == {"ES256"}
    # ES384 header on a P-256 key: the curve decides, not the header.
    forged = raw_token({"alg": "ES384"}, claims(), b"\0" * 96)
    assert rejects(forged, ec_key) == "algorithm does not match the key"
    ed_key = KeySet.from_pem(ED_PUB.decode()).find(None)
    assert ed_key is not None
    assert rejects(sign(claims()), ed_key) == "algorithm does not match the key"


def test_wrong_key_is_an_invalid_signature() -> None:
    assert rejects(sign(claims(), OTHER_RSA_PRIV)) == "invalid signature"


def test_tampered_payload_is_an_invalid_signature() -> None:
    head, _, sig = sign(claims()).split(".")
    body = b64(json.dumps(claims(sub="admin")).encode())
    assert rejects(f"{head}.{body}.{sig}") == "invalid signature"


def test_signature_of_wrong_length_is_invalid_not_a_crash() -> None:
    ec_key = KeySet.from_pem(EC_PUB.decode()).find(None)
    head, body, _ = sign(claims(), EC_PRIV, "ES256").split(".")
    assert rejects(f"{head}.{body}.{b64(b'short')}", ec_key) == "invalid signature"


# --- kid / key sets -----------------------------------------------------------------------


def jwk(pub_pem: bytes, kid: str | None, **extra: Any) -> dict[str, Any]:
    pub = serialization.load_pem_public_key(pub_pem)
    if isinstance(pub, rsa.RSAPublicKey):
        out = RSAAlgorithm.to_jwk(pub, as_dict=True)
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        out = ECAlgorithm.to_jwk(pub, as_dict=True)
    else:
        assert isinstance(pub, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
        out = OKPAlgorithm.to_jwk(pub, as_dict=True)
    out = dict(out)
    if kid is not None:
        out["kid"] = kid
    out.update(extra)
    return out


def test_wrong_kid_finds_no_key() -> None:
    keys = KeySet.from_jwks({"keys": [jwk(RSA_PUB, "a"), jwk(EC_PUB, "b")]})
    assert len(keys) == 2
    token = sign(claims(), kid="c")
    assert keys.find(verifier().header(token)[1]) is None
    assert verify_by_kid(sign(claims(), kid="a"), keys).sub == "alice"
    assert verify_by_kid(sign(claims(), EC_PRIV, "ES256", kid="b"), keys).sub == "alice"


def test_kid_of_one_key_does_not_verify_with_another() -> None:
    keys = KeySet.from_jwks({"keys": [jwk(RSA_PUB, "a"), jwk(EC_PUB, "b")]})
    with pytest.raises(AuthError, match="algorithm does not match the key"):
        verify_by_kid(sign(claims(), kid="b"), keys)


def test_jwks_skips_unusable_keys_with_reasons() -> None:
    document = {
        "keys": [
            jwk(RSA_PUB, "enc", use="enc"),
            {"kty": "oct", "kid": "sym", "k": b64(b"secret")},
            jwk(RSA_PUB, "mismatch", alg="ES256"),
            jwk(RSA_PUB, "ops", key_ops=["encrypt"]),
            jwk(RSA_PUB, "ok", alg="RS256", d="private-part-ignored"),
            jwk(EC_PUB, "ok"),
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            "not-a-key",
        ]
    }
    keys = KeySet.from_jwks(document)
    assert len(keys) == 1
    ok = keys.find("ok")
    assert ok is not None and ok.algorithms == {"RS256"}
    assert keys.skipped == (
        "kid 'enc': use 'enc' is not 'sig'",
        "kid 'sym': unsupported kty 'oct'",
        "kid 'mismatch': alg 'ES256' does not fit the key type",
        "kid 'ops': key_ops does not include 'verify'",
        "kid 'ok': duplicate kid",
        "kid 'broken': 'n' is not base64url",
        "key #7: not an object",
    )
    # The declared alg narrows what the key verifies.
    assert rejects(sign(claims(), alg="PS256"), ok) == "algorithm does not match the key"


def test_jwks_wrong_typed_fields_skip_the_key_never_raise_anything_else() -> None:
    """``"alg": ["RS256"]`` raised TypeError (unhashable) and ended the worker's JWKS refresh."""
    document = {
        "keys": [
            jwk(RSA_PUB, "list-alg", alg=["RS256"]),
            jwk(RSA_PUB, "dict-alg", alg={"RS256": True}),
            jwk(RSA_PUB, "list-use", use=["sig"]),
            jwk(RSA_PUB, "nested-ops", key_ops=[["verify"]]),
            {**jwk(EC_PUB, "dict-crv"), "crv": {"P-256": 1}},
            {**jwk(RSA_PUB, "list-kty"), "kty": ["RSA"]},
            jwk(RSA_PUB, "fine"),
        ]
    }
    keys = KeySet.from_jwks(document)
    assert len(keys) == 1 and keys.find("fine") is not None
    assert keys.skipped == (
        "kid 'list-alg': alg ['RS256'] is not a string",
        "kid 'dict-alg': alg {'RS256': True} is not a string",
        "kid 'list-use': use ['sig'] is not 'sig'",
        "kid 'nested-ops': key_ops does not include 'verify'",
        "kid 'dict-crv': unsupported EC curve {'P-256': 1}",
        "kid 'list-kty': unsupported kty ['RSA']",
    )


def test_jwks_without_keys_list_is_an_error() -> None:
    with pytest.raises(ValueError, match="no 'keys' list"):
        KeySet.from_jwks({"keys": {}})


def test_lone_jwks_key_matches_a_token_without_kid_but_not_a_foreign_kid() -> None:
    one = KeySet.from_jwks({"keys": [jwk(ED_PUB, None)]})
    assert one.find(None) is not None
    assert one.find("x") is None
    two = KeySet.from_jwks({"keys": [jwk(ED_PUB, "a"), jwk(EC_PUB, "b")]})
    assert two.find(None) is None


def test_jwks_ed448_key_verifies_eddsa() -> None:
    priv = ed448.Ed448PrivateKey.generate()
    pub_pem = priv.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    keys = KeySet.from_jwks({"keys": [jwk(pub_pem, "x")]})
    token = jwt.encode(claims(), priv, algorithm="EdDSA", headers={"kid": "x"})
    assert verify_by_kid(token, keys).sub == "alice"


# --- static PEM keys ----------------------------------------------------------------------


def test_pem_from_text_path_escaped_and_certificate(tmp_path: Path) -> None:
    token = sign(claims())
    path = tmp_path / "pub.pem"
    path.write_bytes(RSA_PUB)
    escaped = RSA_PUB.decode().replace("\n", "\\n")
    priv = serialization.load_pem_private_key(RSA_PRIV, password=None)
    assert isinstance(priv, rsa.RSAPrivateKey)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(priv.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
        .sign(priv, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    for source in (RSA_PUB.decode(), str(path), escaped, cert_pem):
        keys = KeySet.from_pem(source)
        assert verify_by_kid(token, keys).sub == "alice"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (RSA_PRIV.decode(), "a private key was given"),
        ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "not a PEM public key"),
        ("/nonexistent/key.pem", "cannot read public key file"),
    ],
)
def test_pem_errors_name_the_problem(source: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KeySet.from_pem(source)


def test_weak_and_unsupported_pem_keys_are_refused() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    k1 = ec.generate_private_key(ec.SECP256K1()).public_key()
    for pub, message in ((weak, "RSA key of 1024 bits"), (k1, "unsupported EC curve secp256k1")):
        pem = pub.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        with pytest.raises(ValueError, match=message):
            KeySet.from_pem(pem.decode())


def test_static_key_matches_any_kid() -> None:
    keys = KeySet.from_pem(RSA_PUB.decode())
    assert keys.find("x") is keys.find(None) is keys.find("y")


# --- claims -------------------------------------------------------------------------------


def test_missing_exp() -> None:
    assert rejects(sign(claims(exp=None))) == "token has no exp"


def test_absurd_exp_year_3000() -> None:
    year_3000 = 32_503_680_000
    assert rejects(sign(claims(exp=year_3000))) == "token lifetime exceeds the maximum"
    assert rejects(sign(claims(exp=year_3000, iat=None))) == "token lifetime exceeds the maximum"


def test_lifetime_cap_and_the_tighter_query_cap() -> None:
    v = verifier(max_lifetime_s=3600)
    assert v.verify(sign(claims(exp=NOW + 3600)), rsa_key()).expires_at == NOW + 3600
    assert rejects(sign(claims(exp=NOW + 3601)), v=v) == "token lifetime exceeds the maximum"
    assert v.verify(sign(claims(exp=NOW + 60)), rsa_key(), max_lifetime_s=60).sub == "alice"
    message = rejects(sign(claims(exp=NOW + 61)), v=v, max_lifetime_s=60)
    assert message == "token lifetime exceeds the maximum"
    # An old iat cannot hide a long lifetime either.
    assert rejects(sign(claims(iat=NOW - 86_400, exp=NOW + 60)), v=v).startswith("token lifetime")


def test_expired_with_leeway_boundary() -> None:
    v = verifier(leeway_s=30)
    assert v.verify(sign(claims(exp=NOW - 29)), rsa_key()).expires_at == NOW - 29
    assert rejects(sign(claims(exp=NOW - 30)), v=v) == "token expired"
    assert rejects(sign(claims(exp=NOW - 3600, iat=NOW - 7200))) == "token expired"


def test_nbf_in_the_future() -> None:
    assert verifier().verify(sign(claims(nbf=NOW + 30)), rsa_key()).sub == "alice"
    assert rejects(sign(claims(nbf=NOW + 31))) == "token not yet valid (nbf)"


def test_iat_in_the_future() -> None:
    assert rejects(sign(claims(iat=NOW + 31))) == "token issued in the future (iat)"


@pytest.mark.parametrize("value", ["1700000600", True, None, [1]])
def test_time_claims_must_be_numbers(value: object) -> None:
    token = sign({"sub": "alice", "exp": value})
    assert rejects(token) == "claim 'exp' must be a number"


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"1e999"])
def test_non_finite_exp_is_rejected(literal: bytes) -> None:
    key = serialization.load_pem_private_key(RSA_PRIV, password=None)
    token = jwt.api_jws.encode(b'{"exp":' + literal + b"}", key, algorithm="RS256")  # type: ignore[arg-type]
    assert rejects(token) == "claim 'exp' must be a number"


def test_wrong_issuer_and_audience() -> None:
    v = verifier(issuer="idp", audience="gw")
    assert rejects(sign(claims(iss="evil", aud="gw")), v=v) == "wrong issuer"
    assert rejects(sign(claims(aud="gw")), v=v) == "wrong issuer"
    assert rejects(sign(claims(iss="idp", aud="other")), v=v) == "wrong audience"
    assert rejects(sign(claims(iss="idp", aud=["a", "b"])), v=v) == "wrong audience"
    assert rejects(sign(claims(iss="idp")), v=v) == "wrong audience"


def test_jti_must_be_a_string() -> None:
    assert rejects(sign(claims(jti=["x"]))) == "claim 'jti' must be a string"


# --- size and structure -------------------------------------------------------------------


def test_two_megabyte_token_is_rejected_by_size_before_any_decoding() -> None:
    # Validly signed: only the size cap can reject it, so the cap runs before PyJWT.
    big = sign(claims(pad="x" * (2 << 20)))
    assert len(big) > 2 << 20
    assert rejects(big) == "token too large"
    with pytest.raises(AuthError, match="token too large"):
        verifier().header(big)
    # Not even a token: still "too large", so nothing parsed it first.
    assert rejects("%" * (2 << 20)) == "token too large"


def test_size_cap_is_exact() -> None:
    token = sign(claims())
    assert verifier(max_token_bytes=len(token)).verify(token, rsa_key()).sub == "alice"
    assert rejects(token, v=verifier(max_token_bytes=len(token) - 1)) == "token too large"


GOOD = sign(claims()).split(".")


def with_header(raw: bytes) -> str:
    return f"{b64(raw)}.{GOOD[1]}.{GOOD[2]}"


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (f"{GOOD[0]}.{GOOD[1]}", "malformed token"),
        (".".join([*GOOD, GOOD[2]]), "malformed token"),
        (f"!!!.{GOOD[1]}.{GOOD[2]}", "malformed token"),
        (f"{GOOD[0]}=.{GOOD[1]}.{GOOD[2]}", "malformed token"),
        (f"abcde.{GOOD[1]}.{GOOD[2]}", "malformed token"),
        (".".join(GOOD) + "é", "malformed token"),
        ("", "malformed token"),
        (with_header(b"{not json"), "malformed token"),
        (with_header(b"[1,2]"), "malformed token"),
        (with_header(b'{"alg":"none","alg":"RS256"}'), "malformed token"),
        (with_header(b'{"kid":"a"}'), "malformed token header"),
        (with_header(b'{"alg":"RS256","kid":7}'), "malformed token header"),
        (with_header(b'{"alg":"RS256","crit":["exp"]}'), "unsupported token header"),
        (with_header(b'{"alg":"RS256","b64":false}'), "unsupported token header"),
    ],
)
def test_malformed_tokens(token: str, message: str) -> None:
    with pytest.raises(AuthError) as info:
        verifier().header(token)
    assert (info.value.code, info.value.message) == ("XYW005", message)
    assert rejects(token) == message


def test_signed_payload_that_is_not_a_json_object() -> None:
    key = serialization.load_pem_private_key(RSA_PRIV, password=None)
    for payload in (b"not json", b"[1,2,3]", b'{"exp":1,"exp":2}'):
        token = jwt.api_jws.encode(payload, key, algorithm="RS256")  # type: ignore[arg-type]
        assert rejects(token) == "malformed token"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300) | st.from_regex(r"[A-Za-z0-9_-]{0,40}(\.[A-Za-z0-9_-]{0,40}){0,3}"))
def test_garbage_only_ever_raises_auth_error(token: str) -> None:
    with pytest.raises(AuthError) as info:
        verifier().verify(token, rsa_key())
    assert info.value.code == "XYW005"


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_single_character_change_is_rejected(data: st.DataObject) -> None:
    token = TOKEN_FOR_MUTATION
    index = data.draw(st.integers(0, len(token) - 1))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
    char = data.draw(st.sampled_from(alphabet).filter(lambda c: c != token[index]))
    mutated = token[:index] + char + token[index + 1 :]
    with pytest.raises(AuthError) as info:
        verifier().verify(mutated, rsa_key())
    assert info.value.code == "XYW005"


TOKEN_FOR_MUTATION = sign(claims())


# --- where the token comes from -----------------------------------------------------------


def extract(
    headers: list[tuple[str, str]],
    query: dict[str, list[str]] | None = None,
    cookie_name: str | None = "fanout_token",
    allow_query: bool = True,
) -> tuple[str | None, str]:
    return extract_token(headers, query or {}, cookie_name=cookie_name, allow_query=allow_query)


def test_each_source_alone() -> None:
    assert extract([("sec-websocket-protocol", "bearer, t1")]) == ("t1", "subprotocol")
    listed = [("sec-websocket-protocol", "v1.fanout,bearer,t1,other")]
    assert extract(listed) == ("t1", "subprotocol")
    assert extract([("authorization", "Bearer t2")]) == ("t2", "authorization")
    assert extract([("authorization", "bearer   t2 ")]) == ("t2", "authorization")
    assert extract([("cookie", "a=1; fanout_token=t3; b=2")]) == ("t3", "cookie")
    assert extract([("cookie", 'fanout_token="t3"')]) == ("t3", "cookie")
    assert extract([], {"token": ["t4"]}) == ("t4", "query")
    assert extract([]) == (None, "")


def test_subprotocol_split_over_several_headers() -> None:
    headers = [("sec-websocket-protocol", "bearer"), ("sec-websocket-protocol", "t1")]
    assert extract(headers) == ("t1", "subprotocol")


def test_precedence_subprotocol_authorization_cookie_query() -> None:
    proto = ("sec-websocket-protocol", "bearer, t1")
    auth = ("authorization", "Bearer t2")
    cookie = ("cookie", "fanout_token=t3")
    query = {"token": ["t4"]}
    assert extract([cookie, auth, proto], query) == ("t1", "subprotocol")
    assert extract([cookie, auth], query) == ("t2", "authorization")
    assert extract([cookie], query) == ("t3", "cookie")
    assert extract([], query) == ("t4", "query")


def test_cookie_and_query_only_when_enabled() -> None:
    headers = [("cookie", "fanout_token=t3")]
    assert extract(headers, {"token": ["t4"]}, cookie_name=None, allow_query=False) == (None, "")
    assert extract(headers, cookie_name="other", allow_query=False) == (None, "")
    assert extract([("cookie", "fanout_token=")], {"token": [""]}) == (None, "")


def test_non_bearer_authorization_is_not_a_token() -> None:
    assert extract([("authorization", "Basic YWxpY2U6cHc=")], {"token": ["t4"]}) == ("t4", "query")


@pytest.mark.parametrize(
    ("headers", "query", "message"),
    [
        (
            [("authorization", "Bearer a"), ("authorization", "Bearer b")],
            {},
            "duplicate Authorization header",
        ),
        (
            [
                ("sec-websocket-protocol", "bearer, t1"),
                ("authorization", "Bearer a"),
                ("authorization", "Bearer a"),
            ],
            {},
            "duplicate Authorization header",
        ),
        ([("sec-websocket-protocol", "bearer, a, bearer, b")], {}, "duplicate bearer subprotocol"),
        ([("sec-websocket-protocol", "v1, bearer")], {}, "bearer subprotocol without a token"),
        ([("sec-websocket-protocol", "bearer, ")], {}, "bearer subprotocol without a token"),
        ([("authorization", "Bearer ")], {}, "empty bearer token"),
        ([], {"token": ["a", "b"]}, "duplicate token parameter"),
    ],
)
def test_ambiguous_or_empty_credentials(
    headers: list[tuple[str, str]], query: dict[str, list[str]], message: str
) -> None:
    with pytest.raises(AuthError) as info:
        extract(headers, query)
    assert (info.value.code, info.value.message) == ("XYW005", message)


def test_extracted_token_verifies_end_to_end() -> None:
    token = sign(claims())
    found, source = extract([("sec-websocket-protocol", f"bearer, {token}")])
    assert source == "subprotocol"
    assert found is not None
    assert verify_by_kid(found, KeySet.from_pem(RSA_PUB.decode())).sub == "alice"


def test_non_canonical_signature_encoding_is_rejected() -> None:
    # 256 signature bytes leave 4 spare bits in the last base64url character:
    # a different character with the same leading bits decodes to the same bytes.
    token = sign(claims())
    head, body, sig = token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(sig[-1])
    twin = alphabet[last ^ 0b0001]
    assert base64.urlsafe_b64decode(sig[:-1] + twin + "==") == base64.urlsafe_b64decode(sig + "==")
    assert rejects(f"{head}.{body}.{sig[:-1]}{twin}") == "invalid signature"
