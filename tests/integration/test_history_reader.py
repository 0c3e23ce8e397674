"""The JetStream reader of recovery (fanout.worker.history) against a real nats-server -js."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import nats
import pytest

from fanout.demo import create_stream
from fanout.embedded_nats import EmbeddedNats
from fanout.worker.history import HistoryReader, Unavailable

PREFIX = "fanout.live"


@pytest.fixture
def js_server() -> Iterator[EmbeddedNats]:
    with EmbeddedNats(jetstream=True) as server:
        yield server


@pytest.fixture
async def nc(js_server: EmbeddedNats) -> AsyncIterator[nats.aio.client.Client]:
    client = await nats.connect(js_server.url)
    await create_stream(client, "MD", "xy.md.>", PREFIX)
    yield client
    await client.close()


async def publish(nc: nats.aio.client.Client, subject: str, n: int, start: int = 0) -> None:
    js = nc.jetstream()
    for i in range(start, start + n):
        await js.publish(subject, b'{"i":%d}' % i)


async def consumers(nc: nats.aio.client.Client) -> int:
    return (await nc.jetstream().stream_info("MD")).state.consumer_count


async def test_state_is_the_epoch_and_the_sequence_range(nc: nats.aio.client.Client) -> None:
    reader = HistoryReader(lambda: nc, 2.0)
    empty = await reader.state("MD")
    assert (empty.first_seq, empty.last_seq, empty.first_time) == (0, 0, 0.0)
    await publish(nc, "xy.md.a", 3)
    state = await reader.state("MD")
    assert state.epoch == empty.epoch and state.epoch.startswith("20")
    assert (state.first_seq, state.last_seq) == (1, 3)
    assert abs(state.first_time - time.time()) < 60
    with pytest.raises(Unavailable):
        await reader.state("NOPE")


async def test_read_after_a_sequence_filters_the_pattern_and_is_bounded(
    nc: nats.aio.client.Client,
) -> None:
    reader = HistoryReader(lambda: nc, 2.0)
    for i in range(10):
        await publish(nc, "xy.md.a", 1, i)
        await publish(nc, "xy.md.b", 1, i)
    got, pending = await reader.read("MD", "xy.md.a", after=4, limit=100)
    assert pending == 8  # a's are 1, 3, ..., 19
    assert [m.seq for m in got] == [5, 7, 9, 11, 13, 15, 17, 19]
    assert got[0].subject == "xy.md.a" and got[0].data == b'{"i":2}'
    got, pending = await reader.read("MD", "xy.md.*", after=15, limit=3)
    assert pending == 5 and [m.seq for m in got] == [16, 17, 18]
    got, pending = await reader.read("MD", "xy.md.a", after=19, limit=100)
    assert (got, pending) == ([], 0)
    assert await consumers(nc) == 0  # every read consumer is deleted


async def test_read_since_a_time(nc: nats.aio.client.Client) -> None:
    reader = HistoryReader(lambda: nc, 2.0)
    await publish(nc, "xy.md.a", 3)
    cut = time.time()
    await publish(nc, "xy.md.a", 2, 3)
    got, _ = await reader.read("MD", "xy.md.a", since=cut, limit=100)
    assert [m.seq for m in got] == [4, 5]


async def test_last_k_of_a_sparse_subject(nc: nats.aio.client.Client) -> None:
    reader = HistoryReader(lambda: nc, 2.0)
    for i in range(50):
        await publish(nc, "xy.md.busy", 9, i * 9)
        await publish(nc, "xy.md.rare", 1, i)
    state = await reader.state("MD")
    got = await reader.last("MD", "xy.md.rare", 4, state)
    assert [m.data for m in got] == [b'{"i":%d}' % i for i in (46, 47, 48, 49)]
    got = await reader.last("MD", "xy.md.rare", 80, state)
    assert len(got) == 50 and got[0].data == b'{"i":0}'
    assert await consumers(nc) == 0


async def test_no_connection_or_no_jetstream_is_unavailable(
    nats_server: EmbeddedNats,
) -> None:
    reader = HistoryReader(lambda: None, 1.0)
    with pytest.raises(Unavailable):
        await reader.state("MD")
    plain = await nats.connect(nats_server.url)
    try:
        reader = HistoryReader(lambda: plain, 1.0)
        with pytest.raises(Unavailable):
            await reader.state("MD")
        with pytest.raises(Unavailable):
            await reader.read("MD", "xy.md.a", after=0, limit=10)
    finally:
        await plain.close()
