"""Configuration: TOML + environment, the short names, errors that name the field."""

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
    s = settings.load(environ=env, check_files=False)
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
    seed = "SU" + "A" * 56
    s = settings.load(
        environ={"JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----", "NATS_NKEY_SEED": seed}
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
        ({"FANOUT_SERVER_PROT": "1"}, "FANOUT_SERVER_PROT"),
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
    assert settings.load(good, environ={}, check_files=False).server.port == 9100
    env = {"FANOUT_SERVER_PORT": "9200"}
    assert settings.load(good, environ=env, check_files=False).server.port == 9200
    bad = tmp_path / "b.toml"
    bad.write_text("[server]\nprot = 1\n")
    with pytest.raises(settings.ConfigError) as err:
        settings.load(bad, environ={})
    assert err.value.field == "server.prot"
    section = tmp_path / "d.toml"
    section.write_text("[nope]\nx = 1\n")
    with pytest.raises(settings.ConfigError) as err:
        settings.load(section, environ={})
    assert (err.value.field, err.value.message) == ("nope", "unknown setting")
    broken = tmp_path / "c.toml"
    broken.write_text("[server\n")
    with pytest.raises(settings.ConfigError) as err:
        settings.load(broken, environ={})
    assert err.value.field == "--config"


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.toml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path: Path) -> None:
    """Structure only: the files they name live on the production hosts."""
    settings.load(path, environ={}, check_files=False)


# -- environment: unknown FANOUT_* variables ------------------------------------------------


def test_unknown_fanout_variables_outside_the_settings_only_warn() -> None:
    """Other tools share the prefix (FANOUT_LOCUST_KEY): a warning, never a refusal to start."""
    warnings: list[str] = []
    env = {"JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----", "FANOUT_LOCUST_KEY": "/k.pem"}
    env |= {"FANOUT_GATEWAY_NKEY": "x", "FANOUT_": "y", "FANOUT_SERVER_PORT": "9001"}
    s = settings.load(environ=env, warn=warnings.append)
    assert s.server.port == 9001
    assert warnings == [
        "FANOUT_ is not a fanout setting; ignored",
        "FANOUT_GATEWAY_NKEY is not a fanout setting; ignored",
        "FANOUT_LOCUST_KEY is not a fanout setting; ignored",
    ]


def test_internal_fanout_variables_neither_warn_nor_fail() -> None:
    warnings: list[str] = []
    env = {"JWT_PUBLIC_KEY": "-----BEGIN", "FANOUT_GENERATION": "3", "FANOUT_CONFIG": ""}
    settings.load(environ=env, warn=warnings.append)
    assert warnings == []


def test_a_typo_inside_a_known_section_names_the_variable_and_the_likely_field() -> None:
    with pytest.raises(settings.ConfigError) as err:
        settings.load(environ={"JWT_PUBLIC_KEY": "k", "FANOUT_SERVER_PROT": "9000"})
    assert err.value.field == "FANOUT_SERVER_PROT"
    assert err.value.message == "no setting server.prot (did you mean server.port?)"
    with pytest.raises(settings.ConfigError) as err:
        settings.load(environ={"JWT_PUBLIC_KEY": "k", "FANOUT_OUTBOX_ZZZZZ": "1"})
    assert err.value.message == "no setting outbox.zzzzz"


# -- enum settings list their values ---------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "field", "values"),
    [
        ({"FANOUT_OUTBOX_POLICY": "keep_all"}, "outbox.policy", "drop_oldest, latest, disconnect"),
        ({"FANOUT_LOG_LEVEL": "verbose"}, "log.level", "debug, info, warning, error"),
        ({"FANOUT_TLS_MIN_VERSION": "1.1"}, "tls.min_version", "1.2, 1.3"),
        (
            {"FANOUT_OUTBOX_POLICIES": '{"xy.md.>": "keep"}'},
            "outbox.policies",
            "drop_oldest, latest, disconnect",
        ),
        (
            {"FANOUT_REQUESTS_INTERCEPTORS": "acl,deadline,tracing,magic"},
            "requests.interceptors",
            "acl, rate_limit, circuit_breaker, deadline, tracing",
        ),
    ],
)
def test_enum_errors_list_the_valid_values(env: dict[str, str], field: str, values: str) -> None:
    with pytest.raises(settings.ConfigError) as err:
        settings.load(environ={"JWT_PUBLIC_KEY": "k", **env})
    assert err.value.field == field
    assert err.value.message.endswith(f"; valid values: {values}"), err.value.message


# -- URL credentials are redacted -------------------------------------------------------------


def test_redacted_hides_userinfo_of_every_url_setting() -> None:
    s = settings.load(
        environ={
            "NATS_URLS": "nats://alice:s3cret@a:4222,nats://t0ken@b:4222,tls://c:4222",
            "JWT_JWKS_URL": "https://svc:pa55@id.example/jwks.json?x=1",
            "WS_ALLOWED_ORIGINS": "https://u:origin-pw@app.example",
        }
    )
    tree = settings.redacted(s)
    assert tree["nats"]["urls"] == [
        "nats://<redacted>@a:4222",
        "nats://<redacted>@b:4222",
        "tls://c:4222",
    ]
    assert tree["jwt"]["jwks_url"] == "https://<redacted>@id.example/jwks.json?x=1"
    assert tree["ws"]["allowed_origins"] == ["https://<redacted>@app.example"]
    text = repr(tree)
    for secret in ("s3cret", "t0ken", "pa55", "origin-pw", "alice"):
        assert secret not in text
    assert s.nats.urls[0] == "nats://alice:s3cret@a:4222", "the settings themselves keep it"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://u:p@ss@host:4222", "nats://<redacted>@host:4222"),
        ("nats://u:pw@[::1", "nats://<redacted>@[::1"),
        ("wss://tok@h/path?q=a@b", "wss://<redacted>@h/path?q=a@b"),
        ("https://h/p@x", "https://h/p@x"),
        ("alice@example.com", "alice@example.com"),
    ],
)
def test_redact_url_edge_cases(url: str, shown: str) -> None:
    assert settings.redact_url(url) == shown


# -- files named by settings must be readable -------------------------------------------------

FILE_SETTINGS = [
    ("tls.cert", {"FANOUT_TLS_CERT": "{missing}", "FANOUT_TLS_KEY": "{real}"}),
    ("tls.key", {"FANOUT_TLS_CERT": "{real}", "FANOUT_TLS_KEY": "{missing}"}),
    ("nats.tls_ca", {"NATS_TLS_CA": "{missing}"}),
    ("nats.tls_cert", {"NATS_TLS_CERT": "{missing}", "NATS_TLS_KEY": "{real}"}),
    ("nats.tls_key", {"NATS_TLS_CERT": "{real}", "NATS_TLS_KEY": "{missing}"}),
    ("nats.creds", {"NATS_CREDS": "{missing}"}),
    ("jwt.public_key", {"JWT_PUBLIC_KEY": "{missing}"}),
    ("jwt.denylist_path", {"FANOUT_JWT_DENYLIST_PATH": "{missing}"}),
]


@pytest.mark.parametrize(("field", "env"), FILE_SETTINGS, ids=[f for f, _ in FILE_SETTINGS])
def test_a_missing_file_names_the_setting_and_the_path(
    field: str, env: dict[str, str], tmp_path: Path
) -> None:
    real, missing = tmp_path / "real.pem", tmp_path / "no" / "such.pem"
    real.write_text("-----BEGIN PUBLIC KEY-----\n")
    environ = {"JWT_PUBLIC_KEY": str(real)}
    environ |= {k: v.format(real=real, missing=missing) for k, v in env.items()}
    with pytest.raises(settings.ConfigError) as err:
        settings.load(environ=environ)
    assert err.value.field == field
    assert err.value.message == f"cannot read {missing}: No such file or directory"
    assert settings.load(environ=environ, check_files=False)


def test_a_directory_or_unreadable_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(settings.ConfigError) as err:
        settings.load(environ={"JWT_PUBLIC_KEY": str(tmp_path)})
    assert (err.value.field, err.value.message) == (
        "jwt.public_key",
        f"cannot read {tmp_path}: Is a directory",
    )


def test_nkey_seed_is_a_seed_or_a_readable_file_and_never_echoed(tmp_path: Path) -> None:
    seed = "SU" + "A" * 56
    base = {"JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----"}
    assert settings.load(environ=base | {"NATS_NKEY_SEED": seed}).nats.nkey_seed == seed
    seed_file = tmp_path / "user.nk"
    seed_file.write_text(seed)
    settings.load(environ=base | {"NATS_NKEY_SEED": str(seed_file)})
    for bad in ("SUnot-a-seed-secret", str(tmp_path / "missing.nk")):
        with pytest.raises(settings.ConfigError) as err:
            settings.load(environ=base | {"NATS_NKEY_SEED": bad})
        assert err.value.field == "nats.nkey_seed"
        assert err.value.message == "neither a readable file nor an NKey seed (S...)"


def test_inline_pem_public_key_is_not_a_path() -> None:
    s = settings.load(environ={"JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----\\nMFkw"})
    assert s.jwt.public_key.startswith("-----BEGIN")


# -- [history]: recovery over JetStream ---------------------------------------------------------


def test_history_defaults() -> None:
    h = settings.load(environ={"FANOUT_WS_AUTH_REQUIRED": "false"}).history
    assert (h.streams, h.max_replay, h.window_messages, h.window_s) == ({}, 1000, 1000, 60.0)


def test_history_streams_from_env_pairs_and_json() -> None:
    env = {
        "FANOUT_WS_AUTH_REQUIRED": "false",
        "FANOUT_HISTORY_STREAMS": "xy.md.>=MD, orders.>=ORDERS",
    }
    assert settings.load(environ=env).history.streams == {"xy.md.>": "MD", "orders.>": "ORDERS"}
    env["FANOUT_HISTORY_STREAMS"] = '{"xy.md.>": "MD"}'
    assert settings.load(environ=env).history.streams == {"xy.md.>": "MD"}
    env = {"FANOUT_WS_AUTH_REQUIRED": "false", "FANOUT_HISTORY_MAX_REPLAY": "50"}
    env["FANOUT_HISTORY_WINDOW_MESSAGES"] = "10"
    env["FANOUT_HISTORY_WINDOW_S"] = "5"
    h = settings.load(environ=env).history
    assert (h.max_replay, h.window_messages, h.window_s) == (50, 10, 5.0)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("xy.md.>", "expected a JSON object or key=value pairs, got 'xy.md.>'"),
        ("xy.md.>=", "expected a JSON object or key=value pairs, got 'xy.md.>='"),
        ("xy..md=MD", "'xy..md': empty token at position 2"),
        ("xy.md.>=M.D", "'M.D' is not a JetStream stream name"),
        ("xy.md.>=M D", "'M D' is not a JetStream stream name"),
    ],
)
def test_history_streams_errors_name_the_setting(value: str, message: str) -> None:
    with pytest.raises(settings.ConfigError) as err:
        settings.load(environ={"FANOUT_WS_AUTH_REQUIRED": "false", "FANOUT_HISTORY_STREAMS": value})
    assert err.value.field == "history.streams"
    assert err.value.message == message


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"FANOUT_HISTORY_MAX_REPLAY": "0"}, "history.max_replay"),
        ({"FANOUT_HISTORY_MAX_REPLAY": "100001"}, "history.max_replay"),
        ({"FANOUT_HISTORY_WINDOW_MESSAGES": "-1"}, "history.window_messages"),
        ({"FANOUT_HISTORY_WINDOW_S": "-1"}, "history.window_s"),
    ],
)
def test_history_bounds(env: dict[str, str], field: str) -> None:
    with pytest.raises(settings.ConfigError) as err:
        settings.load(environ={"FANOUT_WS_AUTH_REQUIRED": "false", **env})
    assert err.value.field == field
