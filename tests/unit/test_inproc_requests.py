"""The request broker in-process: a real nats-server, the real NatsLink, a tiny responder,
and the broker's clock, wall clock and entropy injected, so the breaker's reset and the
rate limiter's refill are scripted instead of waited for."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from prometheus_client import REGISTRY

from fanout.core import metadata
from fanout.core.interceptors import BreakerState
from fanout.embedded_nats import EmbeddedNats
from fanout.worker.request_broker import SERVICE_ERROR_CODE, RequestBroker
from tests.helpers import async_wait_for
from tests.inproc import Client, Clock, InProc, make_settings

FAILURES = 3
RESET_S = 10.0
BURST = 8
MAX_IN_FLIGHT = 3
WALL = 1_800_000_000.0
_entropy = itertools.count(1)


def entropy(n: int) -> bytes:
    """Deterministic and never all zeros (an all-zero trace id is invalid)."""
    return bytes((next(_entropy) % 255) + 1 for _ in range(n))


class Responder:
    """The service: ``svc.ok.*`` echoes the headers it got, ``svc.flaky.*`` fails with a
    nats.micro 500 until made healthy, ``svc.silent.*`` never answers."""

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self.healthy = False
        self.calls = 0

    async def start(self) -> None:
        await self.nc.subscribe("svc.ok.*", cb=self.ok)
        await self.nc.subscribe("svc.flaky.*", cb=self.flaky)
        await self.nc.subscribe("svc.silent.*", cb=self.silent)
        await self.nc.flush()

    async def ok(self, msg: Msg) -> None:
        await msg.respond(json.dumps(dict(msg.headers or {})).encode())

    async def flaky(self, msg: Msg) -> None:
        self.calls += 1
        if self.healthy:
            await msg.respond(b'"fine"')
        else:
            headers = {SERVICE_ERROR_CODE: "500", "Nats-Service-Error": "database down"}
            await self.nc.publish(msg.reply, b"", headers=headers)

    async def silent(self, msg: Msg) -> None:
        self.calls += 1


class Rig:
    def __init__(self, w: InProc, broker: RequestBroker, responder: Responder) -> None:
        self.w = w
        self.broker = broker
        self.responder = responder

    async def client(self, peer: str = "127.0.0.1") -> Client:
        client = await self.w.connect(peer=peer)
        client.received()
        return client


@pytest_asyncio.fixture
async def rig(nats_module: EmbeddedNats) -> AsyncIterator[Rig]:
    settings = make_settings(
        **{
            "ws.auth_required": False,
            "nats.urls": [nats_module.url],
            "requests.whitelist": ["svc.>"],
            "requests.rate": 1,
            "requests.burst": BURST,
            "requests.max_in_flight": MAX_IN_FLIGHT,
            "requests.default_timeout_ms": 150,
            "requests.max_timeout_ms": 150,
            "requests.breaker_failures": FAILURES,
            "requests.breaker_reset_s": RESET_S,
            "requests.breaker_timeout_floor_ms": 100,
        }
    )
    w = InProc(settings, clock=Clock(wall=WALL))
    link = await w.start_nats()
    broker = RequestBroker(
        settings,
        link,
        client_log=w.gateway.client_log,
        entropy=entropy,
        clock=w.clock.now,
        wall=w.clock.wall,
    )
    w.gateway.requests = broker
    nc = await nats.connect(nats_module.url)
    responder = Responder(nc)
    await responder.start()
    yield Rig(w, broker, responder)
    await nc.close()
    await w.stop()


def request(op_id: int, subject: str, **kw: Any) -> dict[str, Any]:
    return {"op": "request", "id": op_id, "subject": subject, **kw}


async def answers(client: Client, n: int = 1) -> list[dict[str, Any]]:
    """The next ``n`` frames, waited for (a reply comes from a task)."""
    got: list[dict[str, Any]] = []

    def enough() -> bool:
        got.extend(client.received())
        return len(got) >= n

    await async_wait_for(enough, what=f"{n} answers")
    assert len(got) == n, got
    return got


def circuit_state() -> float | None:
    """The worst circuit of the whitelist pattern, as exported."""
    return REGISTRY.get_sample_value("fanout_circuit_state", {"subject_pattern": "svc.>"})


async def ask(client: Client, op: dict[str, Any]) -> dict[str, Any]:
    client.send(op)
    [frame] = await answers(client)
    return frame


async def test_metadata_is_built_from_the_injected_clock_and_entropy(rig: Rig) -> None:
    client = await rig.client()
    reply = await ask(client, request(1, "svc.ok.get", headers={"correlationId": "order-7"}))
    assert reply["op"] == "reply" and reply["id"] == 1
    seen = reply["data"]
    ulid = seen[metadata.MSG_ID]
    assert ulid[:10] == metadata.new_ulid(WALL, bytes(10))[:10], "the time part is the wall's"
    assert seen[metadata.TIMESTAMP] == metadata.iso_timestamp(WALL)
    assert seen[metadata.CORRELATION_ID] == "order-7"
    assert seen[metadata.CONN] == client.conn.conn_id
    assert reply["hdr"][metadata.TRACEPARENT] == seen[metadata.TRACEPARENT]


async def test_no_responders_is_xyw013(rig: Rig) -> None:
    client = await rig.client()
    frame = await ask(client, request(1, "svc.nobody.home", timeout_ms=1000))
    assert frame == {
        "op": "error",
        "id": 1,
        "code": "XYW013",
        "message": "no responders on svc.nobody.home",
    }


async def test_a_subject_outside_the_whitelist_is_refused_at_once(rig: Rig) -> None:
    client = await rig.client()
    client.send(request(1, "other.get"))
    [frame] = client.received()
    assert (frame["op"], frame["code"]) == ("error", "XYW002")


async def test_the_deadline_is_capped_and_a_short_one_does_not_count_against_the_service(
    rig: Rig,
) -> None:
    client = await rig.client()
    short = await ask(client, request(1, "svc.silent.t", timeout_ms=50))
    assert (short["code"], short["message"]) == ("XYW012", "no reply within 50 ms on svc.silent.t")
    assert rig.broker.breakers.state("svc.silent.t") == BreakerState.CLOSED
    assert len(rig.broker.breakers) == 0, "below the floor: neutral"
    capped = await ask(client, request(2, "svc.silent.t", timeout_ms=60_000))
    assert (capped["code"], capped["message"]) == (
        "XYW012",
        "no reply within 150 ms on svc.silent.t",
    )
    assert len(rig.broker.breakers) == 1, "at the floor or above: a failure"


async def test_breaker_opens_rejects_without_nats_then_half_opens_on_the_scripted_clock(
    rig: Rig,
) -> None:
    client = await rig.client()
    subject = "svc.flaky.get"
    for op_id in range(1, FAILURES + 1):
        frame = await ask(client, request(op_id, subject))
        assert frame["hdr"][SERVICE_ERROR_CODE] == "500"
    assert rig.broker.breakers.state(subject) == BreakerState.OPEN
    assert circuit_state() == BreakerState.OPEN
    calls = rig.responder.calls
    client.send(request(10, subject))
    [refused] = client.received()
    assert (refused["code"], refused["message"]) == ("XYW011", f"circuit open for {subject}")
    assert 0 < refused["retry_after_ms"] <= RESET_S * 1000
    assert rig.responder.calls == calls, "NATS untouched while open"
    other = await ask(client, request(11, "svc.flaky.list"))
    assert other["op"] == "reply", "one breaker per subject"
    rig.w.clock.advance(RESET_S)
    probe = await ask(client, request(12, subject))
    assert probe["hdr"][SERVICE_ERROR_CODE] == "500"
    assert rig.broker.breakers.state(subject) == BreakerState.OPEN, "a failed probe reopens"
    rig.w.clock.advance(RESET_S)
    rig.responder.healthy = True
    assert (await ask(client, request(13, subject)))["data"] == "fine"
    assert rig.broker.breakers.state(subject) == BreakerState.CLOSED
    assert circuit_state() == BreakerState.CLOSED
    assert (await ask(client, request(14, subject)))["data"] == "fine"


async def test_rate_limit_refuses_past_the_burst_and_refills_on_the_scripted_clock(
    rig: Rig,
) -> None:
    client = await rig.client()
    for op_id in range(1, BURST + 1):
        assert (await ask(client, request(op_id, "svc.ok.get")))["op"] == "reply"
    client.send(request(BURST + 1, "svc.ok.get"))
    [limited] = client.received()
    assert limited["code"] == "XYW010"
    assert 0 < limited["retry_after_ms"] <= 1000
    other = await rig.client(peer="127.0.0.9")
    assert (await ask(other, request(1, "svc.ok.get")))["op"] == "reply", "a bucket per client"
    rig.w.clock.advance(1.0)
    assert (await ask(client, request(BURST + 2, "svc.ok.get")))["op"] == "reply"


async def test_in_flight_cap_per_connection(rig: Rig) -> None:
    client = await rig.client()
    client.send(*[request(i, "svc.silent.cap", timeout_ms=50) for i in range(1, MAX_IN_FLIGHT + 3)])
    refused = client.received()
    assert [(f["id"], f["code"]) for f in refused] == [
        (MAX_IN_FLIGHT + 1, "XYW007"),
        (MAX_IN_FLIGHT + 2, "XYW007"),
    ]
    timeouts = await answers(client, MAX_IN_FLIGHT)
    assert sorted(f["id"] for f in timeouts) == list(range(1, MAX_IN_FLIGHT + 1))
    assert {f["code"] for f in timeouts} == {"XYW012"}
    assert rig.broker.in_flight == {}
