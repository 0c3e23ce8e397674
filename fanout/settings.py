"""The gateway's whole configuration: one typed object, validated once at start-up.

Sources, later wins: built-in defaults, a TOML file (``--config``), environment
variables (the origin story's names such as ``NATS_URLS`` and the generic
``FANOUT_<SECTION>_<FIELD>``), then command-line overrides. Every error names
the field it is about, so an operator can fix it from one line.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import sys
import tomllib
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from fanout.core.metadata import is_reserved, valid_header_name
from fanout.core.subjects import SubjectError, validate_pattern

Policy = Literal["drop_oldest", "latest", "disconnect"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "text"]


class ConfigError(Exception):
    """Invalid configuration; ``field`` is the dotted path of the offending setting."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"invalid config: {field}: {message}")
        self.field = field
        self.message = message


class Server(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "0.0.0.0"
    port: int = 8080
    workers: int = 0
    max_connections: int = 10_000
    max_connections_per_ip: int = 0
    max_connections_per_principal: int = 0
    #: Headroom kept below RLIMIT_NOFILE: max_connections is clamped to the fd limit minus this.
    fd_headroom: int = 128
    #: New WebSocket handshakes per second from one client address (0 = off), and the burst.
    #: Off by default: behind a NAT or an L4 balancer one address is many clients.
    handshake_rate_per_ip: float = 0.0
    handshake_burst_per_ip: float = 100.0
    #: Peers (IPs or CIDRs) whose X-Forwarded-For / X-Forwarded-Proto headers are believed.
    trusted_proxies: list[str] = msgspec.field(default_factory=list)
    #: Load shedding: refuse new handshakes (503 XYW007) and fail /readyz past either (0 = off).
    shed_loop_lag_s: float = 0.5
    shed_rss_bytes: int = 0
    shed_retry_after_s: int = 5
    handshake_timeout_s: float = 10.0
    max_request_head_bytes: int = 16_384
    graceful_timeout_s: float = 10.0
    worker_timeout_s: float = 30.0
    heartbeat_interval_s: float = 1.0
    ready_quorum: float = 1.0


class Tls(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    cert: str | None = None
    key: str | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"


class Nats(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    urls: list[str] = msgspec.field(default_factory=list)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    creds: str | None = None
    nkey_seed: str | None = None
    name: str = "fanout"
    connect_timeout_s: float = 2.0
    reconnect_wait_s: float = 0.5
    disconnect_clients_when_down: bool = False


class Jwt(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    public_key: str | None = None
    jwks_url: str | None = None
    issuer: str | None = None
    audience: str | None = None
    algorithms: list[str] = msgspec.field(
        default_factory=lambda: ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"]
    )
    max_token_bytes: int = 8192
    max_lifetime_s: int = 86_400
    leeway_s: int = 30
    subjects_claim: str = "subjects"
    requests_claim: str = "requests"
    cookie_name: str | None = None
    allow_query_token: bool = False
    query_token_max_lifetime_s: int = 60
    jwks_refetch_interval_s: float = 30.0
    jwks_refresh_s: float = 300.0
    expiring_lead_s: float = 60.0
    #: File of revoked token ids (``jti``), one per line; read at worker start (SIGHUP rolls).
    denylist_path: str | None = None


class Ws(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    path: str = "/ws"
    auth_required: bool = True
    allowed_origins: list[str] = msgspec.field(default_factory=list)
    require_origin: bool = False
    subject_whitelist: list[str] = msgspec.field(default_factory=lambda: ["xy.md.>"])
    allow_full_wildcard: bool = False
    max_subject_bytes: int = 256
    max_subs: int = 1000
    max_frame_bytes: int = 1 << 20
    inbound_rate: float = 100.0
    inbound_burst: float = 1000.0
    ping_interval_s: float = 20.0
    idle_timeout_s: float = 60.0


class Outbox(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    max_messages: int = 1000
    max_bytes: int = 1 << 20
    policy: Policy = "drop_oldest"
    policies: dict[str, Policy] = msgspec.field(default_factory=dict)
    write_buffer_high: int = 256 * 1024
    write_timeout_s: float = 10.0
    write_delay_ms: float = 0.0
    max_batch: int = 64


class Log(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    level: LogLevel = "info"
    #: ``auto``: text when stderr is a terminal (a person), else JSON lines (a log shipper).
    format: LogFormat = "auto"


class Demo(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = False
    interval_s: float = 0.5
    symbols: list[str] = msgspec.field(default_factory=lambda: ["demo", "btc", "eth", "sol"])


InterceptorName = Literal["acl", "rate_limit", "circuit_breaker", "deadline", "tracing"]


class Requests(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The ``request`` op (protocol v1.1): off while ``whitelist`` is empty."""

    whitelist: list[str] = msgspec.field(default_factory=list)
    max_in_flight: int = 100
    #: Requests per second per principal (anonymous: per client address), and the burst.
    rate: float = 50.0
    burst: float = 100.0
    max_principals: int = 10_000
    default_timeout_ms: int = 5_000
    max_timeout_ms: int = 30_000
    #: Consecutive failures (no responders, non-4xx service errors, timeouts) that open a
    #: subject's circuit.
    breaker_failures: int = 5
    #: A timeout counts as a failure only when the request waited at least this long: a
    #: shorter ``timeout_ms`` is the client's choice, not the service's fault.
    breaker_timeout_floor_ms: int = 1_000
    breaker_reset_s: float = 10.0
    max_breakers: int = 1_000
    #: Send the client's JWT as ``Authorization: Bearer`` so the service verifies it itself.
    forward_token: bool = False
    #: Client ``headers`` passed on besides correlationId, causationId, traceparent, tracestate.
    allowed_headers: list[str] = msgspec.field(default_factory=list)
    interceptors: list[InterceptorName] = msgspec.field(
        default_factory=lambda: ["acl", "rate_limit", "circuit_breaker", "deadline", "tracing"]
    )


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    server: Server = msgspec.field(default_factory=Server)
    tls: Tls = msgspec.field(default_factory=Tls)
    nats: Nats = msgspec.field(default_factory=Nats)
    jwt: Jwt = msgspec.field(default_factory=Jwt)
    ws: Ws = msgspec.field(default_factory=Ws)
    outbox: Outbox = msgspec.field(default_factory=Outbox)
    log: Log = msgspec.field(default_factory=Log)
    demo: Demo = msgspec.field(default_factory=Demo)
    requests: Requests = msgspec.field(default_factory=Requests)


#: The origin story's environment names → dotted setting paths.
SEED_ENV: dict[str, str] = {
    "NATS_URLS": "nats.urls",
    "NATS_TLS_CA": "nats.tls_ca",
    "NATS_TLS_CERT": "nats.tls_cert",
    "NATS_TLS_KEY": "nats.tls_key",
    "NATS_CREDS": "nats.creds",
    "NATS_NKEY_SEED": "nats.nkey_seed",
    "JWT_JWKS_URL": "jwt.jwks_url",
    "JWT_PUBLIC_KEY": "jwt.public_key",
    "JWT_ISSUER": "jwt.issuer",
    "JWT_AUDIENCE": "jwt.audience",
    "WS_ALLOWED_ORIGINS": "ws.allowed_origins",
    "WS_SUBJECT_WHITELIST": "ws.subject_whitelist",
    "WS_REQUEST_WHITELIST": "requests.whitelist",
}

#: Settings whose values are secrets: redacted by ``check-config`` and never logged.
SECRET_FIELDS = frozenset({"nats.nkey_seed", "tls.key", "nats.tls_key"})

#: Settings that name a file the gateway reads (``jwt.public_key`` may hold PEM text instead,
#: ``nats.nkey_seed`` the seed itself): checked at load so ``serve`` never fails on them later.
FILE_FIELDS = (
    "tls.cert",
    "tls.key",
    "nats.tls_ca",
    "nats.tls_cert",
    "nats.tls_key",
    "nats.creds",
    "nats.nkey_seed",
    "jwt.public_key",
    "jwt.denylist_path",
)

#: ``FANOUT_*`` variables that are not settings but belong to fanout itself.
INTERNAL_ENV = frozenset({"FANOUT_CONFIG", "FANOUT_GENERATION"})

_NKEY_SEED_RE = re.compile(r"S[A-Z][A-Z2-7]{56}")


def _field_types() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section in msgspec.structs.fields(Settings):
        for f in msgspec.structs.fields(section.type):
            out[f"{section.name}.{f.name}"] = f.type
    return out


FIELD_TYPES = _field_types()


def _env_value(path: str, raw: str) -> Any:
    """Turn an environment string into the shape the field wants (lists are comma separated)."""
    ftype = FIELD_TYPES[path]
    origin = getattr(ftype, "__origin__", None)
    if origin is list:
        return [part.strip() for part in raw.split(",") if part.strip()]
    if origin is dict:
        try:
            return msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise ConfigError(path, f"expected a JSON object: {exc}") from None
    if ftype is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(path, f"expected a boolean, got {raw!r}")
    if raw == "" and "None" in repr(ftype):
        return None
    return raw


def _warn_stderr(message: str) -> None:
    print(f"fanout: warning: {message}", file=sys.stderr)


_SECTIONS = frozenset(path.partition(".")[0] for path in FIELD_TYPES)


def env_overrides(
    environ: Mapping[str, str], warn: Callable[[str], None] = _warn_stderr
) -> dict[str, Any]:
    """Dotted-path overrides from the seed's names and ``FANOUT_SECTION_FIELD`` variables.

    Other tools share the prefix (``FANOUT_LOCUST_KEY``), so a variable outside every
    section is only warned about; inside a known section it is surely a typo and fails.
    """
    out: dict[str, Any] = {}
    for name, path in SEED_ENV.items():
        if name in environ:
            out[path] = _env_value(path, environ[name])
    for name in sorted(environ):
        if not name.startswith("FANOUT_") or name in INTERNAL_ENV:
            continue
        section, _, field = name[len("FANOUT_") :].lower().partition("_")
        path = f"{section}.{field}"
        if path in FIELD_TYPES:
            out[path] = _env_value(path, environ[name])
        elif section in _SECTIONS:
            raise ConfigError(name, f"no setting {path}{_did_you_mean(path)}")
        else:
            warn(f"{name} is not a fanout setting; ignored")
    return out


def _did_you_mean(path: str) -> str:
    close = difflib.get_close_matches(path, FIELD_TYPES, n=1, cutoff=0.8)
    return f" (did you mean {close[0]}?)" if close else ""


def _merge(tree: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    for path, value in overrides.items():
        section, _, field = path.partition(".")
        node = tree.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(section, "expected a table")
        node[field] = value


def _literal_values(tp: Any) -> list[str]:
    """The allowed values of every ``Literal`` inside a field's type (lists, dicts, optionals)."""
    if typing.get_origin(tp) is Literal:
        return [str(v) for v in typing.get_args(tp)]
    return [v for arg in typing.get_args(tp) for v in _literal_values(arg)]


def _error_path(exc: msgspec.ValidationError) -> tuple[str, str]:
    text = str(exc)
    message, sep, where = text.rpartition(" - at `$.")
    if not sep:
        message = text
    # msgspec writes list indexes as [3] and elides dict keys as [...]: name the setting.
    path = ".".join(re.split(r"[.\[]", where.rstrip("`"))[:2]) if sep else ""
    unknown = re.match(r"Object contains unknown field `([^`]+)`", message)
    if unknown:
        return ".".join(filter(None, (path, unknown.group(1)))), "unknown setting"
    if not sep:
        return "config", text
    values = _literal_values(FIELD_TYPES.get(path))
    if message.startswith("Invalid enum value") and values:
        message = f"{message}; valid values: {', '.join(values)}"
    return path, message


def load(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    check_files: bool = True,
    warn: Callable[[str], None] = _warn_stderr,
) -> Settings:
    """Build and validate the settings; raises :class:`ConfigError` naming the field.

    ``check_files=False`` checks structure only (example configs naming production paths).
    """
    environ = os.environ if environ is None else environ
    tree: dict[str, Any] = {}
    if path is None and environ.get("FANOUT_CONFIG"):
        path = environ["FANOUT_CONFIG"]
    if path is not None:
        try:
            tree = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
    _merge(tree, env_overrides(environ, warn))
    _merge(tree, overrides or {})
    try:
        settings = msgspec.convert(tree, Settings, strict=False)
    except msgspec.ValidationError as exc:
        field, message = _error_path(exc)
        raise ConfigError(field, message) from None
    validate(settings)
    if check_files:
        validate_files(settings)
    return settings


def _setting(s: Settings, path: str) -> Any:
    section, _, field = path.partition(".")
    return getattr(getattr(s, section), field)


def _unreadable(path: str) -> str | None:
    """Why ``path`` cannot be read (``None`` when it can)."""
    try:
        with open(path, "rb"):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def validate_files(s: Settings) -> None:
    """Every file a setting names exists and is readable now, by this user.

    Run by ``check-config``, ``serve`` and every SIGHUP reload, so a missing key file
    fails before any worker forks, naming the setting and the path.
    """
    for field in FILE_FIELDS:
        value = _setting(s, field)
        if not value or (field == "jwt.public_key" and "-----BEGIN" in value):
            continue
        if field == "nats.nkey_seed":
            # Never echo it: a mistyped seed is still a secret.
            _check(
                _NKEY_SEED_RE.fullmatch(value.strip()) is not None or not _unreadable(value),
                field,
                "neither a readable file nor an NKey seed (S...)",
            )
            continue
        why = _unreadable(value)
        _check(why is None, field, f"cannot read {value}: {why}")


def _check(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ConfigError(field, message)


def validate(s: Settings) -> None:
    """Cross-field rules that types alone cannot say."""
    _check(0 < s.server.port < 65536, "server.port", "must be 1..65535")
    _check(s.server.workers >= 0, "server.workers", "must be >= 0 (0 = one per CPU)")
    _check(s.server.max_connections > 0, "server.max_connections", "must be > 0")
    _check(s.server.fd_headroom >= 16, "server.fd_headroom", "must be >= 16")
    _check(s.server.handshake_timeout_s > 0, "server.handshake_timeout_s", "must be > 0")
    _check(s.server.handshake_rate_per_ip >= 0, "server.handshake_rate_per_ip", "must be >= 0")
    _check(s.server.handshake_burst_per_ip >= 1, "server.handshake_burst_per_ip", "must be >= 1")
    for proxy in s.server.trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError("server.trusted_proxies", f"{proxy!r} is not an IP or CIDR") from None
    _check(s.server.shed_loop_lag_s >= 0, "server.shed_loop_lag_s", "must be >= 0 (0 = off)")
    _check(s.server.shed_rss_bytes >= 0, "server.shed_rss_bytes", "must be >= 0 (0 = off)")
    _check(s.server.shed_retry_after_s >= 1, "server.shed_retry_after_s", "must be >= 1")
    _check(s.server.graceful_timeout_s >= 0, "server.graceful_timeout_s", "must be >= 0")
    _check(s.server.worker_timeout_s > 0, "server.worker_timeout_s", "must be > 0")
    _check(0 < s.server.ready_quorum <= 1, "server.ready_quorum", "must be in (0, 1]")
    _check(
        (s.tls.cert is None) == (s.tls.key is None), "tls.cert", "tls.cert and tls.key go together"
    )
    for url in s.nats.urls:
        _check(
            url.startswith(("nats://", "tls://", "ws://", "wss://")),
            "nats.urls",
            f"{url!r} is not a nats://, tls://, ws:// or wss:// URL",
        )
    _check(
        (s.nats.tls_cert is None) == (s.nats.tls_key is None),
        "nats.tls_cert",
        "NATS_TLS_CERT and NATS_TLS_KEY go together",
    )
    _check(
        not (s.nats.creds and s.nats.nkey_seed),
        "nats.creds",
        "set NATS_CREDS or NATS_NKEY_SEED, not both",
    )
    _check(
        not (s.jwt.public_key and s.jwt.jwks_url),
        "jwt.public_key",
        "set JWT_PUBLIC_KEY or JWT_JWKS_URL, not both",
    )
    if s.ws.auth_required and not s.demo.enabled:
        _check(
            bool(s.jwt.public_key or s.jwt.jwks_url),
            "jwt.public_key",
            "auth is required: set JWT_PUBLIC_KEY or JWT_JWKS_URL (or ws.auth_required = false)",
        )
    _check(
        all(a.upper() != "NONE" for a in s.jwt.algorithms),
        "jwt.algorithms",
        "'none' is never allowed",
    )
    _check(0 < s.jwt.max_token_bytes <= 65_536, "jwt.max_token_bytes", "must be 1..65536")
    _check(s.jwt.max_lifetime_s > 0, "jwt.max_lifetime_s", "must be > 0")
    _check(s.ws.path.startswith("/"), "ws.path", "must start with '/'")
    for origin in s.ws.allowed_origins:
        _check(
            origin == "*" or origin.startswith(("http://", "https://")),
            "ws.allowed_origins",
            f"{origin!r} must be scheme://host[:port] or '*'",
        )
    _check(bool(s.ws.subject_whitelist), "ws.subject_whitelist", "must not be empty")
    for pattern in s.ws.subject_whitelist:
        try:
            validate_pattern(pattern, s.ws.max_subject_bytes)
        except SubjectError as exc:
            raise ConfigError("ws.subject_whitelist", f"{pattern!r}: {exc}") from None
    for pattern in s.outbox.policies:
        try:
            validate_pattern(pattern, s.ws.max_subject_bytes)
        except SubjectError as exc:
            raise ConfigError("outbox.policies", f"{pattern!r}: {exc}") from None
    _check(16 <= s.ws.max_frame_bytes <= 64 << 20, "ws.max_frame_bytes", "must be 16..64 MiB")
    _check(s.ws.max_subs > 0, "ws.max_subs", "must be > 0")
    _check(s.ws.inbound_rate > 0, "ws.inbound_rate", "must be > 0")
    _check(s.ws.inbound_burst >= 1, "ws.inbound_burst", "must be >= 1")
    _check(s.outbox.max_messages > 0, "outbox.max_messages", "must be > 0")
    _check(s.outbox.max_bytes > 0, "outbox.max_bytes", "must be > 0")
    _check(s.outbox.max_batch > 0, "outbox.max_batch", "must be > 0")
    _check(s.outbox.write_timeout_s > 0, "outbox.write_timeout_s", "must be > 0")
    _check(s.demo.interval_s > 0, "demo.interval_s", "must be > 0")
    _validate_requests(s.requests, s.ws.max_subject_bytes)


def _validate_requests(r: Requests, max_subject_bytes: int) -> None:
    for pattern in r.whitelist:
        try:
            validate_pattern(pattern, max_subject_bytes)
        except SubjectError as exc:
            raise ConfigError("requests.whitelist", f"{pattern!r}: {exc}") from None
    _check(r.max_in_flight > 0, "requests.max_in_flight", "must be > 0")
    _check(r.rate > 0, "requests.rate", "must be > 0")
    _check(r.burst >= 1, "requests.burst", "must be >= 1")
    _check(r.max_principals > 0, "requests.max_principals", "must be > 0")
    _check(r.default_timeout_ms > 0, "requests.default_timeout_ms", "must be > 0")
    _check(
        r.default_timeout_ms <= r.max_timeout_ms <= 300_000,
        "requests.max_timeout_ms",
        "must be between requests.default_timeout_ms and 300000",
    )
    _check(r.breaker_failures > 0, "requests.breaker_failures", "must be > 0")
    _check(r.breaker_reset_s > 0, "requests.breaker_reset_s", "must be > 0")
    _check(
        0 < r.breaker_timeout_floor_ms <= r.default_timeout_ms,
        "requests.breaker_timeout_floor_ms",
        "must be between 1 and requests.default_timeout_ms",
    )
    _check(r.max_breakers > 0, "requests.max_breakers", "must be > 0")
    for name in r.allowed_headers:
        _check(valid_header_name(name), "requests.allowed_headers", f"{name!r} is not a name")
        _check(
            not is_reserved(name) and name.lower() not in ("traceparent", "tracestate"),
            "requests.allowed_headers",
            f"{name!r} is set by the gateway, never by a client",
        )
    _check(
        len(set(r.interceptors)) == len(r.interceptors),
        "requests.interceptors",
        "an interceptor is named twice",
    )
    missing = sorted({"acl", "deadline", "tracing"}.difference(r.interceptors))
    _check(not missing, "requests.interceptors", f"required interceptors missing: {missing}")


#: ``scheme://userinfo@``: userinfo ends at the last '@' before the path, query or fragment.
_URL_USERINFO_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")


def redact_url(value: str) -> str:
    """``nats://user:pw@host:4222`` → ``nats://<redacted>@host:4222``; other text unchanged.

    The whole userinfo goes: a NATS token URL carries its secret as the user name.
    A regular expression, not ``urlsplit``, so a malformed URL is redacted too.
    """
    return _URL_USERINFO_RE.sub(r"\1<redacted>@", value, count=1)


def _redact_urls(node: Any) -> Any:
    if isinstance(node, str):
        return redact_url(node)
    if isinstance(node, list):
        return [_redact_urls(item) for item in node]
    if isinstance(node, dict):
        return {key: _redact_urls(value) for key, value in node.items()}
    return node


def redacted(s: Settings) -> dict[str, Any]:
    """The effective settings as plain data, secrets and URL credentials replaced; safe to print."""
    tree: dict[str, Any] = _redact_urls(msgspec.to_builtins(s))
    for path in SECRET_FIELDS:
        section, _, field = path.partition(".")
        if tree[section].get(field):
            tree[section][field] = "<redacted>"
    return tree
