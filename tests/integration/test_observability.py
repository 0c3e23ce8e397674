"""What an operator sees: the per-worker, build, handshake and lifetime series, read
through a real /metrics scrape of a real gateway."""

from __future__ import annotations

import asyncio
import json
import platform
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

import fanout
from fanout.devtoken import make_token
from fanout.embedded_nats import EmbeddedNats
from tests.conftest import Gateway, http_get
from tests.integration.test_gateway_core import wait_for_interest
from tests.integration.wsclient import WsClient, raw_handshake

ORIGIN = "https://app.example.com"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(gw: Gateway) -> Samples:
    """Every sample of one /metrics scrape, keyed by name and labels."""
    status, body, _ = http_get(gw.http + "/metrics")
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def wait_scrape(
    gw: Gateway, check: Callable[[Samples], bool], timeout: float = 10.0
) -> Samples:
    """Scrape until ``check`` holds (hot-path and process series move once per sweep)."""
    samples = scrape(gw)
    async with asyncio.timeout(timeout):
        while not check(samples):
            await asyncio.sleep(0.1)
            samples = scrape(gw)
    return samples


def worker_pid(gw: Gateway) -> str:
    status, body, _ = http_get(gw.http + "/healthz")
    assert status == 200
    (worker,) = json.loads(body)["workers"]
    return str(worker["pid"])


@pytest.fixture
def gateway(
    make_gateway: Callable[..., Gateway], nats_server: EmbeddedNats, keypair: tuple[Path, Path]
) -> Gateway:
    return make_gateway(
        "--workers",
        "1",
        NATS_URLS=nats_server.url,
        JWT_PUBLIC_KEY=str(keypair[1]),
        WS_ALLOWED_ORIGINS=ORIGIN,
        FANOUT_SERVER_MAX_CONNECTIONS_PER_IP="1",
    )


@pytest.fixture
def token(keypair: tuple[Path, Path]) -> str:
    return make_token(
        private_key_pem=keypair[0].read_bytes(), sub="ops", subjects=["xy.md.>"], ttl_s=600
    )


def refused_status(gw: Gateway, **headers: str) -> bytes:
    sock, head = raw_handshake(gw.port, headers=headers)
    sock.close()
    return head.split(b"\r\n", 1)[0]


def test_build_info_names_what_runs(gateway: Gateway) -> None:
    samples = scrape(gateway)
    labels = {
        "version": fanout.__version__,
        "protocol": "v1.1",
        "python": platform.python_version(),
        "nats_py": metadata.version("nats-py"),
        "aiohttp": metadata.version("aiohttp"),
        "uvloop": metadata.version("uvloop"),
        "msgspec": metadata.version("msgspec"),
        "prometheus_client": metadata.version("prometheus-client"),
    }
    assert value(samples, "fanout_build_info", **labels) == 1
    assert sum(1 for name, _ in samples if name == "fanout_build_info") == 1


async def test_each_worker_publishes_its_rss_fds_and_cpu(gateway: Gateway, token: str) -> None:
    pid = worker_pid(gateway)
    before = await wait_scrape(
        gateway, lambda s: (value(s, "fanout_worker_resident_memory_bytes", pid=pid) or 0) > 0
    )
    fds = value(before, "fanout_worker_open_fds", pid=pid)
    assert fds is not None and fds >= 4  # stdio, the listener, the NATS socket at least
    rss = value(before, "fanout_worker_resident_memory_bytes", pid=pid)
    assert rss is not None and rss > 10 * 2**20  # a Python process with its libraries
    cpu = value(before, "fanout_worker_cpu_seconds_total", pid=pid)
    assert cpu is not None and cpu > 0
    client = await WsClient.connect(gateway.ws, token, origin=ORIGIN)
    try:
        after = await wait_scrape(
            gateway, lambda s: (value(s, "fanout_worker_open_fds", pid=pid) or 0) >= fds + 1
        )
        assert (value(after, "fanout_worker_cpu_seconds_total", pid=pid) or 0) >= cpu
    finally:
        await client.close()
    rows = [labels for name, labels in after if name == "fanout_worker_resident_memory_bytes"]
    assert rows == [frozenset({("pid", pid)})]


async def test_handshakes_by_outcome(gateway: Gateway, token: str) -> None:
    samples = scrape(gateway)
    outcomes = {
        dict(labels)["outcome"]: v
        for (name, labels), v in samples.items()
        if name == "fanout_handshakes_total"
    }
    assert set(outcomes) == {
        "accepted",
        "refused_unauthorized",
        "refused_token_invalid",
        "refused_origin",
        "refused_malformed",
        "refused_draining",
        "refused_shedding",
        "refused_handshake_rate",
        "refused_worker_full",
        "refused_per_ip",
        "refused_per_principal",
        "refused_other",
    }
    assert set(outcomes.values()) == {0}
    assert refused_status(gateway, Origin="https://evil.example") == b"HTTP/1.1 403 Forbidden"
    assert refused_status(gateway, Origin=ORIGIN).startswith(b"HTTP/1.1 401")
    assert refused_status(gateway, Origin=ORIGIN, Authorization="Bearer not.a.jwt").startswith(
        b"HTTP/1.1 401"
    )
    client = await WsClient.connect(gateway.ws, token, origin=ORIGIN)
    try:
        # max_connections_per_ip = 1: a second client from 127.0.0.1 is refused by that limit
        assert refused_status(gateway, Origin=ORIGIN, Authorization=f"Bearer {token}").startswith(
            b"HTTP/1.1 503"
        )
        samples = scrape(gateway)
    finally:
        await client.close()
    counted = {
        outcome: value(samples, "fanout_handshakes_total", outcome=outcome) for outcome in outcomes
    }
    assert counted == {
        **dict.fromkeys(outcomes, 0.0),
        "accepted": 1.0,
        "refused_origin": 1.0,
        "refused_unauthorized": 1.0,
        "refused_token_invalid": 1.0,
        "refused_per_ip": 1.0,
    }
    # the older series are still there, unchanged in meaning
    assert value(samples, "fanout_limit_refusals_total", limit="per_ip") == 1
    assert value(samples, "fanout_handshake_failures_total", code="XYW006") == 1


async def test_connection_lifetime_is_observed_when_a_connection_ends(
    gateway: Gateway, token: str, nats_server: EmbeddedNats
) -> None:
    name = "fanout_connection_duration_seconds"
    assert value(scrape(gateway), f"{name}_count") == 0
    client = await WsClient.connect(gateway.ws, token, origin=ORIGIN)
    try:
        await client.subscribe("xy.md.life")
        nc = await nats.connect(nats_server.url)
        await wait_for_interest(nc, client, "xy.md.life")
        await nc.close()
        assert value(scrape(gateway), f"{name}_count") == 0  # still open: nothing observed
    finally:
        await client.close()
    samples = await wait_scrape(gateway, lambda s: value(s, f"{name}_count") == 1)
    total = value(samples, f"{name}_sum")
    assert total is not None and total > 0
    assert value(samples, f"{name}_bucket", le="+Inf") == 1
    assert value(samples, f"{name}_bucket", le="86400.0") == 1
