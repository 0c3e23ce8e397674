"""What an operator sees: the per-worker, build, handshake and lifetime series, read
through a real /metrics scrape of a real gateway; then the shipped Grafana dashboard
and alert rules, run by a real Prometheus scraping a real gateway."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import nats
import pytest

import fanout
from fanout.devtoken import make_token
from fanout.embedded_nats import EmbeddedNats, free_port
from tests.conftest import ROOT, Gateway, http_get, sample, scrape, worker_pid
from tests.helpers import async_wait_for, wait_for
from tests.integration.wsclient import WsClient, raw_handshake, wait_for_interest

ORIGIN = "https://app.example.com"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape_when(gw: Gateway, check: Callable[[Samples], bool]) -> Callable[[], Samples]:
    """A condition for :func:`async_wait_for`: a scrape for which ``check`` holds, else none
    (hot-path and process series move once per sweep)."""

    def scraped() -> Samples:
        samples = scrape(gw)
        return samples if check(samples) else {}

    return scraped


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
        "protocol": "v1.2",
        "python": platform.python_version(),
        "nats_py": metadata.version("nats-py"),
        "aiohttp": metadata.version("aiohttp"),
        "uvloop": metadata.version("uvloop"),
        "msgspec": metadata.version("msgspec"),
        "prometheus_client": metadata.version("prometheus-client"),
    }
    assert sample(samples, "fanout_build_info", **labels) == 1
    assert sum(1 for name, _ in samples if name == "fanout_build_info") == 1


async def test_each_worker_publishes_its_rss_fds_and_cpu(gateway: Gateway, token: str) -> None:
    pid = str(worker_pid(gateway))
    before = await async_wait_for(
        scrape_when(
            gateway, lambda s: (sample(s, "fanout_worker_resident_memory_bytes", pid=pid) or 0) > 0
        ),
        what="the worker's RSS series",
    )
    fds = sample(before, "fanout_worker_open_fds", pid=pid)
    assert fds is not None and fds >= 4  # stdio, the listener, the NATS socket at least
    rss = sample(before, "fanout_worker_resident_memory_bytes", pid=pid)
    assert rss is not None and rss > 10 * 2**20  # a Python process with its libraries
    cpu = sample(before, "fanout_worker_cpu_seconds_total", pid=pid)
    assert cpu is not None and cpu > 0
    client = await WsClient.connect(gateway.ws, token, origin=ORIGIN)
    try:
        after = await async_wait_for(
            scrape_when(
                gateway, lambda s: (sample(s, "fanout_worker_open_fds", pid=pid) or 0) >= fds + 1
            ),
            what="one more open fd with a client connected",
        )
        assert (sample(after, "fanout_worker_cpu_seconds_total", pid=pid) or 0) >= cpu
    finally:
        await client.close()
    rows = [labels for name, labels in after if name == "fanout_worker_resident_memory_bytes"]
    assert rows == [frozenset({("pid", pid)})]


async def test_a_replaced_workers_gauges_go_and_its_cpu_count_stays(gateway: Gateway) -> None:
    old = str(worker_pid(gateway))
    await async_wait_for(
        scrape_when(
            gateway, lambda s: (sample(s, "fanout_worker_cpu_seconds_total", pid=old) or 0) > 0
        ),
        what="the old worker's CPU series",
    )
    os.kill(int(old), signal.SIGKILL)

    def replaced() -> bool:
        try:  # the only worker is gone until its replacement listens
            status, body, _ = http_get(gateway.admin + "/healthz", 1.0)
        except OSError:
            return False
        workers = json.loads(body)["workers"] if status == 200 else []
        return len(workers) == 1 and str(workers[0]["pid"]) != old

    await async_wait_for(replaced, 20, "a replacement worker listening")
    new = str(worker_pid(gateway))
    samples = await async_wait_for(
        scrape_when(
            gateway, lambda s: (sample(s, "fanout_worker_resident_memory_bytes", pid=new) or 0) > 0
        ),
        what="the new worker's RSS series",
    )
    for gauge in ("fanout_worker_resident_memory_bytes", "fanout_worker_open_fds"):
        rows = [dict(labels) for name, labels in samples if name == gauge]
        assert rows == [{"pid": new}], gauge
    cpu = {
        dict(labels)["pid"] for name, labels in samples if name == "fanout_worker_cpu_seconds_total"
    }
    assert cpu == {old, new}


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
        outcome: sample(samples, "fanout_handshakes_total", outcome=outcome) for outcome in outcomes
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
    assert sample(samples, "fanout_limit_refusals_total", limit="per_ip") == 1
    assert sample(samples, "fanout_handshake_failures_total", code="XYW006") == 1


async def test_connection_lifetime_is_observed_when_a_connection_ends(
    gateway: Gateway, token: str, nats_server: EmbeddedNats
) -> None:
    name = "fanout_connection_duration_seconds"
    assert sample(scrape(gateway), f"{name}_count") == 0
    client = await WsClient.connect(gateway.ws, token, origin=ORIGIN)
    try:
        await client.subscribe("xy.md.life")
        nc = await nats.connect(nats_server.url)
        await wait_for_interest(nc, client, "xy.md.life")
        await nc.close()
        assert sample(scrape(gateway), f"{name}_count") == 0  # still open: nothing observed
    finally:
        await client.close()
    samples = await async_wait_for(
        scrape_when(gateway, lambda s: sample(s, f"{name}_count") == 1),
        what="one connection lifetime observed",
    )
    total = sample(samples, f"{name}_sum")
    assert total is not None and total > 0
    assert sample(samples, f"{name}_bucket", le="+Inf") == 1
    assert sample(samples, f"{name}_bucket", le="86400.0") == 1


# -- the dashboard and the alerts, on a real Prometheus ---------------------------
DASHBOARD = ROOT / "deploy" / "grafana" / "fanout.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
#: What Grafana puts in place of the dashboard's variables, for querying Prometheus directly.
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "instance": ".*"}
ALERT_NAMES = {
    "FanoutNatsDown",
    "FanoutSlowConsumersRising",
    "FanoutDropsRising",
    "FanoutWorkerRestarts",
    "FanoutEventLoopLag",
    "FanoutHandshakeFailures",
    "FanoutGatewayDown",
    "FanoutNearConnectionCap",
    "FanoutLoadShedding",
}


def dashboard_panels() -> dict[str, list[str]]:
    """Panel title -> its query expressions, rows' nested panels included."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels: dict[str, list[str]] = {}
    for panel in dashboard["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            if p.get("targets"):
                assert p["title"] not in panels, f"two panels titled {p['title']!r}"
                panels[p["title"]] = [t["expr"] for t in p["targets"]]
    return panels


def concrete(expr: str) -> str:
    """``expr`` with Grafana's variables replaced (an unknown one fails the test)."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: GRAFANA_VARIABLES[m.group(1)], expr)


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "fanout-gateway"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["allValue"] == ".*"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert set(re.findall(r"\$\{?(\w+)\}?", target["expr"])) <= set(GRAFANA_VARIABLES)
    panels = dashboard_panels()
    wanted = {
        "Connections",
        "Deliveries/s",
        "Drops/s by reason",
        "Slow consumers cut/s",
        "Event loop lag",
        "Handshakes refused by reason",
        "NATS state",
        "RSS per worker",
        "Open fds per worker",
        "Request outcomes",
        "Request latency",
    }
    assert wanted <= set(panels)


def test_promtool_checks_the_alert_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    done = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(ALERT_NAMES)} rules found" in done.stdout


@dataclass
class Prometheus:
    """A real Prometheus on loopback (never the system service), queried over HTTP."""

    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def get(self, path: str, **params: str) -> dict[str, Any]:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        _, body, _ = http_get(f"{self.url}{path}{query}")
        answer: dict[str, Any] = json.loads(body)
        return answer

    def query(self, expr: str) -> dict[str, Any]:
        return self.get("/api/v1/query", query=expr)

    def series(self, expr: str) -> list[dict[str, Any]]:
        answer = self.query(expr)
        assert answer["status"] == "success", (expr, answer)
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI must provide prometheus (.ci/run installs the Debian package)")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    return path


@pytest.fixture
def prometheus(gateway: Gateway, tmp_path: Path) -> Iterator[Prometheus]:
    binary = prometheus_binary()
    config = tmp_path / "prometheus.yml"
    # JSON is YAML: a 1 s scrape of the gateway, the shipped rules evaluated every second
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(ALERTS)],
                "scrape_configs": [
                    {
                        "job_name": "fanout",
                        # /metrics is on the admin listener
                        "static_configs": [{"targets": [gateway.admin.removeprefix("http://")]}],
                    }
                ],
            }
        )
    )
    port = free_port()
    log_path = tmp_path / "prometheus.log"
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log_path.open("ab"),
        stderr=subprocess.STDOUT,
    )
    server = Prometheus(f"http://127.0.0.1:{port}", proc, log_path)

    def ready() -> bool:
        assert proc.poll() is None, log_path.read_text()
        try:
            return http_get(f"{server.url}/-/ready", 1.0)[0] == 200
        except OSError:  # not listening yet
            return False

    try:
        wait_for(ready, 30, "prometheus to be ready")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def series_when(
    prom: Prometheus, expr: str, ok: Callable[[list[dict[str, Any]]], bool]
) -> Callable[[], list[dict[str, Any]]]:
    """A condition for :func:`async_wait_for`: the result of ``expr`` once it satisfies ``ok``,
    else none (scrapes land once a second)."""

    def result() -> list[dict[str, Any]]:
        rows = prom.series(expr)
        return rows if ok(rows) else []

    return result


def positive(result: list[dict[str, Any]]) -> bool:
    return bool(result) and all(float(row["value"][1]) > 0 for row in result)


async def publish_until_cancelled(nc: nats.aio.client.Client, subject: str) -> None:
    for n in range(20_000):  # bounded: about 15 minutes at this pace, far beyond the test
        await nc.publish(subject, json.dumps({"n": n}).encode())
        await asyncio.sleep(0.05)  # waits on: the pace of a steady trickle for the rate panels


async def test_every_dashboard_and_alert_expression_runs_on_a_real_prometheus(
    gateway: Gateway, prometheus: Prometheus, token: str, nats_server: EmbeddedNats
) -> None:
    await async_wait_for(
        series_when(prometheus, 'up{job="fanout"}', positive), 30, "the first scrape"
    )
    client = await WsClient.connect(gateway.ws, token, origin=ORIGIN)
    nc = await nats.connect(nats_server.url)
    publisher: asyncio.Task[None] | None = None
    try:
        await client.subscribe("xy.md.dash")
        await wait_for_interest(nc, client, "xy.md.dash")
        publisher = asyncio.create_task(publish_until_cancelled(nc, "xy.md.dash"))
        panels = {
            title: [concrete(e) for e in exprs] for title, exprs in dashboard_panels().items()
        }
        # the key panels show data once a client is connected and messages flow
        for title in ("Connections", "Deliveries/s", "NATS state", "RSS per worker"):
            for expr in panels[title]:
                await async_wait_for(
                    series_when(prometheus, expr, positive), 30, f"data in {title}: {expr}"
                )
        (connections,) = prometheus.series(panels["Connections"][0])
        assert float(connections["value"][1]) == 1
        rss = prometheus.series(panels["RSS per worker"][0])
        assert [row["metric"]["pid"] for row in rss] == [str(worker_pid(gateway))]
        # every panel's every expression parses and runs
        for title, exprs in panels.items():
            for expr in exprs:
                answer = prometheus.query(expr)
                assert answer["status"] == "success", (title, expr, answer)
    finally:
        if publisher is not None:
            publisher.cancel()
        await nc.close()
        await client.close()
    # every alert Prometheus loaded from the shipped file, evaluated without error
    rules = await loaded_rules(prometheus)
    assert set(rules) == ALERT_NAMES
    for name, rule in rules.items():
        assert prometheus.query(rule["query"])["status"] == "success", name
    # quiet on a healthy gateway
    for name in (
        "FanoutGatewayDown",
        "FanoutNatsDown",
        "FanoutLoadShedding",
        "FanoutNearConnectionCap",
    ):
        assert prometheus.series(rules[name]["query"]) == [], name
    # and the gateway-down alert's expression sees a stopped gateway
    gateway.stop()
    (down,) = await async_wait_for(
        series_when(prometheus, rules["FanoutGatewayDown"]["query"], bool),
        30,
        "FanoutGatewayDown to see the stopped gateway",
    )
    assert down["metric"]["instance"] == gateway.admin.removeprefix("http://")


async def loaded_rules(prom: Prometheus) -> dict[str, dict[str, Any]]:
    """The loaded alerting rules by name, once each has been evaluated and found healthy."""

    def healthy() -> dict[str, dict[str, Any]]:
        answer = prom.get("/api/v1/rules", type="alert")
        assert answer["status"] == "success", answer
        rules = {r["name"]: r for g in answer["data"]["groups"] for r in g["rules"]}
        return rules if all(r["health"] == "ok" for r in rules.values()) else {}

    return await async_wait_for(healthy, 30, "every alert rule evaluated and healthy")
