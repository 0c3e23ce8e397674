"""One worker process: its own uvloop, SO_REUSEPORT listener, NATS link and clients.

Signals (from the supervisor): SIGTERM drains (clients get 1001), SIGUSR1
leaves for a rolling restart (clients get 1012), SIGQUIT exits at once;
SIGINT and SIGHUP are the supervisor's business. The worker's state file,
written from the event loop every heartbeat interval, is its heartbeat.

What a worker reads once at start (the TLS certificate and key, the jti
denylist, the JWT public key) is reloaded by SIGHUP to the supervisor: it
rolls the workers one at a time and each new worker reads the files again.
What it must have before it serves (sockets, TLS context, denylist, a
connection cap under the file-descriptor limit) is :mod:`fanout.worker.boot`'s;
every heartbeat it samples loop lag and RSS for load shedding.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import signal
import time
from collections.abc import Callable
from pathlib import Path

import uvloop
from aiohttp import web
from setproctitle import setproctitle

from fanout import logs, metrics, runtime
from fanout.core.auth import KeySet
from fanout.errors import Close, Code
from fanout.runtime import WORKER_BOOT_ERROR
from fanout.settings import Settings
from fanout.worker.admin import build_admin_app
from fanout.worker.app import build_app, states_reader
from fanout.worker.boot import BootError, fit_fd_limit, listen_socket, load_denylist, tls_context
from fanout.worker.gateway import Gateway
from fanout.worker.handshake import Handshake
from fanout.worker.hub import Hub
from fanout.worker.jwks import JwksCache
from fanout.worker.nats_auth import NatsAuthError
from fanout.worker.nats_link import NatsLink
from fanout.worker.request_broker import RequestBroker

log = logging.getLogger("fanout.worker")


def rss_bytes() -> int:
    """Resident set size now (Linux /proc), else the peak from getrusage."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Rates:
    """Deliveries and drops per second between two heartbeats (the live view shows them)."""

    __slots__ = ("at", "dropped", "dropped_seen", "forwarded", "forwarded_seen")

    def __init__(self) -> None:
        self.at: float | None = None
        self.forwarded_seen = self.dropped_seen = 0
        self.forwarded = self.dropped = 0.0

    def measure(self, forwarded_total: int, dropped_total: int, now: float) -> None:
        if self.at is not None and now > self.at:
            elapsed = now - self.at
            self.forwarded = (forwarded_total - self.forwarded_seen) / elapsed
            self.dropped = (dropped_total - self.dropped_seen) / elapsed
        self.at = now
        self.forwarded_seen, self.dropped_seen = forwarded_total, dropped_total


class Worker:
    def __init__(self, settings: Settings, index: int, state_dir: Path) -> None:
        self.settings = settings
        self.index = index
        self.state_dir = state_dir
        self.started_at = time.time()
        self.stop_code: int | None = None
        self.stopped: asyncio.Event | None = None
        self.listening = False
        self.loop_lag = 0.0
        self.generation = int(os.environ.get("FANOUT_GENERATION", "0"))
        self._title_at = 0.0
        self._failed_kinds: set[tuple[str, str]] = set()
        self.state_file = runtime.StateFile(state_dir, os.getpid())
        self.rates = Rates()

    def state(self) -> runtime.WorkerState:
        hub, link = self.hub, self.link
        return runtime.WorkerState(
            pid=os.getpid(),
            index=self.index,
            started_at=self.started_at,
            heartbeat_at=time.time(),
            listening=self.listening,
            draining=self.gateway.draining,
            clients=len(hub.connections),
            subscriptions=hub.book.subscription_count,
            nats_connected=link.connected,
            nats_url=link.url,
            last_error_code=link.last_error,
            loop_lag_s=self.loop_lag,
            generation=self.generation,
            shedding=self.gateway.shedder.shedding,
            forwarded_total=hub.forwarded_total,
            dropped_total=hub.dropped_total,
            forwarded_per_s=self.rates.forwarded,
            dropped_per_s=self.rates.dropped,
            outbox_max=hub.outbox_max,
            rss_bytes=self.process.rss,
            open_fds=self.process.fds,
        )

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        settings = self.settings
        sock = listen_socket(settings.server.host, settings.server.port)
        ssl_ctx = tls_context(settings)
        denylist = load_denylist(settings.jwt.denylist_path)
        keys: KeySet | JwksCache | None = None
        if settings.jwt.public_key:
            try:
                keys = KeySet.from_pem(settings.jwt.public_key)
            except ValueError as exc:
                raise BootError(f"jwt.public_key: {exc}") from None
        elif settings.jwt.jwks_url:
            keys = JwksCache(
                settings.jwt.jwks_url,
                refetch_interval_s=settings.jwt.jwks_refetch_interval_s,
                refresh_s=settings.jwt.jwks_refresh_s,
                on_failure=lambda _reason: metrics.JWKS_FETCH_FAILURES.inc(),
            )
            await keys.start()
        self.process = metrics.ProcessSampler()
        self.sample_process(time.monotonic())  # the first heartbeat shows RSS and fds already
        self.hub = hub = Hub(settings, loop)
        self.gateway = gateway = Gateway(settings, hub, keys)
        gateway.denylist = denylist
        gateway.max_connections = fit_fd_limit(
            settings.server.max_connections, settings.server.fd_headroom
        )
        metrics.CONNECTION_CAP.set(gateway.max_connections)
        history = settings.history
        self.link = link = NatsLink(
            settings.nats,
            hub,
            self.on_nats_status,
            history.republish_prefix if history.streams else None,
        )
        hub.link = link
        try:
            await link.start()
        except NatsAuthError as exc:
            raise BootError(str(exc)) from None
        hub.nats_up = link.connected
        if settings.requests.whitelist:
            gateway.requests = RequestBroker(settings, link, client_log=gateway.client_log)
        states = states_reader(self.state_dir, self.state)
        quorum = settings.server.ready_quorum
        app = build_app(states, quorum, settings.ws.path, settings.demo.enabled)
        # one request per socket (see handshake.py): a body is never read, so never wait for one
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            lingering_time=0,
            shutdown_timeout=runtime.http_shutdown_timeout(settings.server.graceful_timeout_s),
        )
        await runner.setup()
        admin = await self.start_admin(build_admin_app(states, self.state_dir, quorum))
        http_factory = runner.server
        assert http_factory is not None
        server = await loop.create_server(
            lambda: Handshake(gateway, http_factory),
            sock=sock,
            ssl=ssl_ctx,
            backlog=2048,
            ssl_handshake_timeout=settings.server.handshake_timeout_s if ssl_ctx else None,
        )
        self.stopped = asyncio.Event()
        for sig, close in ((signal.SIGTERM, Close.GOING_AWAY), (signal.SIGUSR1, Close.RESTARTING)):
            loop.add_signal_handler(sig, self.request_stop, int(close))
        loop.add_signal_handler(signal.SIGQUIT, os._exit, 0)
        self.listening = True
        # Everything built at boot lives as long as the worker: out of the collector's
        # sight, a full collection walks only what clients created (ms, not 100 ms).
        gc.freeze()
        self.heartbeat()
        log.info("worker ready", extra={"fields": {"port": settings.server.port}})
        sweeper = loop.create_task(self.periodic())
        await self.stopped.wait()
        code = self.stop_code or int(Close.GOING_AWAY)
        server.close()
        if admin is not None:
            await admin.cleanup()
        gateway.draining = True
        gateway.drain_code = code
        self.heartbeat()
        gateway.close_all(
            code, "gateway restarting" if code == Close.RESTARTING else "shutting down"
        )
        deadline = time.monotonic() + settings.server.graceful_timeout_s
        while gateway.closing and time.monotonic() < deadline:
            hub.flush()
            await asyncio.sleep(0.05)
        for conn in list(gateway.closing):
            conn.transport.abort()
        sweeper.cancel()
        await link.close()
        if isinstance(keys, JwksCache):
            await keys.close()
        await runner.cleanup()
        return 0

    async def start_admin(self, app: web.Application) -> web.AppRunner | None:
        """The admin listener, shared by every worker like the public port (None when off).

        Taken down first when the worker stops: the workers that stay answer for the gateway.
        """
        admin = self.settings.admin
        if not admin.port:
            return None
        try:
            sock = listen_socket(admin.host, admin.port, backlog=128)
        except BootError as exc:
            raise BootError(f"admin listener: {exc} (admin.port; 0 turns it off)") from None
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=runtime.http_shutdown_timeout(self.settings.server.graceful_timeout_s),
        )
        await runner.setup()
        await web.SockSite(runner, sock).start()
        return runner

    def request_stop(self, code: int) -> None:
        if self.stop_code is None:
            self.stop_code = code
            log.info("worker stopping", extra={"close_code": code})
        if self.stopped is not None:
            self.stopped.set()

    def on_nats_status(self, up: bool) -> None:
        self.hub.on_nats_status(up)
        if up and self.link.reconnects:
            metrics.NATS_RECONNECTS.inc()
        self.heartbeat()

    def heartbeat(self) -> None:
        self.state_file.write(self.state())

    def beat(self, now: float) -> None:
        """The periodic heartbeat: the rates since the last one, then the state file."""
        self.rates.measure(self.hub.forwarded_total, self.hub.dropped_total, now)
        self.heartbeat()

    async def periodic(self) -> None:
        """The worker's one timer: sweep + heartbeat every second, pings every interval.

        Every step runs guarded: an exception in one (EMFILE, a bug) is logged
        and counted and the task goes on, because a dead timer means no
        heartbeat, no deadlines, and a worker the supervisor kills with all
        its clients.
        """
        interval = self.settings.server.heartbeat_interval_s
        ping_every = self.settings.ws.ping_interval_s
        next_ping = time.monotonic() + ping_every
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + interval
            await asyncio.sleep(interval)
            self.loop_lag = max(0.0, loop.time() - expected)
            now = time.monotonic()
            self.guarded("load", self.shed_check)
            self.guarded("process", self.sample_process, now)
            self.guarded("sweep", self.gateway.sweep, now)
            if now >= next_ping:
                next_ping = now + ping_every
                self.guarded("ping", self.gateway.ping_idle, now)
            self.guarded("heartbeat", self.beat, now)
            self.guarded("title", self.update_title, now)

    def guarded(self, step: str, fn: Callable[..., None], *args: float) -> None:
        """Run one periodic step; an exception is counted, logged once per kind, survived."""
        try:
            fn(*args)
        except Exception as exc:
            metrics.PERIODIC_ERRORS.labels(step).inc()
            kind = (step, type(exc).__name__)
            if kind not in self._failed_kinds:
                self._failed_kinds.add(kind)
                log.error(
                    "periodic task step failed; going on",
                    exc_info=exc,
                    extra={"code": Code.INTERNAL, "reason": f"{step}: {type(exc).__name__}"},
                )

    def sample_process(self, now: float) -> None:
        self.process.sample(rss_bytes(), now)

    def shed_check(self) -> None:
        """Feed the load shedder one sample; log and export when it changes its mind."""
        metrics.LOOP_LAG.observe(self.loop_lag)
        metrics.NATS_CONNECTED.set(1 if self.link.connected else 0)
        shedder = self.gateway.shedder
        if shedder.update(self.loop_lag, rss_bytes()):
            metrics.LOAD_SHEDDING.set(1 if shedder.shedding else 0)
            if shedder.shedding:
                log.warning(
                    "shedding new handshakes",
                    extra={"code": Code.LIMIT_EXCEEDED, "reason": shedder.reason},
                )
            else:
                log.info("load shedding over")

    def update_title(self, now: float) -> None:
        if now - self._title_at >= 5.0:
            self._title_at = now
            setproctitle(
                f"fanout worker {self.index} :{self.settings.server.port} "
                f"[{len(self.hub.connections)} clients]"
            )


def run(settings: Settings, index: int, state_dir: Path) -> int:
    """Entry point of a forked worker; returns its exit code."""
    logs.setup(settings.log.level, worker=index, fmt=settings.log.format)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    setproctitle(f"fanout worker {index} :{settings.server.port} [0 clients]")
    worker = Worker(settings, index, state_dir)
    try:
        return uvloop.run(worker.serve())
    except BootError as exc:
        log.error(str(exc), extra={"reason": "boot"})
        (state_dir / f"boot-error-{os.getpid()}.txt").write_text(str(exc))
        return WORKER_BOOT_ERROR
