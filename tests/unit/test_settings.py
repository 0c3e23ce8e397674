"""Configuration: TOML + environment, the seed's names, errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from fanout import settings

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_need_a_key_unless_demo() -> None:
    with pytest.raises(settings.ConfigError) as err:
        settings.load(environ={})
    assert err.value.field == "jwt.public_key"
    s = settings.load(environ={}, overrides={"demo.enabled": True})
    assert s.ws.subject_whitelist == ["xy.md.>"]
    assert s.outbox.max_messages == 1000 and s.outbox.max_bytes == 1 << 20


def test_seed_environment_names() -> None:
    env = {
        "NATS_URLS": "nats://a:4222, tls://b:4222",
        "NATS_TLS_CA": "/ca.pem",
        "NATS_TLS_CERT": "/c.pem",
        "NATS_TLS_KEY": "/k.pem",
        "NATS_CREDS": "/g.creds",
        "JWT_JWKS_URL": "https://id/jwks.json",
        "JWT_ISSUER": "iss",
        "JWT_AUDIENCE": "aud",
        "WS_ALLOWED_ORIGINS": "https://a.example,https://b.example",
        "WS_SUBJECT_WHITELIST": "xy.md.>,orders.*.x",
    }
    s = settings.load(environ=env)
    assert s.nats.urls == ["nats://a:4222", "tls://b:4222"]
    assert (s.nats.tls_ca, s.nats.tls_cert, s.nats.tls_key, s.nats.creds) == (
        "/ca.pem",
        "/c.pem",
        "/k.pem",
        "/g.creds",
    )
    assert s.jwt.jwks_url == "https://id/jwks.json"
    assert (s.jwt.issuer, s.jwt.audience) == ("iss", "aud")
    assert s.ws.allowed_origins == ["https://a.example", "https://b.example"]
    assert s.ws.subject_whitelist == ["xy.md.>", "orders.*.x"]


def test_public_key_and_nkey_seed_names() -> None:
    s = settings.load(
        environ={"JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----", "NATS_NKEY_SEED": "SUAB"}
    )
    assert s.jwt.public_key.startswith("-----BEGIN")
    assert settings.redacted(s)["nats"]["nkey_seed"] == "<redacted>"


def test_generic_env_names_and_types() -> None:
    s = settings.load(
        environ={
            "FANOUT_SERVER_PORT": "9000",
            "FANOUT_WS_AUTH_REQUIRED": "false",
            "FANOUT_OUTBOX_POLICIES": '{"xy.md.tick.>": "latest"}',
        }
    )
    assert s.server.port == 9000 and s.ws.auth_required is False
    assert s.outbox.policies == {"xy.md.tick.>": "latest"}


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"FANOUT_SERVER_PORT": "abc"}, "server.port"),
        ({"FANOUT_SERVER_PORT": "0"}, "server.port"),
        ({"FANOUT_WS_AUTH_REQUIRED": "maybe"}, "ws.auth_required"),
        ({"FANOUT_NOPE_X": "1"}, "FANOUT_NOPE_X"),
        ({"WS_SUBJECT_WHITELIST": "xy.md.\r\n"}, "ws.subject_whitelist"),
        ({"WS_SUBJECT_WHITELIST": "a.>.b"}, "ws.subject_whitelist"),
        ({"NATS_URLS": "http://x"}, "nats.urls"),
        ({"WS_ALLOWED_ORIGINS": "example.com"}, "ws.allowed_origins"),
        ({"FANOUT_OUTBOX_POLICY": "keep_all"}, "outbox.policy"),
        ({"FANOUT_JWT_ALGORITHMS": "none"}, "jwt.algorithms"),
        ({"NATS_CREDS": "/a", "NATS_NKEY_SEED": "SU"}, "nats.creds"),
    ],
)
def test_errors_name_the_field(env: dict[str, str], field: str) -> None:
    with pytest.raises(settings.ConfigError) as err:
        settings.load(environ={"JWT_PUBLIC_KEY": "k", **env})
    assert err.value.field == field
    assert str(err.value).startswith(f"invalid config: {field}: ")


def test_toml_file_and_unknown_keys(tmp_path: Path) -> None:
    good = tmp_path / "a.toml"
    good.write_text('[server]\nport = 9100\n[jwt]\npublic_key = "k"\n')
    assert settings.load(good, environ={}).server.port == 9100
    assert settings.load(good, environ={"FANOUT_SERVER_PORT": "9200"}).server.port == 9200
    bad = tmp_path / "b.toml"
    bad.write_text("[server]\nprot = 1\n")
    with pytest.raises(settings.ConfigError) as err:
        settings.load(bad, environ={})
    assert err.value.field == "server.prot"
    broken = tmp_path / "c.toml"
    broken.write_text("[server\n")
    with pytest.raises(settings.ConfigError) as err:
        settings.load(broken, environ={})
    assert err.value.field == "--config"


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.toml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path: Path) -> None:
    settings.load(path, environ={})
