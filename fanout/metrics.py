"""Prometheus series, in multiprocess mode: any worker's /metrics is the whole gateway.

Import this module only in a worker, after the supervisor has set
``PROMETHEUS_MULTIPROC_DIR``: prometheus_client picks its value backend at
import time. Series keep the exact names listed in README.md (Health, readiness,
metrics, logs) and docs/requests.md (Metrics): dashboards use them.
Hot-path counts are kept in plain ints by the hub and added here once per
sweep, because a multiprocess counter increment is an mmap write.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fanout import __version__, runtime
from fanout.core.protocol import PROTOCOL_VERSION

ACTIVE_CONNECTIONS = Gauge(
    "xy_ws_active_connections", "Open WebSocket connections", multiprocess_mode="livesum"
)
FORWARDED = Counter("xy_ws_messages_forwarded", "Messages written to WebSocket clients")
DROPPED = Counter("xy_ws_messages_dropped", "Messages dropped by backpressure", ["reason"])
SLOW_CONSUMERS = Counter("xy_ws_slow_consumers", "Clients cut as slow consumers (4003)")
NATS_RECONNECTS = Counter("xy_nats_reconnects", "NATS reconnections of worker links")
SEND_QUEUE = Gauge(
    "xy_ws_send_queue_size",
    "Frames waiting in client outboxes (sum over clients)",
    multiprocess_mode="livesum",
)
SEND_QUEUE_MAX = Gauge(
    "fanout_send_queue_max",
    "Largest client outbox, in frames",
    multiprocess_mode="livemax",
)
HANDSHAKE_FAILURES = Counter(
    "fanout_handshake_failures", "Refused WebSocket handshakes by error code", ["code"]
)
DISCONNECTS = Counter(
    "fanout_disconnects", "Closed WebSocket connections by close code", ["close_code"]
)
CLIENT_ERRORS = Counter(
    "fanout_client_errors", "Error frames sent to clients by error code", ["code"]
)
NATS_MESSAGES = Counter("fanout_nats_messages", "Messages received from NATS")
SUBSCRIPTIONS = Gauge("fanout_subscriptions", "Client subscriptions", multiprocess_mode="livesum")
NATS_SUBSCRIPTIONS = Gauge(
    "fanout_nats_subscriptions", "NATS subscriptions held by workers", multiprocess_mode="livesum"
)
NATS_CONNECTED = Gauge(
    "fanout_nats_connected", "Workers whose NATS link is up", multiprocess_mode="livesum"
)
LOOP_LAG = Histogram(
    "fanout_event_loop_lag_seconds",
    "How late the worker's periodic sweep ran",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)

#: Labels with bounded values, pre-created so they show as 0 before the first event.
for _reason in ("drop_oldest", "latest", "disconnect"):
    DROPPED.labels(_reason)

#: Outcomes of ``request`` ops (protocol v1.1): the only values of the ``outcome`` label.
REQUEST_OUTCOMES = (
    "ok",
    "service_error",
    "timeout",
    "no_responders",
    "denied",
    "rate_limited",
    "circuit_open",
    "limit",
    "malformed",
    "unavailable",
    "failed",
)
REQUESTS = Counter("fanout_requests", "Client requests (protocol v1.1) by outcome", ["outcome"])
REQUEST_DURATION = Histogram(
    "fanout_request_duration_seconds",
    "Client requests that reached NATS: from the request op to the reply or error frame",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
CIRCUIT_STATE = Gauge(
    "fanout_circuit_state",
    "Worst circuit breaker state under a request whitelist pattern (0 closed, 1 half-open, 2 open)",
    ["subject_pattern"],
    multiprocess_mode="livemax",
)
for _outcome in REQUEST_OUTCOMES:
    REQUESTS.labels(_outcome)

#: Catch-ups of recoverable subscriptions after missed live messages (protocol v1.2), by
#: outcome (``fanout.worker.catch_up.Outcome``), and the messages they read.
RECOVERY_CATCHUP_OUTCOMES = ("complete", "limit", "failed")
RECOVERY_CATCHUPS = Counter(
    "fanout_recovery_catchups",
    "Catch-ups from the stream after live messages were missed, by outcome",
    ["outcome"],
)
RECOVERY_CAUGHT_UP = Counter(
    "fanout_recovery_caught_up_messages", "Messages read from the stream by catch-ups"
)
for _outcome in RECOVERY_CATCHUP_OUTCOMES:
    RECOVERY_CATCHUPS.labels(_outcome)
#: Recovery's tasks (``fanout.worker.recovery``): the only values of the ``task`` label.
RECOVERY_TASKS = ("serve", "read", "rounds", "catch_up")
RECOVERY_TASK_FAILURES = Counter(
    "fanout_recovery_task_failures",
    "Recovery tasks ended by an unexpected exception (logged XYW009; their resumes were "
    "answered unavailable, the clients they held released with a dropped notice)",
    ["task"],
)
for _task in RECOVERY_TASKS:
    RECOVERY_TASK_FAILURES.labels(_task)

#: Why a handshake was refused with 503 XYW007: the only values of the ``limit`` label.
LIMITS = ("shedding", "handshake_rate", "worker_full", "per_ip", "per_principal")
LIMIT_REFUSALS = Counter(
    "fanout_limit_refusals", "WebSocket handshakes refused by a connection limit", ["limit"]
)
HANDSHAKE_TIMEOUTS = Counter(
    "fanout_handshake_timeouts", "Sockets cut for not finishing the upgrade in time"
)
JWKS_FETCH_FAILURES = Counter(
    "fanout_jwks_fetch_failures", "Failed JWKS fetches (the cached keys stay in use)"
)
LOAD_SHEDDING = Gauge(
    "fanout_load_shedding", "Workers shedding new handshakes", multiprocess_mode="livesum"
)
CONNECTION_CAP = Gauge(
    "fanout_connection_cap",
    "WebSocket connection cap in force, after clamping below the fd limit",
    multiprocess_mode="livesum",
)
for _limit in LIMITS:
    LIMIT_REFUSALS.labels(_limit)

#: ``refused_<why>`` for a refused upgrade: the limit's name for 503 XYW007, else the code's
#: meaning. ``HANDSHAKE_OUTCOMES`` are the only values of the ``outcome`` label.
REFUSAL_OUTCOMES = {
    "XYW001": "refused_unauthorized",
    "XYW005": "refused_token_invalid",
    "XYW006": "refused_origin",
    "XYW008": "refused_malformed",
}
HANDSHAKES = Counter("fanout_handshakes", "WebSocket upgrade requests by outcome", ["outcome"])
HANDSHAKE_OUTCOMES = (
    "accepted",
    *REFUSAL_OUTCOMES.values(),
    *(f"refused_{limit}" for limit in LIMITS),
    "refused_other",
)
for _outcome in HANDSHAKE_OUTCOMES:
    HANDSHAKES.labels(_outcome)


def handshake_refused(code: str, limit: str) -> None:
    """Count one refused upgrade under its outcome (a limit's name says more than XYW007)."""
    outcome = f"refused_{limit}" if limit else REFUSAL_OUTCOMES.get(code, "refused_other")
    HANDSHAKES.labels(outcome).inc()


CONNECTION_DURATION = Histogram(
    "fanout_connection_duration_seconds",
    "How long WebSocket connections lasted, observed when each one ends",
    buckets=(1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 12 * 3600.0, 24 * 3600.0),
)

# The default process collector reads only its own process, so in multiprocess mode
# each worker publishes its own figures; "liveall" adds a ``pid`` label and forgets
# a worker once the supervisor has reaped it.
WORKER_RSS = Gauge(
    "fanout_worker_resident_memory_bytes",
    "Resident memory of each worker process",
    multiprocess_mode="liveall",
)
WORKER_FDS = Gauge(
    "fanout_worker_open_fds",
    "Open file descriptors of each worker process",
    multiprocess_mode="liveall",
)
WORKER_CPU = Counter(
    "fanout_worker_cpu_seconds", "User + system CPU time of each worker process", ["pid"]
)


class ProcessSampler:
    """One worker's RSS, open fds and CPU time, published once per sweep.

    Linux >= 6.2 reports the open-fd count as the size of ``/proc/self/fd``
    (one ``stat``); older kernels need a listing whose cost grows with the
    fd count (~0.3 s for 19k fds on a busy host), so there it is spaced to
    take at most 1 % of the loop's time.
    """

    def __init__(self) -> None:
        self.cpu = WORKER_CPU.labels(str(os.getpid()))
        self.cpu_seen = 0.0
        self.list_fds_at = 0.0
        #: The last figures published, for the worker's state file.
        self.rss = 0
        self.fds = 0

    def sample(self, rss: int, now: float) -> None:
        self.rss = rss
        WORKER_RSS.set(rss)
        fds = self.open_fds(now)
        if fds is not None:
            self.fds = fds
            WORKER_FDS.set(fds)
        used = time.process_time()
        self.cpu.inc(max(0.0, used - self.cpu_seen))
        self.cpu_seen = used

    def open_fds(self, now: float) -> int | None:
        try:
            counted = os.stat("/proc/self/fd").st_size
            if counted > 0:
                return counted
            if now < self.list_fds_at:
                return None
            start = time.monotonic()
            counted = len(os.listdir("/proc/self/fd"))
        except OSError:
            return None
        self.list_fds_at = now + 100 * (time.monotonic() - start)
        return counted


@functools.cache
def build_labels() -> dict[str, str]:
    """What runs: fanout, the protocol it speaks, Python and the libraries on its paths."""
    labels = {
        "version": __version__,
        "protocol": f"v{PROTOCOL_VERSION}",
        "python": platform.python_version(),
    }
    for label, dist in (
        ("nats_py", "nats-py"),
        ("aiohttp", "aiohttp"),
        ("uvloop", "uvloop"),
        ("msgspec", "msgspec"),
        ("prometheus_client", "prometheus-client"),
    ):
        try:
            labels[label] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            labels[label] = "none"
    return labels


#: The steps of a worker's periodic task: the only values of the ``step`` label.
PERIODIC_STEPS = ("load", "process", "sweep", "ping", "heartbeat", "title")
PERIODIC_ERRORS = Counter(
    "fanout_periodic_errors",
    "Exceptions in a worker's periodic task by step (the task logs each kind once and goes on)",
    ["step"],
)
for _step in PERIODIC_STEPS:
    PERIODIC_ERRORS.labels(_step)


class GatewayCollector(Collector):
    """Series that come from the shared state files rather than from counters."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        build = build_labels()
        info = GaugeMetricFamily(
            "fanout_build_info", "Always 1; the labels say what runs", labels=list(build)
        )
        info.add_metric(list(build.values()), 1)
        yield info
        states = runtime.read_states(self.state_dir)
        workers = GaugeMetricFamily("fanout_workers", "Live worker processes")
        workers.add_metric([], len(states))
        yield workers
        restarts = CounterMetricFamily(
            "fanout_worker_restarts", "Worker replacements by reason", labels=["reason"]
        )
        for reason, count in sorted(runtime.read_restarts(self.state_dir).items()):
            restarts.add_metric([reason], count)
        yield restarts


def render() -> tuple[bytes, str]:
    """A fresh registry per scrape, summing every live and past worker's files."""
    path = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, str(path))  # type: ignore[no-untyped-call]
    registry.register(GatewayCollector(path))
    return generate_latest(registry), CONTENT_TYPE_LATEST
