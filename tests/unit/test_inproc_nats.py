"""Hub + real NatsLink + real nats-server, clients on fake transports: the sub ack means
nats-server has the subscription, overlapping patterns deliver once, unsub stops, and
the link going down reaches every client as a ``status`` frame."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest_asyncio
from nats.aio.client import Client as NatsClient

from fanout.embedded_nats import EmbeddedNats
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
