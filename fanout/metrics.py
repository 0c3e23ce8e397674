"""Prometheus series, in multiprocess mode: any worker's /metrics is the whole gateway.

Import this module only in a worker, after the supervisor has set
``PROMETHEUS_MULTIPROC_DIR``: prometheus_client picks its value backend at
import time. The seed's series keep their exact names (dashboards use them).
Hot-path counts are kept in plain ints by the hub and added here once per
sweep, because a multiprocess counter increment is an mmap write.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
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

from fanout import runtime

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

#: Why a handshake was refused with 503 XYW007: the only values of the ``limit`` label.
LIMITS = ("draining", "shedding", "handshake_rate", "worker_full", "per_ip", "per_principal")
LIMIT_REFUSALS = Counter(
    "fanout_limit_refusals", "WebSocket handshakes refused by a connection limit", ["limit"]
)
HANDSHAKE_TIMEOUTS = Counter(
    "fanout_handshake_timeouts", "Sockets cut for not finishing the upgrade in time"
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

#: The steps of a worker's periodic task: the only values of the ``step`` label.
PERIODIC_STEPS = ("load", "sweep", "ping", "heartbeat", "title")
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
