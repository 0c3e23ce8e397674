"""The one fixture layer: real nats-server processes, real gateway processes, real sockets.

- ``nats_server`` (one per test) and ``nats_module`` (one per test module): a real
  nats-server on a free loopback port, stopped afterwards.
- ``make_gateway(*args, start=True, wait_ready=True, **env)``: `fanout serve` processes on
  free ports with per-test log dirs; each is stopped after the test and its whole process
  group is checked gone, so no gateway outlives the test that started it.
- ``keypair``: an RSA key pair (private.pem, public.pem) for signing test tokens.
- ``tcp_migrate_req``: the host's net.ipv4.tcp_migrate_req set to 1 for one test and
  restored after it; a lock file keeps two such tests (two xdist workers) from overlapping.
- :func:`tests.helpers.wait_for` / :func:`tests.helpers.async_wait_for`: the only way to wait.
- :mod:`tests.integration.wsclient`: the WebSocket client of the tests (decoded frames,
  close codes) and raw-socket helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fanout.demo import create_stream
from fanout.embedded_nats import EmbeddedNats, free_port
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent
MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Property tests (hypothesis ``@given``) run many examples each: they are ``slow``, so
    ``-m "not slow"`` keeps the edit-test loop short; the full suite runs them all."""
    for item in items:
        if getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The random order's seed at the end of every run (``-q`` hides pytest-randomly's header):
    a failure that depends on the order is replayed with ``-p randomly --randomly-seed=N``."""
    seed = getattr(terminalreporter.config.option, "randomly_seed", None)
    if isinstance(seed, int):
        terminalreporter.write_line(f"random order: --randomly-seed={seed}")


def pytest_make_parametrize_id(config: pytest.Config, val: object, argname: str) -> str | None:
    """Long parameters (keys and tokens generated at import) get their argument's name as id:
    pytest-xdist needs the same test ids in every worker, and a fresh key differs per process
    (pytest numbers the duplicates)."""
    if isinstance(val, str | bytes) and len(val) > 100:
        return argname
    return None


@pytest.fixture(autouse=True)
def leaves_the_process_as_found() -> Iterator[None]:
    """The environment and the working directory are shared by every later test of this
    process: a test that changes them must put them back (``monkeypatch`` does)."""
    env, cwd = dict(os.environ), os.getcwd()
    yield
    after = dict(os.environ)
    own = "PYTEST_CURRENT_TEST"  # pytest's, set per test
    changed = {k for k in env.keys() | after.keys() if k != own and env.get(k) != after.get(k)}
    assert changed == set(), f"the test left environment variables changed: {sorted(changed)}"
    assert os.getcwd() == cwd, f"the test left the working directory at {os.getcwd()}"


@pytest.fixture
def nats_server() -> Iterator[EmbeddedNats]:
    """A nats-server of this test's own (tests that stop, kill or reconfigure it)."""
    with EmbeddedNats() as server:
        yield server


@contextlib.contextmanager
def jetstream_nats(
    streams: Mapping[str, str], prefix: str = "fanout.live"
) -> Iterator[EmbeddedNats]:
    """A nats-server with JetStream and the operator's streams (name -> subjects), each
    republishing under ``prefix`` as ``[history]`` wants (the recovery tests' server)."""

    async def create(url: str) -> None:
        nc = await nats.connect(url)
        for name, subjects in streams.items():
            await create_stream(nc, name, subjects, prefix)
        await nc.close()

    with EmbeddedNats(jetstream=True) as server:
        asyncio.run(create(server.url))
        yield server


@pytest.fixture(scope="module")
def nats_module() -> Iterator[EmbeddedNats]:
    """One nats-server shared by a test module's tests (each uses its own subjects)."""
    with EmbeddedNats() as server:
        yield server


@pytest.fixture
def tcp_migrate_req() -> Iterator[None]:
    """net.ipv4.tcp_migrate_req=1 for this test (a SO_REUSEPORT listener that closes hands its
    queued handshakes to a sibling), restored afterwards: the host is not ours to change.

    The tests using it hold a lock file meanwhile, so that under pytest-xdist no other
    worker restores the setting under a test that needs it.
    """
    if not MIGRATE_REQ.exists():
        yield
        return
    with (Path(tempfile.gettempdir()) / "fanout-tests-tcp_migrate_req.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        before = MIGRATE_REQ.read_text().strip()
        if before != "1":
            try:
                MIGRATE_REQ.write_text("1")
            except OSError:
                pytest.skip("net.ipv4.tcp_migrate_req=1 is needed and cannot be set here")
        try:
            yield
        finally:
            if before != "1":
                MIGRATE_REQ.write_text(before)


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


#: One /metrics scrape: every sample's value by (name, labels).
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(gw: Gateway) -> Samples:
    """Every sample of one /metrics scrape of ``gw``'s admin port, parsed by prometheus_client."""
    status, body, _ = http_get(gw.admin + "/metrics")
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    """The one sample named ``name`` with exactly ``labels``; None when there is none."""
    return samples.get((name, frozenset(labels.items())))


def metric(gw: Gateway, name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels`` (0 when none)."""
    want = labels.items()
    return sum(v for (n, got), v in scrape(gw).items() if n == name and want <= got)


def worker_pids(gw: Gateway) -> dict[int, int]:
    """index -> pid of the workers ``gw``'s /healthz lists (503 lists them too)."""
    _, body, _ = http_get(gw.admin + "/healthz")
    return {w["index"]: w["pid"] for w in json.loads(body)["workers"]}


def worker_pid(gw: Gateway) -> int:
    """The pid of ``gw``'s one worker."""
    (pid,) = worker_pids(gw).values()
    return pid


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

    def start(
        self,
        wait_ready: bool = True,
        timeout: float = 20.0,
        preexec_fn: Callable[[], object] | None = None,
    ) -> None:
        """``preexec_fn`` runs in the child before `fanout serve` (e.g. a lower rlimit for
        the whole process tree)."""
        assert self.log_path is not None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fanout.cli", "serve", *self.args],
            env=self.env,
            stdout=self.log_path.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec_fn,
        )
        try:
            wait_for(lambda: self._up(wait_ready), timeout, "the gateway to be ready")
        except AssertionError:
            with contextlib.suppress(AssertionError):  # the readiness failure is the news
                self.stop()
            raise RuntimeError(f"gateway not ready in {timeout}s:\n{self.logs()}") from None

    def _up(self, wait_ready: bool) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"gateway exited {self.proc.returncode}:\n{self.logs()}")
        try:
            status, _, _ = http_get(self.http + ("/readyz" if wait_ready else "/healthz"), 1.0)
            return status == 200 and (not wait_ready or self._all_workers_up())
        except OSError:
            return False

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
        """SIGTERM, then SIGKILL after ``timeout``; returns the supervisor's exit code once
        its whole process group (workers, side processes) is gone."""
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
        try:
            wait_for(lambda: not group_alive(proc.pid), 5.0, f"process group {proc.pid} to end")
        except AssertionError:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(
                f"gateway {proc.pid} left processes behind (killed now):\n{self.logs()}"
            ) from None
        return proc.returncode


def group_alive(pgid: int) -> bool:
    """Is any process (zombies aside) still in process group ``pgid``?"""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


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


@contextlib.contextmanager
def recovery_gateway(log_dir: Path, nats_url: str, streams: str, **env: str) -> Iterator[Gateway]:
    """One worker, no token needed, ``[history].streams`` = ``streams`` (the recovery tests'
    gateway, integration and browser alike); stopped on exit."""
    gw = launch_gateway(
        log_dir,
        "--workers",
        "1",
        NATS_URLS=nats_url,
        FANOUT_WS_AUTH_REQUIRED="false",
        FANOUT_HISTORY_STREAMS=streams,
        **env,
    )
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """``make_gateway(*args, start=True, wait_ready=True, **env)``: gateways stopped after the
    test (process group checked gone)."""
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
