"""The ``requests`` settings section (protocol v1.1): defaults, environment names, validation."""

from __future__ import annotations

import pytest

from fanout import settings

DEMO = {"demo.enabled": True}


def load(
    env: dict[str, str] | None = None, overrides: dict[str, object] | None = None
) -> settings.Settings:
    return settings.load(environ=env or {}, overrides=DEMO | (overrides or {}))


def test_defaults_keep_requests_off() -> None:
    r = load().requests
    assert r.whitelist == []
    assert (r.max_in_flight, r.rate, r.burst) == (100, 50.0, 100.0)
    assert (r.default_timeout_ms, r.max_timeout_ms) == (5000, 30000)
    assert (r.breaker_failures, r.breaker_reset_s) == (5, 10.0)
    assert r.breaker_timeout_floor_ms == 1000
    assert r.forward_token is False and r.allowed_headers == []
    assert r.interceptors == ["acl", "rate_limit", "circuit_breaker", "deadline", "tracing"]


def test_environment_names() -> None:
    r = load(
        {
            "WS_REQUEST_WHITELIST": "svc.orders.>, svc.users.*.get",
            "FANOUT_REQUESTS_FORWARD_TOKEN": "true",
            "FANOUT_REQUESTS_RATE": "5",
            "FANOUT_REQUESTS_ALLOWED_HEADERS": "X-Tenant,X-Request-Source",
            "FANOUT_REQUESTS_INTERCEPTORS": "tracing,acl,deadline",
        }
    ).requests
    assert r.whitelist == ["svc.orders.>", "svc.users.*.get"]
    assert r.forward_token is True and r.rate == 5.0
    assert r.allowed_headers == ["X-Tenant", "X-Request-Source"]
    assert r.interceptors == ["tracing", "acl", "deadline"]
    assert settings.SHORT_ENV["WS_REQUEST_WHITELIST"] == "requests.whitelist"


@pytest.mark.parametrize(
    ("overrides", "field", "fragment"),
    [
        ({"requests.whitelist": ["svc..x"]}, "requests.whitelist", "empty token"),
        ({"requests.max_in_flight": 0}, "requests.max_in_flight", "> 0"),
        ({"requests.rate": 0}, "requests.rate", "> 0"),
        ({"requests.burst": 0.5}, "requests.burst", ">= 1"),
        ({"requests.default_timeout_ms": 0}, "requests.default_timeout_ms", "> 0"),
        (
            {"requests.default_timeout_ms": 9000, "requests.max_timeout_ms": 8000},
            "requests.max_timeout_ms",
            "between",
        ),
        ({"requests.max_timeout_ms": 600_000}, "requests.max_timeout_ms", "300000"),
        ({"requests.breaker_failures": 0}, "requests.breaker_failures", "> 0"),
        ({"requests.breaker_reset_s": 0}, "requests.breaker_reset_s", "> 0"),
        (
            {"requests.breaker_timeout_floor_ms": 0},
            "requests.breaker_timeout_floor_ms",
            "between 1 and",
        ),
        (
            {"requests.breaker_timeout_floor_ms": 6000},
            "requests.breaker_timeout_floor_ms",
            "requests.default_timeout_ms",
        ),
        ({"requests.allowed_headers": ["Fanout-Principal"]}, "requests.allowed_headers", "gateway"),
        ({"requests.allowed_headers": ["authorization"]}, "requests.allowed_headers", "gateway"),
        ({"requests.allowed_headers": ["Traceparent"]}, "requests.allowed_headers", "gateway"),
        (
            {"requests.allowed_headers": ["X Tenant"]},
            "requests.allowed_headers",
            "'X Tenant': must be a header name",
        ),
        ({"requests.interceptors": ["acl", "deadline"]}, "requests.interceptors", "tracing"),
        (
            {"requests.interceptors": ["acl", "acl", "deadline", "tracing"]},
            "requests.interceptors",
            "twice",
        ),
    ],
)
def test_validation_names_the_field(
    overrides: dict[str, object], field: str, fragment: str
) -> None:
    with pytest.raises(settings.ConfigError) as err:
        load(overrides=overrides)
    assert err.value.field == field
    assert fragment in err.value.message


def test_unknown_interceptor_name() -> None:
    with pytest.raises(settings.ConfigError) as err:
        load({"FANOUT_REQUESTS_INTERCEPTORS": "acl,deadline,tracing,magic"})
    assert err.value.field.startswith("requests.interceptors")
