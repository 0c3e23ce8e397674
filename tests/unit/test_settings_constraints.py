"""Single-field rules are msgspec ``Meta`` constraints; their errors name what the user typed.

One bad value per constrained field, set through the environment name the README
documents: the error names the setting, states the rule, and names the variable.
"""

from __future__ import annotations

import typing
from pathlib import Path

import msgspec
import pytest

from fanout import settings

BASE = {"JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----"}

LOWER_BOUNDS = [
    ("FANOUT_SERVER_PORT", "0", "server.port", "must be 1..65535"),
    ("FANOUT_ADMIN_PORT", "-1", "admin.port", "must be 0..65535 (0 = off)"),
    ("FANOUT_SERVER_WORKERS", "-1", "server.workers", "must be >= 0 (0 = one per CPU)"),
    ("FANOUT_SERVER_MAX_CONNECTIONS", "0", "server.max_connections", "must be > 0"),
    ("FANOUT_SERVER_FD_HEADROOM", "15", "server.fd_headroom", "must be >= 16"),
    (
        "FANOUT_SERVER_HANDSHAKE_RATE_PER_IP",
        "-1",
        "server.handshake_rate_per_ip",
        "must be >= 0 (0 = off)",
    ),
    (
        "FANOUT_SERVER_HANDSHAKE_BURST_PER_IP",
        "0.5",
        "server.handshake_burst_per_ip",
        "must be >= 1",
    ),
    ("FANOUT_SERVER_SHED_LOOP_LAG_S", "-0.1", "server.shed_loop_lag_s", "must be >= 0 (0 = off)"),
    ("FANOUT_SERVER_SHED_RSS_BYTES", "-1", "server.shed_rss_bytes", "must be >= 0 (0 = off)"),
    ("FANOUT_SERVER_SHED_RETRY_AFTER_S", "0", "server.shed_retry_after_s", "must be >= 1"),
    ("FANOUT_SERVER_HANDSHAKE_TIMEOUT_S", "0", "server.handshake_timeout_s", "must be > 0"),
    ("FANOUT_SERVER_GRACEFUL_TIMEOUT_S", "-1", "server.graceful_timeout_s", "must be >= 0"),
    ("FANOUT_SERVER_WORKER_TIMEOUT_S", "nan", "server.worker_timeout_s", "must be > 0"),
    ("FANOUT_SERVER_READY_QUORUM", "0", "server.ready_quorum", "must be in (0, 1]"),
    ("FANOUT_JWT_MAX_TOKEN_BYTES", "0", "jwt.max_token_bytes", "must be 1..65536"),
    ("FANOUT_JWT_MAX_LIFETIME_S", "0", "jwt.max_lifetime_s", "must be > 0"),
    ("FANOUT_WS_MAX_SUBS", "0", "ws.max_subs", "must be > 0"),
    ("FANOUT_WS_MAX_FRAME_BYTES", "15", "ws.max_frame_bytes", "must be 16..67108864"),
    ("FANOUT_WS_INBOUND_RATE", "0", "ws.inbound_rate", "must be > 0"),
    ("FANOUT_WS_INBOUND_BURST", "0.5", "ws.inbound_burst", "must be >= 1"),
    ("FANOUT_OUTBOX_MAX_MESSAGES", "0", "outbox.max_messages", "must be > 0"),
    ("FANOUT_OUTBOX_MAX_BYTES", "-5", "outbox.max_bytes", "must be > 0"),
    ("FANOUT_OUTBOX_WRITE_TIMEOUT_S", "0", "outbox.write_timeout_s", "must be > 0"),
    ("FANOUT_OUTBOX_MAX_BATCH", "0", "outbox.max_batch", "must be > 0"),
    ("FANOUT_DEMO_INTERVAL_S", "0", "demo.interval_s", "must be > 0"),
    ("FANOUT_REQUESTS_MAX_IN_FLIGHT", "0", "requests.max_in_flight", "must be > 0"),
    ("FANOUT_REQUESTS_RATE", "0", "requests.rate", "must be > 0"),
    ("FANOUT_REQUESTS_BURST", "0.5", "requests.burst", "must be >= 1"),
    ("FANOUT_REQUESTS_MAX_PRINCIPALS", "0", "requests.max_principals", "must be > 0"),
    ("FANOUT_REQUESTS_DEFAULT_TIMEOUT_MS", "0", "requests.default_timeout_ms", "must be > 0"),
    ("FANOUT_REQUESTS_BREAKER_FAILURES", "0", "requests.breaker_failures", "must be > 0"),
    ("FANOUT_REQUESTS_BREAKER_RESET_S", "0", "requests.breaker_reset_s", "must be > 0"),
    ("FANOUT_REQUESTS_MAX_BREAKERS", "0", "requests.max_breakers", "must be > 0"),
]

UPPER_BOUNDS = [
    ("FANOUT_SERVER_PORT", "65536", "server.port", "must be 1..65535"),
    ("FANOUT_ADMIN_PORT", "65536", "admin.port", "must be 0..65535 (0 = off)"),
    ("FANOUT_SERVER_READY_QUORUM", "1.5", "server.ready_quorum", "must be in (0, 1]"),
    ("FANOUT_JWT_MAX_TOKEN_BYTES", "65537", "jwt.max_token_bytes", "must be 1..65536"),
    (
        "FANOUT_WS_MAX_FRAME_BYTES",
        str((64 << 20) + 1),
        "ws.max_frame_bytes",
        "must be 16..67108864",
    ),
    ("FANOUT_REQUESTS_MAX_TIMEOUT_MS", "300001", "requests.max_timeout_ms", "must be <= 300000"),
]

PATTERNS = [
    ("FANOUT_WS_PATH", "ws", "ws.path", "must be a path starting with '/'"),
    (
        "NATS_URLS",
        "nats://a:4222,http://b",
        "nats.urls",
        "'http://b': must be a nats://, tls://, ws:// or wss:// URL",
    ),
    (
        "FANOUT_NATS_URLS",
        "b:4222",
        "nats.urls",
        "'b:4222': must be a nats://, tls://, ws:// or wss:// URL",
    ),
    (
        "WS_ALLOWED_ORIGINS",
        "https://a.example,example.com",
        "ws.allowed_origins",
        "'example.com': must be scheme://host[:port] or '*'",
    ),
    (
        "FANOUT_JWT_ALGORITHMS",
        "RS256,None",
        "jwt.algorithms",
        "'None': must be a signing algorithm; 'none' never is",
    ),
    (
        "FANOUT_REQUESTS_ALLOWED_HEADERS",
        "X-Tenant,X:Tenant",
        "requests.allowed_headers",
        "'X:Tenant': must be a header name (an RFC 9110 token)",
    ),
]

LENGTHS = [
    ("WS_SUBJECT_WHITELIST", " , ", "ws.subject_whitelist", "must not be empty"),
    ("FANOUT_WS_SUBJECT_WHITELIST", "", "ws.subject_whitelist", "must not be empty"),
]

NOT_NUMBERS = [
    ("FANOUT_SERVER_PORT", "80a", "server.port", "expected an integer, got '80a'"),
    ("FANOUT_WS_MAX_SUBS", "1.5", "ws.max_subs", "expected an integer, got '1.5'"),
    ("FANOUT_WS_INBOUND_RATE", "fast", "ws.inbound_rate", "expected a number, got 'fast'"),
]

CASES = LOWER_BOUNDS + UPPER_BOUNDS + PATTERNS + LENGTHS + NOT_NUMBERS


def _refused(environ: dict[str, str]) -> settings.ConfigError:
    with pytest.raises(settings.ConfigError) as err:
        settings.load(environ=BASE | environ, check_files=False)
    return err.value


@pytest.mark.parametrize(
    ("env", "raw", "field", "message"),
    CASES,
    ids=[f"{env}={raw}" for env, raw, _, _ in CASES],
)
def test_a_bad_value_names_the_setting_the_rule_and_the_variable(
    env: str, raw: str, field: str, message: str
) -> None:
    error = _refused({env: raw})
    assert (error.field, error.message, error.source) == (field, message, env)
    assert str(error) == f"invalid config: {field}: {message} (from {env})"


def _constrained(tp: object) -> bool:
    args = typing.get_args(tp)
    return any(isinstance(a, msgspec.Meta) or _constrained(a) for a in args)


def test_every_constrained_field_has_a_case() -> None:
    """A new ``Meta`` on a setting needs a row above, so its message is seen once."""
    constrained = {path for path, tp in settings.FIELD_TYPES.items() if _constrained(tp)}
    covered = {field for _, _, field, _ in LOWER_BOUNDS + UPPER_BOUNDS + PATTERNS + LENGTHS}
    assert constrained == covered


def test_the_value_in_range_passes() -> None:
    s = settings.load(
        environ=BASE
        | {
            "FANOUT_SERVER_PORT": "65535",
            "FANOUT_SERVER_READY_QUORUM": "1",
            "FANOUT_WS_MAX_FRAME_BYTES": "16",
            "WS_ALLOWED_ORIGINS": "*,http://a.example",
            "FANOUT_JWT_ALGORITHMS": "RS256,EdDSA",
        }
    )
    assert (s.server.port, s.server.ready_quorum, s.ws.max_frame_bytes) == (65535, 1.0, 16)
    assert s.ws.allowed_origins == ["*", "http://a.example"]


def test_a_star_is_an_origin_only_alone() -> None:
    error = _refused({"WS_ALLOWED_ORIGINS": "*.example.com"})
    assert error.message == "'*.example.com': must be scheme://host[:port] or '*'"


def test_the_generic_name_wins_over_the_seed_name_and_is_the_one_named() -> None:
    error = _refused({"NATS_URLS": "nats://a:4222", "FANOUT_NATS_URLS": "http://b"})
    assert (error.field, error.source) == ("nats.urls", "FANOUT_NATS_URLS")


def test_a_url_in_an_error_has_no_credentials() -> None:
    error = _refused({"NATS_URLS": "http://alice:s3cret@b:4222"})
    assert error.message.startswith("'http://<redacted>@b:4222': must be a nats://")
    assert "s3cret" not in str(error) and "alice" not in str(error)


# -- where the value came from: the file, the command line, code rules ---------------------------


def test_a_value_from_the_file_is_named_by_its_dotted_key_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "fanout.toml"
    path.write_text('[server]\nport = 0\n[jwt]\npublic_key = "k"\n')
    with pytest.raises(settings.ConfigError) as err:
        settings.load(path, environ={}, check_files=False)
    assert (err.value.field, err.value.source) == ("server.port", str(path))
    assert str(err.value) == f"invalid config: server.port: must be 1..65535 (from {path})"
    path.write_text('[jwt]\npublic_key = "k"\nalgorithms = ["RS256", "none"]\n')
    with pytest.raises(settings.ConfigError) as err:
        settings.load(path, environ={}, check_files=False)
    assert err.value.message == "'none': must be a signing algorithm; 'none' never is"
    path.write_text('[ws]\nmax_subs = "many"\n[jwt]\npublic_key = "k"\n')
    with pytest.raises(settings.ConfigError) as err:
        settings.load(path, environ={}, check_files=False)
    assert (err.value.message, err.value.source) == ("expected an integer, got 'many'", str(path))


def test_the_environment_names_a_value_that_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "fanout.toml"
    path.write_text('[server]\nport = 8080\n[jwt]\npublic_key = "k"\n')
    with pytest.raises(settings.ConfigError) as err:
        settings.load(path, environ={"FANOUT_SERVER_PORT": "0"}, check_files=False)
    assert err.value.source == "FANOUT_SERVER_PORT"


def test_a_value_from_the_command_line_says_so() -> None:
    with pytest.raises(settings.ConfigError) as err:
        settings.load(environ=BASE, overrides={"server.port": 70000}, check_files=False)
    assert str(err.value) == "invalid config: server.port: must be 1..65535 (from the command line)"


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"WS_SUBJECT_WHITELIST": "a.>.b"}, "ws.subject_whitelist"),
        ({"FANOUT_REQUESTS_ALLOWED_HEADERS": "Fanout-Principal"}, "requests.allowed_headers"),
        ({"FANOUT_REQUESTS_BREAKER_TIMEOUT_FLOOR_MS": "0"}, "requests.breaker_timeout_floor_ms"),
        ({"FANOUT_SERVER_TRUSTED_PROXIES": "10.0.0.0/8,proxy"}, "server.trusted_proxies"),
        ({"FANOUT_TLS_CERT": "/c.pem"}, "tls.cert"),
        ({"FANOUT_ADMIN_PORT": "8080"}, "admin.port"),
    ],
)
def test_rules_checked_in_code_name_the_variable_too(env: dict[str, str], field: str) -> None:
    error = _refused(env)
    assert (error.field, error.source) == (field, next(iter(env)))
    assert str(error).endswith(f" (from {next(iter(env))})")


def test_a_rule_about_a_setting_nobody_set_names_no_source() -> None:
    with pytest.raises(settings.ConfigError) as err:
        settings.load(environ={"FANOUT_JWT_ISSUER": "iss"})
    assert (err.value.field, err.value.source) == ("jwt.public_key", None)
    assert str(err.value).endswith("(or ws.auth_required = false)")


def test_a_header_name_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    """msgspec searches a pattern: ``$`` would match before the newline, ``\\Z`` does not."""
    path = tmp_path / "fanout.toml"
    path.write_text('[jwt]\npublic_key = "k"\n[requests]\nallowed_headers = ["X-A\\n"]\n')
    with pytest.raises(settings.ConfigError) as err:
        settings.load(path, environ={}, check_files=False)
    assert err.value.field == "requests.allowed_headers"
    assert err.value.message == "'X-A\\n': must be a header name (an RFC 9110 token)"
