"""Shared fixtures: real nats-server processes, real gateway processes, real sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fanout.embedded_nats import EmbeddedNats, free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def nats_server() -> Iterator[EmbeddedNats]:
    server = EmbeddedNats()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from fanout.devtoken import generate_keypair

    d = tmp_path_factory.mktemp("keys")
    private, public = generate_keypair("rsa")
    (d / "private.pem").write_bytes(private)
    (d / "public.pem").write_bytes(public)
    return d / "private.pem", d / "public.pem"


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


@dataclass
class Gateway:
    """A real `fanout serve` process tree on loopback."""

    port: int
    env: dict[str, str]
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        """The admin listener: /metrics, the detailed /healthz, /admin."""
        return f"http://127.0.0.1:{self.env['FANOUT_ADMIN_PORT']}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, wait_ready: bool = True, timeout: float = 20.0) -> None:
        assert self.log_path is not None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fanout.cli", "serve", *self.args],
            env=self.env,
            stdout=self.log_path.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}:\n{self.logs()}")
            try:
                status, _, _ = http_get(self.http + ("/readyz" if wait_ready else "/healthz"), 1.0)
                if status == 200 and (not wait_ready or self._all_workers_up()):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"gateway not ready in {timeout}s:\n{self.logs()}")

    def _all_workers_up(self) -> bool:
        """Every worker asked for with ``--workers N`` is listening (ready = the first one)."""
        if "--workers" not in self.args or self.env.get("FANOUT_ADMIN_PORT") == "0":
            return True
        wanted = int(self.args[self.args.index("--workers") + 1])
        status, body, _ = http_get(self.admin + "/healthz", 1.0)
        return status == 200 and len(json.loads(body)["workers"]) >= wanted

    def logs(self) -> str:
        assert self.log_path is not None
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode


def gateway_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("FANOUT_", "NATS_", "JWT_", "WS_"))
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(extra)
    return env


def launch_gateway(
    log_dir: Path, *args: str, start: bool = True, wait_ready: bool = True, **env: str
) -> Gateway:
    """Start `fanout serve` on a free loopback port; env names are passed verbatim."""
    port = free_port()
    env.setdefault("FANOUT_ADMIN_PORT", str(free_port()))
    gw = Gateway(
        port=port,
        env=gateway_env(FANOUT_SERVER_PORT=str(port), FANOUT_SERVER_HOST="127.0.0.1", **env),
        args=list(args),
        log_path=log_dir / f"gateway-{port}.log",
    )
    if start:
        gw.start(wait_ready=wait_ready)
    return gw


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[object]:
    started: list[Gateway] = []

    def make(*args: str, start: bool = True, wait_ready: bool = True, **env: str) -> Gateway:
        gw = launch_gateway(tmp_path, *args, start=False, **env)
        started.append(gw)
        if start:
            gw.start(wait_ready=wait_ready)
        return gw

    yield make
    for gw in started:
        gw.stop()
