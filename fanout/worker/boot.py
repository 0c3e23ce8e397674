"""What a worker must have before it serves, each refused with a :class:`BootError`.

Its listening sockets (SO_REUSEPORT, shared by every worker), the WSS
context, the jti denylist, and a connection cap that fits under the
file-descriptor limit. A BootError names the setting to fix; the worker writes
it where the supervisor reads it and exits with ``WORKER_BOOT_ERROR``, so a
broken file or a taken port stops the gateway (or a roll) with one line.
"""

from __future__ import annotations

import logging
import resource
import socket
import ssl

from fanout.core import limits
from fanout.errors import OperatorError
from fanout.settings import Settings
from fanout.worker.revocation import Denylist, DenylistError

log = logging.getLogger("fanout.worker")


class BootError(OperatorError):
    """The worker cannot start; the reason is shown by the supervisor."""


def listen_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise BootError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


#: TLS 1.2 suites: forward secrecy and AEAD only (TLS 1.3 suites are all fine as they are).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The WSS server context: TLS >= 1.2, AEAD + ECDHE suites, no compression or renegotiation."""
    if not settings.tls.cert or not settings.tls.key:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if settings.tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(settings.tls.cert, settings.tls.key)
    except ssl.SSLError as exc:
        raise BootError(f"tls.cert/tls.key: not a certificate and its key: {exc.reason}") from None
    except OSError as exc:
        raise BootError(f"tls.cert/tls.key: cannot read {exc.filename}: {exc.strerror}") from None
    return ctx


def fit_fd_limit(configured: int, headroom: int) -> int:
    """Raise the soft RLIMIT_NOFILE toward the hard one if needed; the cap that fits under it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = configured + headroom
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise RLIMIT_NOFILE", extra={"reason": str(exc)})
    nofile = -1 if soft == resource.RLIM_INFINITY else soft
    cap = limits.connection_cap(configured, nofile, headroom)
    if cap < configured:
        log.warning(
            "server.max_connections clamped below the file-descriptor limit",
            extra={"fields": {"configured": configured, "cap": cap, "nofile": soft}},
        )
    return cap


def load_denylist(path: str | None) -> Denylist:
    """The jti denylist at ``path`` (empty when unset): an unreadable one stops the boot."""
    if not path:
        return Denylist()
    try:
        return Denylist.load(path)
    except DenylistError as exc:
        raise BootError(f"jwt.denylist_path: {exc}") from None
