"""Subscriptions you can trust (issue 12), against a real nats-server and real clients.

An ack means nats-server has the subscription; a message matching several
patterns arrives once, also while patterns come and go; the worker never holds
two NATS subscriptions for one pattern, and ``fanout_nats_subscriptions`` is
what nats-server reports (its monitoring endpoint ``/connz?subs=1``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import nats
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    precondition,
    rule,
    run_state_machine_as_test,
)

from fanout.core.subjects import matches
from fanout.devtoken import make_token
from fanout.embedded_nats import EmbeddedNats
from tests.conftest import Gateway, http_get, launch_gateway, metric
from tests.helpers import async_wait_for
from tests.integration.wsclient import Frame, WsClient, wait_for_interest

#: The gateway's NATS connection name (``nats.name``).
GATEWAY_NATS_NAME = "fanout"


@pytest.fixture(scope="module")
def nats_mon() -> Iterator[EmbeddedNats]:
    with EmbeddedNats(monitor=True) as server:
        yield server


@pytest.fixture(scope="module")
def gw(
    nats_mon: EmbeddedNats, keypair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gateway = launch_gateway(
        tmp_path_factory.mktemp("gw"),
        "--workers",
        "1",
        NATS_URLS=nats_mon.url,
        JWT_PUBLIC_KEY=str(keypair[1]),
        # 1000-op frames back to back: the churn tests are about the loop, not the rate limit
        FANOUT_WS_INBOUND_RATE="100000",
        FANOUT_WS_INBOUND_BURST="5000",
        FANOUT_WS_ALLOW_FULL_WILDCARD="true",
        FANOUT_NATS_RECONNECT_WAIT_S="0.1",  # the model restarts nats-server
    )
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def token(keypair: tuple[Path, Path]) -> str:
    return make_token(
        private_key_pem=keypair[0].read_bytes(), sub="subs", subjects=["xy.>"], ttl_s=3600
    )


@pytest.fixture
async def nc(nats_mon: EmbeddedNats) -> AsyncIterator[nats.aio.client.Client]:
    client = await nats.connect(nats_mon.url, name="test-publisher")
    yield client
    await client.close()


def nats_subscriptions(server: EmbeddedNats) -> list[str]:
    """The subjects nats-server holds for the gateway's connection(s) (request inboxes aside)."""
    status, body, _ = http_get(server.monitor_url + "/connz?subs=1")
    assert status == 200
    subs: list[str] = []
    for conn in json.loads(body)["connections"] or []:
        if conn.get("name") == GATEWAY_NATS_NAME:
            subs += [s for s in conn.get("subscriptions_list") or [] if not s.startswith("_INBOX.")]
    return subs


async def settled_subscriptions(
    gw: Gateway, server: EmbeddedNats, want: Callable[[list[str]], bool]
) -> list[str]:
    """Wait until nats-server's list satisfies ``want`` and the metric agrees with it."""
    held: list[str] = []

    def check() -> bool:
        nonlocal held
        held = nats_subscriptions(server)
        return want(held) and metric(gw, "fanout_nats_subscriptions") == len(held)

    try:  # in a thread: two blocking HTTP reads per poll
        await async_wait_for(lambda: asyncio.to_thread(check), what="the subscriptions to settle")
    except AssertionError as exc:
        gauge = metric(gw, "fanout_nats_subscriptions")
        raise AssertionError(f"{exc}; held {held}, fanout_nats_subscriptions {gauge}") from None
    return held


async def messages_until(client: WsClient, end: object, timeout: float = 10.0) -> list[object]:
    """The ``data`` of every msg frame up to (not including) the one whose data is ``end``."""
    seen: list[object] = []
    async with asyncio.timeout(timeout):
        while True:
            frame = await client.expect(lambda f: f.get("op") == "msg", timeout)
            if frame.get("data") == end:
                return seen
            seen.append(frame.get("data"))


async def op(client: WsClient, frame: Frame) -> Frame:
    return await client.op(frame, timeout=10)


async def test_a_message_published_right_after_the_ack_is_delivered(
    gw: Gateway, token: str, nc: nats.aio.client.Client
) -> None:
    client = await WsClient.connect(gw.ws, token)
    lost: list[int] = []
    try:
        for i in range(30):
            subject = f"xy.md.ack.{i}.{time.monotonic_ns()}"
            assert await op(client, {"op": "sub", "id": i + 1, "subject": subject}) == {
                "op": "ack",
                "id": i + 1,
            }
            await nc.publish(subject, json.dumps({"n": i}).encode())
            await nc.flush()
            try:
                frame = await client.expect(lambda f: f.get("op") == "msg", timeout=2)
            except TimeoutError:
                lost.append(i)
                continue
            assert frame["data"] == {"n": i}
    finally:
        await client.close()
    assert lost == []


async def test_nothing_of_a_pattern_follows_its_unsub_ack(
    nats_mon: EmbeddedNats, keypair: tuple[Path, Path], token: str, tmp_path: Path
) -> None:
    """Messages queued for a pattern (the outbox coalesces writes for 50 ms) must not
    follow that pattern's ``unsub`` ack: the ack waits for what is queued before it."""
    gateway = launch_gateway(
        tmp_path,
        "--workers",
        "1",
        NATS_URLS=nats_mon.url,
        JWT_PUBLIC_KEY=str(keypair[1]),
        FANOUT_OUTBOX_WRITE_DELAY_MS="50",
    )
    nc = await nats.connect(nats_mon.url)
    client = await WsClient.connect(gateway.ws, token)
    stop = asyncio.Event()

    async def publish() -> None:
        for n in range(5000):  # bounded; stopped once the unsub is acked
            if stop.is_set():
                return
            await nc.publish("xy.md.unsub.a", b'{"n":%d}' % n)
            if n % 20 == 19:
                await nc.flush()
                await asyncio.sleep(0.002)  # waits on: publisher pacing (at most 5000)

    try:
        for i in range(1, 6):
            assert await op(client, {"op": "sub", "id": 1, "subject": "xy.md.unsub.a"}) == {
                "op": "ack",
                "id": 1,
            }
            stop.clear()
            task = asyncio.create_task(publish())
            await client.expect(lambda f: f.get("subject") == "xy.md.unsub.a", timeout=10)
            ack = await op(client, {"op": "unsub", "id": 100 + i, "subject": "xy.md.unsub.a"})
            acked = client.frames.index(ack) + 1
            stop.set()
            await task
            # a marker on another pattern: everything written before it has arrived
            assert (await op(client, {"op": "sub", "id": 3, "subject": f"xy.md.mark.{i}"}))[
                "op"
            ] == "ack"
            await wait_for_interest(nc, client, f"xy.md.mark.{i}", b'{"mark":1}')
            after = [f for f in client.frames[acked:] if f.get("subject") == "xy.md.unsub.a"]
            assert after == [], f"round {i}: {len(after)} msg(s) after the unsub ack"
    finally:
        stop.set()
        await client.close()
        await nc.close()
        gateway.stop()


async def test_adding_an_overlapping_pattern_loses_and_duplicates_nothing(
    gw: Gateway, token: str, nc: nats.aio.client.Client
) -> None:
    client = await WsClient.connect(gw.ws, token)
    try:
        for i in range(20):
            base = f"xy.md.ov.{i}"
            await op(client, {"op": "sub", "id": 3 * i + 1, "subject": f"{base}.x"})
            await op(client, {"op": "sub", "id": 3 * i + 2, "subject": f"{base}.*"})
            for n in range(3):
                await nc.publish(f"{base}.x", json.dumps({"n": n}).encode())
            await nc.publish(f"{base}.x", b'{"end":true}')
            assert await messages_until(client, {"end": True}) == [{"n": n} for n in range(3)]
    finally:
        await client.close()


async def test_sub_unsub_churn_in_one_batch_leaves_one_nats_subscription(
    gw: Gateway, nats_mon: EmbeddedNats, token: str, nc: nats.aio.client.Client
) -> None:
    subject = "xy.md.churn.p"
    neighbour = await WsClient.connect(gw.ws, token)
    churner = await WsClient.connect(gw.ws, token)
    try:
        ops: list[Frame] = []
        for k in range(5):
            ops.append({"op": "sub", "id": 2 * k + 1, "subject": subject})
            ops.append({"op": "unsub", "id": 2 * k + 2, "subject": subject})
        ops.append({"op": "sub", "id": 11, "subject": subject})
        await churner.send(ops)
        replies = [await churner.expect(lambda f: "id" in f, timeout=10) for _ in range(11)]
        assert [(r["op"], r["id"]) for r in replies] == [("ack", i) for i in range(1, 12)]
        held = await settled_subscriptions(gw, nats_mon, lambda h: subject in h)
        assert held.count(subject) == 1
        await op(neighbour, {"op": "sub", "id": 1, "subject": subject})
        await churner.close()
        for n in range(5):
            await nc.publish(subject, json.dumps({"n": n}).encode())
        await nc.publish(subject, b'{"end":true}')
        assert await messages_until(neighbour, {"end": True}) == [{"n": n} for n in range(5)]
        assert nats_subscriptions(nats_mon).count(subject) == 1
    finally:
        await churner.close()
        await neighbour.close()
    await settled_subscriptions(gw, nats_mon, lambda h: subject not in h)


@pytest.mark.parametrize("remove", ["older", "younger"])
async def test_removing_an_overlapping_pattern_while_publishing_delivers_every_message_once(
    remove: str, gw: Gateway, token: str, nats_mon: EmbeddedNats
) -> None:
    """The connection keeps one of two overlapping patterns; numbered messages at full
    speed, the other pattern removed midway: each number exactly once."""
    total = 3000
    for rnd in range(3):
        base = f"xy.md.rm.{remove}.{rnd}"
        older, younger = f"{base}.*", f"{base}.x"
        client = await WsClient.connect(gw.ws, token)
        pub = await nats.connect(nats_mon.url, name="test-publisher")
        try:
            await op(client, {"op": "sub", "id": 1, "subject": older})
            await op(client, {"op": "sub", "id": 2, "subject": younger})
            halfway = asyncio.Event()
            publisher = asyncio.create_task(publish_numbered(pub, f"{base}.x", total, halfway))
            await halfway.wait()
            gone = older if remove == "older" else younger
            await client.send({"op": "unsub", "id": 3, "subject": gone})
            seen = await messages_until(client, {"end": True}, timeout=30)
            await publisher
            numbers = [d["n"] for d in seen if isinstance(d, dict)]
            assert len(numbers) == total, (len(numbers), len(set(numbers)))
            assert sorted(numbers) == list(range(total))
        finally:
            await pub.close()
            await client.close()


async def publish_numbered(
    pub: nats.aio.client.Client, subject: str, total: int, halfway: asyncio.Event
) -> None:
    """``{"n": 0..total-1}`` as fast as the client goes, then ``{"end": true}``."""
    for n in range(total):
        await pub.publish(subject, b'{"n":%d}' % n)
        if n % 100 == 99:
            await pub.flush()
        if n == total // 3:
            halfway.set()
    await pub.publish(subject, b'{"end":true}')
    await pub.flush()


async def test_neighbour_is_served_while_three_clients_churn_1000_subscriptions(
    gw: Gateway, token: str, nats_mon: EmbeddedNats
) -> None:
    neighbour = await WsClient.connect(gw.ws, token)
    churners = [await WsClient.connect(gw.ws, token) for _ in range(3)]
    refused: list[int] = []
    shed_before = metric(gw, "fanout_limit_refusals_total", limit="shedding")
    try:

        async def churn(c: int, client: WsClient) -> None:
            next_id = 1
            for _ in range(3):
                pats = [
                    f"xy.md.ch.{c}.{i % 50}.*" if i % 20 == 0 else f"xy.md.ch.{c}.{i % 50}.{i}"
                    for i in range(1000)
                ]
                for kind in ("sub", "unsub"):
                    ops = [
                        {"op": kind, "id": next_id + i, "subject": p} for i, p in enumerate(pats)
                    ]
                    last = next_id + 999
                    next_id += 1000
                    await client.send(ops)
                    await client.expect(lambda f, last=last: f.get("id") == last, timeout=30)

        async def handshakes() -> None:
            for _ in range(10):
                status, _, _ = await asyncio.to_thread(http_get, gw.http + "/readyz")
                if status != 200:
                    refused.append(status)
                try:
                    extra = await WsClient.connect(gw.ws, token)
                except Exception as exc:  # aiohttp raises WSServerHandshakeError on 503
                    refused.append(getattr(exc, "status", -1))
                else:
                    await extra.close()
                await asyncio.sleep(0.05)  # waits on: the pace that spreads them over the churn

        tasks = [asyncio.create_task(churn(c, cl)) for c, cl in enumerate(churners)]
        tasks.append(asyncio.create_task(handshakes()))
        pings = 0
        while not all(t.done() for t in tasks[:3]):
            pings += 1
            assert await neighbour.op({"op": "ping", "id": pings}, timeout=10) == {
                "op": "pong",
                "id": pings,
            }
        await asyncio.gather(*tasks)
        assert pings > 0
    finally:
        for cl in churners:
            await cl.close()
        await neighbour.close()
    assert refused == []
    assert metric(gw, "fanout_limit_refusals_total", limit="shedding") == shed_before
    assert metric(gw, "fanout_load_shedding") == 0
    await settled_subscriptions(
        gw, nats_mon, lambda h: not any(s.startswith("xy.md.ch.") for s in h)
    )


MODEL_PATTERNS = ["xy.md.m.a", "xy.md.m.b", "xy.md.m.*", "xy.md.m.>", "xy.md.m.a.b"]
MODEL_SUBJECTS = ["xy.md.m.a", "xy.md.m.b", "xy.md.m.a.b", "xy.md.m.c"]
BARRIER = "xy.md.bar"


def test_model_sub_unsub_overlap_disconnect_publish(
    gw: Gateway, nats_mon: EmbeddedNats, token: str
) -> None:
    """Random sequences against a reference model: after an ack every matching message
    arrives exactly once, nothing after an unsub ack, no NATS subscription left over.

    Each client also holds BARRIER; a publish is followed by a barrier message, and
    the worker delivers in wire order, so what a client got before the barrier is
    exactly what that publish gave it.
    """
    assert run_model(gw, nats_mon, token, restarts=False, examples=40, steps=30) >= 40


def test_model_with_nats_restarts(gw: Gateway, nats_mon: EmbeddedNats, token: str) -> None:
    """The same model with two more rules: nats-server stops, and starts again on the
    same port. What the model expects meanwhile (docs/protocol.md): every client gets
    ``status`` down; a ``sub`` or ``unsub`` is acked at once; nothing is published.
    After ``status`` up, every message is delivered exactly once to each client whose
    subscriptions match it, those made during the outage included, and nothing for
    those removed during it; at the end nats-server holds no subscription of the model.
    Fewer, shorter runs than above: each restart costs the reconnect."""
    assert run_model(gw, nats_mon, token, restarts=True, examples=30, steps=20) >= 30


def run_model(
    gw: Gateway, nats_mon: EmbeddedNats, token: str, *, restarts: bool, examples: int, steps: int
) -> int:
    """Run the model (with the NATS restart rules when ``restarts``); how many runs ended."""
    loop = asyncio.new_event_loop()
    run = loop.run_until_complete
    pub = run(
        nats.connect(
            nats_mon.url, name="test-publisher", reconnect_time_wait=0.1, max_reconnect_attempts=-1
        )
    )
    runs = 0

    class Model(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.clients: list[WsClient | None] = [None, None, None]
            self.subs: list[set[str]] = [set(), set(), set()]
            self.ids = 0
            self.n = 0
            self.nats_up = True

        def _op(self, slot: int, kind: str, subject: str) -> None:
            client = self.clients[slot]
            assert client is not None
            self.ids += 1
            reply = run(op(client, {"op": kind, "id": self.ids, "subject": subject}))
            assert reply == {"op": "ack", "id": self.ids}

        def _nats(self, up: bool) -> None:
            """Stop or start nats-server; wait until every client has the ``status`` frame.

            A probe client connected before the change sees it too, so the worker is
            known to be down (up) even when no model client is connected."""
            probe = run(WsClient.connect(gw.ws, token))
            try:
                nats_mon.start() if up else nats_mon.stop()
                self.nats_up = up
                want = "up" if up else "down"
                for client in [probe, *self.clients]:
                    if client is not None:
                        run(
                            client.expect(
                                lambda f: f.get("op") == "status" and f["nats"] == want, 15
                            )
                        )
            finally:
                run(probe.close())

        @rule(slot=st.integers(0, 2))
        def connect(self, slot: int) -> None:
            if self.clients[slot] is None:
                self.clients[slot] = run(WsClient.connect(gw.ws, token))
                self.subs[slot] = set()
                self._op(slot, "sub", BARRIER)

        @rule(slot=st.integers(0, 2), pattern=st.sampled_from(MODEL_PATTERNS))
        def sub(self, slot: int, pattern: str) -> None:
            if self.clients[slot] is not None:
                self._op(slot, "sub", pattern)
                self.subs[slot].add(pattern)

        @rule(slot=st.integers(0, 2), pattern=st.sampled_from(MODEL_PATTERNS))
        def unsub(self, slot: int, pattern: str) -> None:
            if self.clients[slot] is not None:
                self._op(slot, "unsub", pattern)
                self.subs[slot].discard(pattern)

        @rule(slot=st.integers(0, 2))
        def disconnect(self, slot: int) -> None:
            client = self.clients[slot]
            if client is not None:
                run(client.close())
                self.clients[slot] = None

        @precondition(lambda self: self.nats_up)
        @rule(subject=st.sampled_from(MODEL_SUBJECTS))
        def publish(self, subject: str) -> None:
            self.n += 1
            n = self.n
            run(pub.publish(subject, b'{"n":%d}' % n))
            run(pub.publish(BARRIER, b'{"bar":%d}' % n))
            run(pub.flush())
            for slot, client in enumerate(self.clients):
                if client is None:
                    continue
                got = run(messages_until(client, {"bar": n}))
                expected = [{"n": n}] if any(matches(p, subject) for p in self.subs[slot]) else []
                assert got == expected, (slot, subject, sorted(self.subs[slot]))

        def nats_starts(self) -> None:
            self._nats(up=True)
            run(async_wait_for(lambda: pub.is_connected, what="the publisher reconnected"))

        def teardown(self) -> None:
            nonlocal runs
            runs += 1
            if not self.nats_up:
                self.nats_starts()
            for slot in range(3):
                self.disconnect(slot)

            def clean() -> bool:
                return not any(
                    s.startswith(("xy.md.m.", BARRIER)) for s in nats_subscriptions(nats_mon)
                )

            run(
                async_wait_for(
                    lambda: asyncio.to_thread(clean), what="no model subscription on nats-server"
                )
            )

    class Restarts(Model):
        @precondition(lambda self: self.nats_up)
        @rule()
        def stop_nats(self) -> None:
            self._nats(up=False)

        @precondition(lambda self: not self.nats_up)
        @rule()
        def start_nats(self) -> None:
            self.nats_starts()

    try:
        run_state_machine_as_test(
            Restarts if restarts else Model,
            settings=settings(
                max_examples=examples,
                stateful_step_count=steps,
                deadline=None,
                suppress_health_check=list(HealthCheck),
            ),
        )
        held = run(settled_subscriptions(gw, nats_mon, lambda h: True))
        assert not any(s.startswith(("xy.md.m.", BARRIER)) for s in held)
    finally:
        run(pub.close())
        loop.close()
    return runs


async def test_nats_down_acks_at_once_and_delivery_resumes_on_reconnect(
    nats_server: EmbeddedNats, make_gateway: Callable[..., Gateway], keypair: tuple[Path, Path]
) -> None:
    """While NATS is down a sub is acked at once (with the status down frame); the
    subscription reaches nats-server on reconnect and delivery resumes."""
    gateway = make_gateway(
        "--workers",
        "1",
        NATS_URLS=nats_server.url,
        JWT_PUBLIC_KEY=str(keypair[1]),
        FANOUT_NATS_RECONNECT_WAIT_S="0.2",
    )
    tok = make_token(
        private_key_pem=keypair[0].read_bytes(), sub="down", subjects=["xy.md.>"], ttl_s=600
    )
    client = await WsClient.connect(gateway.ws, tok)
    try:
        await op(client, {"op": "sub", "id": 1, "subject": "xy.md.down.before"})
        nats_server.kill()
        down = await client.expect(lambda f: f.get("op") == "status", timeout=10)
        assert down["nats"] == "down"
        assert await op(client, {"op": "sub", "id": 2, "subject": "xy.md.down.during"}) == {
            "op": "ack",
            "id": 2,
        }
        nats_server.start()  # the same port: the gateway reconnects on its own
        up = await client.expect(lambda f: f.get("op") == "status", timeout=15)
        assert up["nats"] == "up"
        pub = await nats.connect(nats_server.url)
        try:
            for subject in ("xy.md.down.before", "xy.md.down.during"):
                # the resubscription races the publisher's connect: probe until one lands
                probe = json.dumps({"probe": subject}).encode()
                await wait_for_interest(pub, client, subject, probe)
        finally:
            await pub.close()
    finally:
        await client.close()
