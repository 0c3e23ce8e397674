"""Hub + real NatsLink + real nats-server, clients on fake transports: the sub ack means
nats-server has the subscription, overlapping patterns deliver once, unsub stops, and
the link going down reaches every client as a ``status`` frame."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient

from fanout.core.subscriptions import PENDING
from fanout.embedded_nats import EmbeddedNats
from fanout.worker.nats_link import COMMANDS_PER_TURN
from tests.conftest import http_get
from tests.helpers import async_wait_for
from tests.inproc import Client, InProc, make_settings


async def started(url: str) -> InProc:
    w = InProc(
        make_settings(
            **{"ws.auth_required": False, "nats.urls": [url], "nats.reconnect_wait_s": 0.1}
        )
    )
    await w.start_nats()
    assert w.hub.nats_up
    return w


@pytest_asyncio.fixture
async def publisher(nats_module: EmbeddedNats) -> AsyncIterator[NatsClient]:
    nc = await nats.connect(nats_module.url)
    yield nc
    await nc.close()


async def until_frames(client: Client, n: int, w: InProc) -> list[dict[str, Any]]:
    """The next ``n`` JSON frames, waited for (NATS delivers on its own schedule)."""
    got: list[dict[str, Any]] = []

    def enough() -> bool:
        got.extend(client.received())
        return len(got) >= n

    await async_wait_for(enough, what=f"{n} frames")
    await w.turn()
    got.extend(client.received())
    return got


async def test_the_ack_means_nats_server_has_the_subscription(
    nats_module: EmbeddedNats, publisher: NatsClient
) -> None:
    w = await started(nats_module.url)
    try:
        client = await w.connect()
        client.received()
        client.send({"op": "sub", "id": 1, "subject": "xy.md.live.*"})
        assert await until_frames(client, 1, w) == [{"op": "ack", "id": 1}]
        await publisher.publish("xy.md.live.a", b'{"n":1}', headers={"k": "v"})
        await publisher.flush()
        [msg] = await until_frames(client, 1, w)
        assert msg == {"op": "msg", "subject": "xy.md.live.a", "data": {"n": 1}, "hdr": {"k": "v"}}
    finally:
        await w.stop()


async def test_overlapping_subscriptions_deliver_each_message_once(
    nats_module: EmbeddedNats, publisher: NatsClient
) -> None:
    w = await started(nats_module.url)
    try:
        client = await w.connect()
        client.received()
        client.send(
            {"op": "sub", "id": 1, "subject": "xy.md.ov.*"},
            {"op": "sub", "id": 2, "subject": "xy.md.ov.a"},
        )
        acks = await until_frames(client, 2, w)
        assert acks == [{"op": "ack", "id": 1}, {"op": "ack", "id": 2}]
        for n in range(1, 6):
            await publisher.publish("xy.md.ov.a", b'{"n":%d}' % n)
        await publisher.publish("xy.md.ov.end", b'{"n":0}')
        await publisher.flush()
        frames = await until_frames(client, 6, w)
        assert [(f["subject"], f["data"]["n"]) for f in frames] == [
            *(("xy.md.ov.a", n) for n in range(1, 6)),
            ("xy.md.ov.end", 0),
        ]
    finally:
        await w.stop()


async def test_unsub_stops_delivery(nats_module: EmbeddedNats, publisher: NatsClient) -> None:
    w = await started(nats_module.url)
    try:
        client = await w.connect()
        other = await w.connect()
        client.received()
        other.received()
        client.send({"op": "sub", "id": 1, "subject": "xy.md.un.a"})
        other.send({"op": "sub", "id": 1, "subject": "xy.md.un.b"})
        await until_frames(client, 1, w)
        await until_frames(other, 1, w)
        client.send({"op": "unsub", "id": 2, "subject": "xy.md.un.a"})
        assert client.received() == [{"op": "ack", "id": 2}]
        await publisher.publish("xy.md.un.a", b"1")
        await publisher.publish("xy.md.un.b", b"2")  # delivered after a: the marker
        await publisher.flush()
        assert [f["data"] for f in await until_frames(other, 1, w)] == [2]
        assert client.received() == []
    finally:
        await w.stop()


async def test_nats_going_down_reaches_every_client(nats_server: EmbeddedNats) -> None:
    w = await started(nats_server.url)
    try:
        clients = [await w.connect() for _ in range(3)]
        for client in clients:
            client.received()
        nats_server.stop()
        for client in clients:
            assert await until_frames(client, 1, w) == [
                {"op": "status", "nats": "down", "code": "XYW004"}
            ]
        assert not w.hub.nats_up
    finally:
        await w.stop()


def held_subscriptions(server: EmbeddedNats) -> list[list[str]]:
    """Per connection named like the worker's (``nats.name``): the subjects nats-server holds."""
    status, body, _ = http_get(server.monitor_url + "/connz?subs=1")
    assert status == 200
    return [
        sorted(c.get("subscriptions_list") or [])
        for c in json.loads(body)["connections"] or []
        if c.get("name") == "fanout"
    ]


@pytest.fixture
def monitored() -> Iterator[EmbeddedNats]:
    with EmbeddedNats(monitor=True) as server:
        yield server


async def test_a_client_gone_before_its_sub_is_live_gets_nothing_and_leaks_nothing(
    monitored: EmbeddedNats,
) -> None:
    """The SUB is on the wire, its PONG held back (nats-server stopped with SIGSTOP), when
    the client goes: no frame is written to it afterwards, the deferred ack is dropped,
    and the NATS subscription goes too once nats-server answers."""
    w = await started(monitored.url)
    assert monitored.proc is not None
    try:
        client, other = await w.connect(), await w.connect()
        client.received()
        other.received()
        other.send({"op": "sub", "id": 1, "subject": "xy.md.keep"})
        assert await until_frames(other, 1, w) == [{"op": "ack", "id": 1}]
        assert w.link is not None
        table = w.link.table
        os.kill(monitored.proc.pid, signal.SIGSTOP)
        try:
            client.send({"op": "sub", "id": 1, "subject": "xy.md.gone"})
            await async_wait_for(lambda: table.state("xy.md.gone") == PENDING, what="the SUB sent")
            assert "xy.md.gone" in w.hub.waiting.by_key  # the ack waits for nats-server
            written = len(client.transport.data)
            client.conn.connection_lost(None)  # the peer went away
            await w.turn()
            assert w.hub.waiting.by_key == {}  # its deferred ack is dropped, nothing to fill later
        finally:
            os.kill(monitored.proc.pid, signal.SIGCONT)
        await async_wait_for(
            lambda: (
                table.state("xy.md.gone") is None
                and w.link is not None
                and not w.link.table.has_work
            ),
            what="the UNSUB confirmed",
        )
        assert len(client.transport.data) == written
        assert w.hub.waiting.by_key == {}
        assert held_subscriptions(monitored) == [["xy.md.keep"]]
        assert w.link.subscriptions == 1
    finally:
        await w.stop()


async def test_the_link_rebuilds_after_its_client_is_closed_for_good(
    monitored: EmbeddedNats,
) -> None:
    """nats-py closes a client for good on most -ERRs (closed_cb): the link builds a new
    one that holds every wanted pattern exactly once, and messages flow again."""
    w = await started(monitored.url)
    try:
        client = await w.connect()
        client.received()
        patterns = ["xy.md.rb.a", "xy.md.rb.*", "xy.md.rb.b.c"]
        client.send(*({"op": "sub", "id": i, "subject": p} for i, p in enumerate(patterns, 1)))
        assert len(await until_frames(client, 3, w)) == 3
        assert held_subscriptions(monitored) == [sorted(patterns)]
        assert w.link is not None and w.link.nc is not None
        old = w.link.nc
        await old.close()  # what nats-py does itself after a fatal -ERR from the server
        down = await until_frames(client, 1, w)
        assert down == [{"op": "status", "nats": "down", "code": "XYW004"}]
        await async_wait_for(
            lambda: w.link is not None and w.link.nc not in (None, old), what="a new client"
        )
        up = await until_frames(client, 1, w)
        assert up == [{"op": "status", "nats": "up"}]
        await async_wait_for(
            lambda: all(w.link is not None and w.link.is_live(p) for p in patterns),
            what="every pattern live again",
        )
        assert held_subscriptions(monitored) == [sorted(patterns)]
        assert w.link.subscriptions == 3
        publisher = await nats.connect(monitored.url)
        try:
            await publisher.publish("xy.md.rb.a", b'{"n":1}')
            await publisher.publish("xy.md.rb.b.c", b'{"n":2}')
            await publisher.flush()
        finally:
            await publisher.close()
        frames = await until_frames(client, 2, w)
        assert [(f["subject"], f["data"]) for f in frames] == [
            ("xy.md.rb.a", {"n": 1}),
            ("xy.md.rb.b.c", {"n": 2}),
        ]
    finally:
        await w.stop()


class LoopTurns:
    """Counts the event loop's iterations: it re-schedules itself with ``call_soon``, so it
    runs once per iteration, and what runs between two of its runs shares one number."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.n = 0
        self._handle = self.loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.n += 1
        self._handle = self.loop.call_soon(self._tick)

    def stop(self) -> None:
        self._handle.cancel()


async def test_a_3000_pattern_turn_is_worked_a_slice_per_loop_turn(
    nats_server: EmbeddedNats,
) -> None:
    """3 clients each sub (then unsub) 1000 patterns in one frame while nats-server holds
    back the first PONG: the rest make ONE driver turn (one PING/PONG) of 2000+ patterns,
    and its routes made, its patterns released live (their acks) and its routes dropped
    are at most COMMANDS_PER_TURN per loop iteration (counted, not timed)."""
    assert nats_server.proc is not None
    w = InProc(
        make_settings(
            **{
                "ws.auth_required": False,
                "ws.inbound_rate": 100_000,
                "ws.inbound_burst": 100_000,
                "nats.urls": [nats_server.url],
            }
        )
    )
    await w.start_nats()
    turns = LoopTurns()
    try:
        link, hub = w.link, w.hub
        assert link is not None and link.nc is not None
        work: Counter[tuple[str, int]] = Counter()
        for name, size in (
            ("subscribed", lambda args: 1),
            ("removed", lambda args: 1),
            ("became_live", lambda args: len(args[0])),
        ):
            real = getattr(hub, name)

            def spy(*args: Any, _real: Any = real, _name: str = name, _size: Any = size) -> Any:
                work[_name, turns.n] += _size(args)
                return _real(*args)

            setattr(hub, name, spy)
        pings = 0
        confirm = link.nc.confirm

        async def counted(timeout_s: float) -> None:
            nonlocal pings
            pings += 1
            await confirm(timeout_s)

        link.nc.confirm = counted  # type: ignore[method-assign]
        clients = [await w.connect() for _ in range(3)]
        for client in clients:
            client.received()
        subjects = [[f"xy.md.slice.c{c}.{i}" for i in range(1000)] for c in range(3)]
        for kind, phase in (("sub", 1), ("unsub", 2)):
            os.kill(nats_server.proc.pid, signal.SIGSTOP)
            try:
                for client, mine in zip(clients, subjects, strict=True):
                    client.send(*({"op": kind, "id": i, "subject": s} for i, s in enumerate(mine)))
                await async_wait_for(
                    lambda: all(c.conn.backlog is None for c in clients), what="every op run"
                )
            finally:
                os.kill(nats_server.proc.pid, signal.SIGCONT)
            await async_wait_for(lambda: not link.table.has_work, what="the link idle")
            await async_wait_for(lambda phase=phase: pings == 2 * phase, what="the second PONG")
            for client in clients:
                ids = [f["id"] for f in await until_frames(client, 1000, w)]
                assert sorted(ids) == list(range(1000))
        nc = link.nc
        assert nc is not None
        await async_wait_for(lambda: not nc.routes, what="every route dropped")
        await w.turn()
        assert pings == 4  # the first turn of each phase, then the 2000+ others in one
        for name in ("subscribed", "removed", "became_live"):
            per_turn = [n for (kind, _), n in work.items() if kind == name]
            assert (name, sum(per_turn)) == (name, 3000)
            assert max(per_turn) <= COMMANDS_PER_TURN, name
    finally:
        turns.stop()
        await w.stop()
