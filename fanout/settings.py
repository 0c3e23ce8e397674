"""The gateway's whole configuration: one typed object, validated once at start-up.

Sources, later wins: built-in defaults, a TOML file (``--config``), environment
variables (the short names such as ``NATS_URLS`` and the generic
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
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from fanout.core.metadata import HEADER_NAME_PATTERN, is_reserved
from fanout.core.subjects import SubjectError, validate_pattern
from fanout.errors import OperatorError

Policy = Literal["drop_oldest", "latest", "disconnect"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "text"]

# Single-field rules live on the types as msgspec ``Meta`` constraints; ``_rule`` turns a
# failed one into "must be ...". A ``pattern`` needs a ``description`` saying what it
# accepts; on a number the description is a hint shown after the bounds.
Positive = Annotated[int, Meta(gt=0)]
PositiveFloat = Annotated[float, Meta(gt=0)]
AtLeastOne = Annotated[float, Meta(ge=1)]
Off0 = Annotated[int, Meta(ge=0, description="0 = off")]
Off0Float = Annotated[float, Meta(ge=0, description="0 = off")]
NatsUrl = Annotated[
    str,
    Meta(pattern=r"^(nats|tls|ws|wss)://", description="a nats://, tls://, ws:// or wss:// URL"),
]
Origin = Annotated[
    str, Meta(pattern=r"^(\*\Z|https?://)", description="scheme://host[:port] or '*'")
]
Algorithm = Annotated[
    str, Meta(pattern=r"(?i)^(?!none\Z)", description="a signing algorithm; 'none' never is")
]
HeaderName = Annotated[
    str, Meta(pattern=HEADER_NAME_PATTERN, description="a header name (an RFC 9110 token)")
]


class ConfigError(OperatorError):
    """Invalid configuration (``XYW009``); ``field`` is the dotted path of the offending setting.

    ``source`` is what the user typed to set it, when known: the environment variable,
    the TOML file or the command line. It is named on the line so the fix is obvious.
    """

    def __init__(self, field: str, message: str, source: str | None = None) -> None:
        where = f" (from {source})" if source else ""
        super().__init__(message, f"invalid config: {field}: {message}{where}")
        self.field = field
        self.source = source


class Server(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "0.0.0.0"
    port: Annotated[int, Meta(ge=1, le=65535)] = 8080
    workers: Annotated[int, Meta(ge=0, description="0 = one per CPU")] = 0
    max_connections: Positive = 10_000
    max_connections_per_ip: int = 0
    max_connections_per_principal: int = 0
    #: Headroom kept below RLIMIT_NOFILE: max_connections is clamped to the fd limit minus this.
    fd_headroom: Annotated[int, Meta(ge=16)] = 128
    #: New WebSocket handshakes per second from one client address (0 = off), and the burst.
    #: Off by default: behind a NAT or an L4 balancer one address is many clients.
    handshake_rate_per_ip: Off0Float = 0.0
    handshake_burst_per_ip: AtLeastOne = 100.0
    #: Peers (IPs or CIDRs) whose X-Forwarded-For / X-Forwarded-Proto headers are believed.
    trusted_proxies: list[str] = msgspec.field(default_factory=list)
    #: Load shedding: refuse new handshakes (503 XYW007) and fail /readyz past either (0 = off).
    shed_loop_lag_s: Off0Float = 0.5
    shed_rss_bytes: Off0 = 0
    shed_retry_after_s: Annotated[int, Meta(ge=1)] = 5
    handshake_timeout_s: PositiveFloat = 10.0
    max_request_head_bytes: int = 16_384
    graceful_timeout_s: Annotated[float, Meta(ge=0)] = 10.0
    worker_timeout_s: PositiveFloat = 30.0
    heartbeat_interval_s: float = 1.0
    ready_quorum: Annotated[float, Meta(gt=0, le=1)] = 1.0


class Admin(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The operator's listener (/metrics, detailed /healthz, /admin): loopback unless moved."""

    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535, description="0 = off")] = 9090


class Tls(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    cert: str | None = None
    key: str | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"


class Nats(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    urls: list[NatsUrl] = msgspec.field(default_factory=list)
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
    algorithms: list[Algorithm] = msgspec.field(
        default_factory=lambda: ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"]
    )
    max_token_bytes: Annotated[int, Meta(ge=1, le=65_536)] = 8192
    max_lifetime_s: Positive = 86_400
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
    path: Annotated[str, Meta(pattern="^/", description="a path starting with '/'")] = "/ws"
    auth_required: bool = True
    allowed_origins: list[Origin] = msgspec.field(default_factory=list)
    require_origin: bool = False
    subject_whitelist: Annotated[list[str], Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["xy.md.>"]
    )
    allow_full_wildcard: bool = False
    max_subject_bytes: int = 256
    max_subs: Positive = 1000
    max_frame_bytes: Annotated[int, Meta(ge=16, le=64 << 20)] = 1 << 20
    inbound_rate: PositiveFloat = 100.0
    inbound_burst: AtLeastOne = 1000.0
    ping_interval_s: float = 20.0
    idle_timeout_s: float = 60.0


class Outbox(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    max_messages: Positive = 1000
    max_bytes: Positive = 1 << 20
    policy: Policy = "drop_oldest"
    policies: dict[str, Policy] = msgspec.field(default_factory=dict)
    write_buffer_high: int = 256 * 1024
    write_timeout_s: PositiveFloat = 10.0
    write_delay_ms: float = 0.0
    max_batch: Positive = 64


class Log(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    level: LogLevel = "info"
    #: ``auto``: text when stderr is a terminal (a person), else JSON lines (a log shipper).
    format: LogFormat = "auto"


class Demo(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = False
    interval_s: PositiveFloat = 0.5
    symbols: list[str] = msgspec.field(default_factory=lambda: ["demo", "btc", "eth", "sol"])


InterceptorName = Literal["acl", "rate_limit", "circuit_breaker", "deadline", "tracing"]


class Requests(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The ``request`` op (protocol v1.1): off while ``whitelist`` is empty."""

    whitelist: list[str] = msgspec.field(default_factory=list)
    max_in_flight: Positive = 100
    #: Requests per second per principal (anonymous: per client address), and the burst.
    rate: PositiveFloat = 50.0
    burst: AtLeastOne = 100.0
    max_principals: Positive = 10_000
    default_timeout_ms: Positive = 5_000
    #: At least ``default_timeout_ms`` (checked in :func:`validate`).
    max_timeout_ms: Annotated[int, Meta(le=300_000)] = 30_000
    #: Consecutive failures (no responders, non-4xx service errors, timeouts) that open a
    #: subject's circuit.
    breaker_failures: Positive = 5
    #: A timeout counts as a failure only when the request waited at least this long: a
    #: shorter ``timeout_ms`` is the client's choice, not the service's fault.
    breaker_timeout_floor_ms: int = 1_000
    breaker_reset_s: PositiveFloat = 10.0
    max_breakers: Positive = 1_000
    #: Send the client's JWT as ``Authorization: Bearer`` so the service verifies it itself.
    forward_token: bool = False
    #: Client ``headers`` passed on besides correlationId, causationId, traceparent, tracestate.
    allowed_headers: list[HeaderName] = msgspec.field(default_factory=list)
    interceptors: list[InterceptorName] = msgspec.field(
        default_factory=lambda: ["acl", "rate_limit", "circuit_breaker", "deadline", "tracing"]
    )


class History(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Recovery (protocol v1.2): which subjects JetStream streams hold, and replay bounds."""

    #: Subject pattern → name of the operator's JetStream stream holding it (first match wins).
    streams: dict[str, str] = msgspec.field(default_factory=dict)
    #: Most messages one resume may replay; more → ``recovered:false``, reason ``limit``.
    max_replay: int = 1000
    #: Recent messages a worker keeps in memory per recoverable subject (replays without
    #: JetStream), bounded in count and in age.
    window_messages: int = 1000
    window_s: float = 60.0
    #: Each stream republishes what it stores to ``<prefix>.<subject>`` (stream ``RePublish``
    #: with src = the configured pattern): live messages then carry ``Nats-Sequence``.
    republish_prefix: str = "fanout.live"


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    server: Server = msgspec.field(default_factory=Server)
    admin: Admin = msgspec.field(default_factory=Admin)
    tls: Tls = msgspec.field(default_factory=Tls)
    nats: Nats = msgspec.field(default_factory=Nats)
    jwt: Jwt = msgspec.field(default_factory=Jwt)
    ws: Ws = msgspec.field(default_factory=Ws)
    outbox: Outbox = msgspec.field(default_factory=Outbox)
    log: Log = msgspec.field(default_factory=Log)
    demo: Demo = msgspec.field(default_factory=Demo)
    requests: Requests = msgspec.field(default_factory=Requests)
    history: History = msgspec.field(default_factory=History)


#: The short environment names (README.md, Configuration) → dotted setting paths.
SHORT_ENV: dict[str, str] = {
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


def _unwrap(tp: Any) -> Any:
    """The type under ``Annotated[...]`` (the constraints are msgspec's business)."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp


def _env_value(name: str, path: str, raw: str) -> Any:
    """Turn an environment string into the shape the field wants (lists are comma separated)."""
    ftype = _unwrap(FIELD_TYPES[path])
    origin = typing.get_origin(ftype)
    if origin is list:
        return [part.strip() for part in raw.split(",") if part.strip()]
    if origin is dict:
        if not raw.lstrip().startswith("{"):
            return _pairs(path, raw)
        try:
            return msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise ConfigError(path, f"expected a JSON object: {exc}", name) from None
    if ftype is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(path, f"expected a boolean, got {raw!r}", name)
    if raw == "" and "None" in repr(ftype):
        return None
    return raw


def _pairs(path: str, raw: str) -> dict[str, str]:
    """``key=value,key=value`` (``FANOUT_HISTORY_STREAMS="xy.md.>=MD,orders.>=ORDERS"``).

    Split at the last ``=`` of each pair: a subject pattern may hold ``=``, a stream name not.
    """
    out: dict[str, str] = {}
    for part in raw.split(","):
        if not part.strip():
            continue
        key, sep, value = part.rpartition("=")
        if not (sep and key.strip() and value.strip()):
            raise ConfigError(path, f"expected a JSON object or key=value pairs, got {part!r}")
        out[key.strip()] = value.strip()
    return out


def _warn_stderr(message: str) -> None:
    print(f"fanout: warning: {message}", file=sys.stderr)


_SECTIONS = frozenset(path.partition(".")[0] for path in FIELD_TYPES)


def env_overrides(
    environ: Mapping[str, str], warn: Callable[[str], None] = _warn_stderr
) -> dict[str, tuple[str, Any]]:
    """``{dotted path: (variable name, value)}`` from the short names and ``FANOUT_SECTION_FIELD``.

    Other tools share the prefix (``FANOUT_LOCUST_KEY``), so a variable outside every
    section is only warned about; inside a known section it is surely a typo and fails.
    """
    out: dict[str, tuple[str, Any]] = {}
    for name, path in SHORT_ENV.items():
        if name in environ:
            out[path] = (name, _env_value(name, path, environ[name]))
    for name in sorted(environ):
        if not name.startswith("FANOUT_") or name in INTERNAL_ENV:
            continue
        section, _, field = name[len("FANOUT_") :].lower().partition("_")
        path = f"{section}.{field}"
        if path in FIELD_TYPES:
            out[path] = (name, _env_value(name, path, environ[name]))
        elif section in _SECTIONS:
            raise ConfigError(name, f"no setting {path}{_did_you_mean(path)}")
        else:
            warn(f"{name} is not a fanout setting; ignored")
    return out


def _did_you_mean(path: str) -> str:
    close = difflib.get_close_matches(path, FIELD_TYPES, n=1, cutoff=0.8)
    return f" (did you mean {close[0]}?)" if close else ""


def _put(tree: dict[str, Any], path: str, value: Any) -> None:
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


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _rule(tp: Any) -> str | None:
    """The rule the ``Meta`` on ``tp`` states, as "must be ..." (``None`` without one)."""
    if typing.get_origin(tp) is not Annotated:
        return None
    meta = next((m for m in typing.get_args(tp)[1:] if isinstance(m, Meta)), None)
    if meta is None:
        return None
    if meta.pattern is not None:
        return f"must be {meta.description}"
    if meta.min_length is not None:  # only ever 1: "this list needs an item"
        return "must not be empty"
    if meta.ge is not None and meta.le is not None:
        rule = f"{_number(meta.ge)}..{_number(meta.le)}"
    elif meta.gt is not None and meta.le is not None:
        rule = f"in ({_number(meta.gt)}, {_number(meta.le)}]"
    else:
        bounds = ((">=", meta.ge), (">", meta.gt), ("<=", meta.le))
        rule = " ".join(f"{op} {_number(v)}" for op, v in bounds if v is not None)
    hint = f" ({meta.description})" if meta.description else ""
    return f"must be {rule}{hint}"


#: A failed ``Meta`` constraint, as opposed to a wrong type (``Expected `int`, got `str```).
_CONSTRAINT_RE = re.compile(r"Expected `[^`]+` ")
#: A number setting given text that is not one (``FANOUT_SERVER_PORT=80a``): echo the text.
_NOT_A_NUMBER_RE = re.compile(r"Expected `(int|float)`, got `str`")


def _shown(path: str, value: Any) -> str:
    """How a value the user typed is echoed in an error: URL credentials and secrets never."""
    if path in SECRET_FIELDS:
        return "<redacted>"
    return repr(redact_url(value) if isinstance(value, str) else value)


def _error_path(exc: msgspec.ValidationError, tree: Mapping[str, Any]) -> tuple[str, str]:
    """``(setting, message)`` for msgspec's error in an operator's words: the rule, the item."""
    text = str(exc)
    message, sep, where = text.rpartition(" - at `$.")
    if not sep:
        message = text
    # msgspec writes list indexes as [3] and elides dict keys as [...]: name the setting.
    parts = re.split(r"[.\[]", where.rstrip("`")) if sep else []
    path = ".".join(parts[:2])
    unknown = re.match(r"Object contains unknown field `([^`]+)`", message)
    if unknown:
        return ".".join(filter(None, (path, unknown.group(1)))), "unknown setting"
    if not sep:
        return "config", text
    ftype = FIELD_TYPES.get(path)
    index = parts[2].rstrip("]") if len(parts) > 2 else ""
    number = _NOT_A_NUMBER_RE.fullmatch(message)
    if number and not index:
        kind = "an integer" if number.group(1) == "int" else "a number"
        message = f"expected {kind}, got {_shown(path, tree[parts[0]][parts[1]])}"
    if _CONSTRAINT_RE.match(message):
        if index.isdigit():
            rule = _rule(typing.get_args(_unwrap(ftype))[0])
            item = tree[parts[0]][parts[1]][int(index)]
            message = f"{_shown(path, item)}: {rule or message}"
        else:
            message = _rule(ftype) or message
    values = _literal_values(ftype)
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

    The error also names where the offending value came from (the environment variable,
    the file, the command line), since that is what the operator has to edit.
    ``check_files=False`` checks structure only (example configs naming production paths).
    """
    environ = os.environ if environ is None else environ
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is None and environ.get("FANOUT_CONFIG"):
        path = environ["FANOUT_CONFIG"]
    if path is not None:
        try:
            tree = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
        for section, node in tree.items():
            sources[section] = str(path)
            for key in node if isinstance(node, dict) else ():
                sources[f"{section}.{key}"] = str(path)
    given = [(p, v, name) for p, (name, v) in env_overrides(environ, warn).items()]
    given += [(p, v, "the command line") for p, v in (overrides or {}).items()]
    try:
        for setting, value, source in given:
            _put(tree, setting, value)
            sources[setting] = source
        try:
            settings = msgspec.convert(tree, Settings, strict=False)
        except msgspec.ValidationError as exc:
            field, message = _error_path(exc, tree)
            raise ConfigError(field, message) from None
        validate(settings)
        if check_files:
            validate_files(settings)
    except ConfigError as exc:
        if exc.source is None and exc.field in sources:
            raise ConfigError(exc.field, exc.message, sources[exc.field]) from None
        raise
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
    """Rules the ``Meta`` on one field cannot say: pairs of fields, parsed values, lists."""
    for proxy in s.server.trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError("server.trusted_proxies", f"{proxy!r} is not an IP or CIDR") from None
    _check(
        s.admin.port != s.server.port,
        "admin.port",
        f"must differ from server.port ({s.server.port}): the admin listener is separate",
    )
    _check(
        (s.tls.cert is None) == (s.tls.key is None), "tls.cert", "tls.cert and tls.key go together"
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
    _validate_requests(s.requests, s.ws.max_subject_bytes)
    _validate_history(s.history, s.ws.max_subject_bytes)


#: JetStream stream names: no whitespace, ``.``, ``*``, ``>``, path separators (nats-server's rule).
_STREAM_NAME_RE = re.compile(r"[^\s.*>/\\]{1,255}")


def _validate_history(h: History, max_subject_bytes: int) -> None:
    for pattern, stream in h.streams.items():
        try:
            validate_pattern(pattern, max_subject_bytes)
        except SubjectError as exc:
            raise ConfigError("history.streams", f"{pattern!r}: {exc}") from None
        _check(
            _STREAM_NAME_RE.fullmatch(stream) is not None,
            "history.streams",
            f"{stream!r} is not a JetStream stream name",
        )
    _check(1 <= h.max_replay <= 100_000, "history.max_replay", "must be 1..100000")
    _check(h.window_messages >= 0, "history.window_messages", "must be >= 0 (0 = no window)")
    _check(h.window_s >= 0, "history.window_s", "must be >= 0 (0 = no window)")
    try:
        validate_pattern(h.republish_prefix, max_subject_bytes)
    except SubjectError as exc:
        raise ConfigError("history.republish_prefix", f"{h.republish_prefix!r}: {exc}") from None
    _check(
        not any(c in h.republish_prefix for c in "*>"),
        "history.republish_prefix",
        "must be a plain subject (no wildcards)",
    )


def _validate_requests(r: Requests, max_subject_bytes: int) -> None:
    for pattern in r.whitelist:
        try:
            validate_pattern(pattern, max_subject_bytes)
        except SubjectError as exc:
            raise ConfigError("requests.whitelist", f"{pattern!r}: {exc}") from None
    _check(
        r.default_timeout_ms <= r.max_timeout_ms,
        "requests.max_timeout_ms",
        "must be between requests.default_timeout_ms and 300000",
    )
    _check(
        0 < r.breaker_timeout_floor_ms <= r.default_timeout_ms,
        "requests.breaker_timeout_floor_ms",
        "must be between 1 and requests.default_timeout_ms",
    )
    for name in r.allowed_headers:
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
