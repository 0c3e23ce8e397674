"""Our side of the NATS connection's security: TLS context, credentials, and boot verdicts.

nats-py retries its first connect forever, whatever the error. A wrong CA, a
client certificate the server refuses, or credentials it rejects will never
get better by retrying, so the worker must stop at boot with one line naming
the setting to fix (:class:`NatsAuthError`). Failures are classified by cause
(exception type, the OpenSSL reason of a TLS alert, the server's ``-ERR``),
never by an exception's message.

With TLS 1.3 the server judges our client certificate after the handshake
has completed on our side: nats-py, already writing CONNECT, often sees only a
broken pipe or a reset. So after such a failure on the first connect,
:func:`refused_client_certificate` asks the servers directly: it does the
NATS TLS upgrade itself and reads, and a refused certificate then shows as the
server's alert.
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
from typing import Any
from urllib.parse import urlsplit

import nats.errors

from fanout.errors import Code, OperatorError
from fanout.settings import Nats

#: An NKey seed: 'S', the key type, then base32 (58 characters in all).
_SEED_RE = re.compile(r"S[A-Z][A-Z2-7]{56}")

#: OpenSSL reasons of the alerts a TLS server sends when it refuses our client certificate.
CLIENT_CERT_ALERTS = frozenset(
    {
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "TLSV1_ALERT_UNKNOWN_CA",
        "TLSV1_ALERT_ACCESS_DENIED",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    }
)

#: nats-server ``-ERR`` texts that refuse our credentials (lower case, quotes stripped).
AUTH_ERRORS = frozenset(
    {
        "authorization violation",
        "user authentication expired",
        "user authentication revoked",
        "account authentication expired",
    }
)

#: Failures on an established connection that may hide a refused certificate (TLS 1.3).
_CONNECTION_LOST = (
    BrokenPipeError,
    ConnectionResetError,
    ConnectionAbortedError,
    ssl.SSLEOFError,
    ssl.SSLZeroReturnError,
    asyncio.IncompleteReadError,
    nats.errors.UnexpectedEOF,
)


class NatsAuthError(OperatorError):
    """Credentials or TLS refused, or their files unusable: retrying will not help (``XYW004``).

    The message starts with the setting to fix (``nats.tls_ca: ...``) and never
    holds a secret.
    """

    CODE = Code.NATS_DOWN


def _tls_context(cfg: Nats) -> ssl.SSLContext | None:
    if not (cfg.tls_ca or cfg.tls_cert or any(u.startswith("tls://") for u in cfg.urls)):
        return None
    try:
        ctx = ssl.create_default_context(cafile=cfg.tls_ca)
    except (OSError, ssl.SSLError) as exc:
        raise NatsAuthError(f"nats.tls_ca: cannot load {cfg.tls_ca}: {_why(exc)}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.tls_cert and cfg.tls_key:
        try:
            ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise NatsAuthError(
                f"nats.tls_cert: cannot load {cfg.tls_cert} with its key: {_why(exc)}"
            ) from None
    return ctx


def _why(exc: OSError) -> str:
    """An OS or TLS error in a few words (no paths beyond the one we name, no secrets)."""
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or "invalid PEM")
    return exc.strerror or type(exc).__name__


def _credential_setting(cfg: Nats) -> str:
    return "nats.creds" if cfg.creds else "nats.nkey_seed" if cfg.nkey_seed else "nats.urls"


def _cert_refused(reason: str) -> str:
    return f"nats.tls_cert: the NATS server refused the client certificate ({reason})"


def fatal_reason(exc: BaseException, cfg: Nats) -> str | None:
    """Why ``exc`` means our own configuration is wrong (setting first), or None to retry.

    Our CA does not trust the server → ``nats.tls_ca``; the server refuses our
    client certificate (TLS alert) → ``nats.tls_cert``; the server refuses our
    credentials → ``nats.creds`` / ``nats.nkey_seed``.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"nats.tls_ca: the NATS server's certificate is not trusted ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError) and exc.reason in CLIENT_CERT_ALERTS:
        return _cert_refused(exc.reason)
    if _is_auth_error(exc):
        return f"{_credential_setting(cfg)}: the NATS server rejected the credentials"
    if isinstance(exc, ModuleNotFoundError) and exc.name == "nkeys":
        return (
            f"{_credential_setting(cfg)}: NKey and creds authentication need the 'nkeys' "
            "package (pip install 'nats-py[nkeys]')"
        )
    return None


def _is_auth_error(exc: BaseException) -> bool:
    """nats-py's AuthorizationError, or the server's ``-ERR`` refusing our credentials.

    During connect nats-py raises a plain ``nats.errors.Error("nats: <-ERR text>")``.
    """
    if isinstance(exc, nats.errors.AuthorizationError):
        return True
    if type(exc) is not nats.errors.Error:
        return False
    server_err = str(exc).removeprefix("nats: ").strip().strip("'").strip().lower()
    return server_err in AUTH_ERRORS


def may_hide_refused_certificate(exc: BaseException, cfg: Nats) -> bool:
    """A TLS connection lost early: with TLS 1.3 that may be a refused client certificate."""
    return isinstance(exc, _CONNECTION_LOST) and _tls_context(cfg) is not None


async def refused_client_certificate(cfg: Nats) -> str | None:
    """Ask every TLS server in ``nats.urls`` whether it refuses our certificate; why, or None.

    Each probe does what nats-py does up to the TLS upgrade (read INFO, start
    TLS) and then only reads: the server says nothing before CONNECT, so the
    first thing it sends is its verdict on our certificate, as an alert. A
    server that accepts it sends nothing: the probe ends at
    ``nats.connect_timeout_s``.
    """
    ctx = _tls_context(cfg)
    if ctx is None:
        return None
    probes = [_probe(ctx, url, cfg.connect_timeout_s) for url in cfg.urls]
    reasons = await asyncio.gather(*probes)
    refused = next((r for r in reasons if r is not None), None)
    return None if refused is None else _cert_refused(refused)


async def _probe(ctx: ssl.SSLContext, url: str, timeout_s: float) -> str | None:
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    host = parts.hostname
    if host is None:
        return None
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, parts.port or 4222)
            if not (await reader.readline()).startswith(b"INFO"):
                return None
            await writer.start_tls(ctx, server_hostname=host)
            await reader.read(1)
    except ssl.SSLError as exc:
        return exc.reason if exc.reason in CLIENT_CERT_ALERTS else None
    except (OSError, TimeoutError, ValueError):
        return None
    finally:
        if writer is not None:
            writer.transport.abort()
    return None


def check_files(cfg: Nats) -> None:
    """Fail fast, naming the setting, when a credential or TLS file cannot be read."""
    files = [("nats.tls_ca", cfg.tls_ca), ("nats.tls_cert", cfg.tls_cert)]
    files += [("nats.tls_key", cfg.tls_key), ("nats.creds", cfg.creds)]
    seed = cfg.nkey_seed
    if seed and not os.path.isfile(seed) and _SEED_RE.fullmatch(seed.strip()) is None:
        raise NatsAuthError("nats.nkey_seed: neither a readable file nor an NKey seed (S...)")
    for setting, path in files:
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise NatsAuthError(f"{setting}: cannot read {path}: {_why(exc)}") from None
    _tls_context(cfg)


def connect_options(cfg: Nats) -> dict[str, Any]:
    """nats-py keyword arguments for our settings (credentials by reference, never logged)."""
    opts: dict[str, Any] = {
        "servers": list(cfg.urls),
        "name": cfg.name,
        "connect_timeout": cfg.connect_timeout_s,
        "reconnect_time_wait": cfg.reconnect_wait_s,
        "max_reconnect_attempts": -1,
        "allow_reconnect": True,
        "dont_randomize": False,
    }
    tls = _tls_context(cfg)
    if tls is not None:
        opts["tls"] = tls
    if cfg.creds:
        opts["user_credentials"] = cfg.creds
    if cfg.nkey_seed:
        if os.path.isfile(cfg.nkey_seed):
            opts["nkeys_seed"] = cfg.nkey_seed
        else:
            opts["nkeys_seed_str"] = cfg.nkey_seed
    return opts
