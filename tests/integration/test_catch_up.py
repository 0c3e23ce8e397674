"""Catch-up after the worker's NATS link was down, when the stream answers badly at first.

On a NATS node failover the first catch-up read can come back short (the read
consumer sits on an R3 replica that has not applied the newest messages yet) or
fail (the stream or meta leader is being re-elected: seconds without JetStream).
Live messages keep arriving meanwhile. The worker must read again until what it
delivers has no hole, and say ``dropped`` only when the stream really cannot give it.

Real nats-server with JetStream; the worker in-process (:mod:`tests.inproc`) with the
real NatsLink behind a relay the test cuts (:mod:`tests.relay`); the HistoryReader is
the real one, told to misbehave at its first reads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from prometheus_client import REGISTRY

from fanout.core.history import StreamState
from fanout.demo import create_stream
from fanout.embedded_nats import EmbeddedNats
from fanout.errors import Code
from fanout.worker import catch_up
from fanout.worker.history import HistoryReader, Stored, Unavailable
from fanout.worker.recovery import JS_TIMEOUT_S
from tests.helpers import async_wait_for
from tests.inproc import Client, InProc, make_settings
from tests.relay import Relay

PREFIX = "fanout.live"


class Misbehaving(HistoryReader):
    """The real reader; its first ``fail`` reads raise :class:`Unavailable`, and with
    ``short`` the next one reads for real, waits for ``go`` and returns nothing of it."""

    def __init__(self, w: InProc, *, fail: int = 0, short: bool = False) -> None:
        super().__init__(lambda: None if w.link is None else w.link.nc, JS_TIMEOUT_S)
        self.fail = fail
        self.short = short
        self.reads = 0
        self.withheld: list[Stored] = []
        self.go = asyncio.Event()

    async def read(
        self,
        stream: str,
        pattern: str,
        *,
        after: int | None = None,
        since: float | None = None,
        limit: int,
    ) -> tuple[list[Stored], int]:
        self.reads += 1
        if self.reads <= self.fail:
            raise Unavailable("JetStream leader election (test)")
        got, pending = await super().read(stream, pattern, after=after, since=since, limit=limit)
        if self.short:
            self.short = False
            self.withheld = got
            await self.go.wait()
            return [], 0  # the replica had none of it yet
        return got, pending


@pytest.fixture(scope="module")
def js_nats() -> Iterator[EmbeddedNats]:
    async def stream(url: str) -> None:
        nc = await nats.connect(url)
        await create_stream(nc, "MD", "xy.md.>", PREFIX)
        await nc.close()

    with EmbeddedNats(jetstream=True) as server:
        asyncio.run(stream(server.url))
        yield server


@pytest_asyncio.fixture
async def nc(js_nats: EmbeddedNats) -> AsyncIterator[NatsClient]:
    client = await nats.connect(js_nats.url)
    yield client
    await client.close()


@pytest_asyncio.fixture
async def relay(js_nats: EmbeddedNats) -> AsyncIterator[Relay]:
    r = Relay(js_nats.port)
    await r.start()
    yield r
    await r.cut()


async def worker(relay: Relay, **misbehave: Any) -> tuple[InProc, Misbehaving]:
    w = InProc(
        make_settings(
            **{
                "ws.auth_required": False,
                "nats.urls": [relay.url],
                "nats.reconnect_wait_s": 0.1,
                "history.streams": {"xy.md.>": "MD"},
            }
        )
    )
    reader = Misbehaving(w, **misbehave)
    w.hub.recovery.jetstream.reader = reader
    await w.start_nats()
    return w, reader


async def publish(nc: NatsClient, subject: str, n: int) -> list[int]:
    js = nc.jetstream()
    return [(await js.publish(subject, b'{"n":%d}' % i)).seq for i in range(n)]


class Seen:
    """Everything a client was sent, read as it comes."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.frames: list[dict[str, Any]] = []

    def seqs(self) -> list[int]:
        self.frames.extend(self.client.received())
        return [f["seq"] for f in self.frames if f.get("op") == "msg"]

    async def until(self, seq: int) -> list[int]:
        await async_wait_for(lambda: seq in self.seqs(), what=f"seq {seq}")
        return self.seqs()

    def dropped(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("op") == "dropped"]


def counted(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def subscribed(w: InProc, nc: NatsClient, subject: str) -> tuple[Seen, list[int]]:
    """A client of ``subject`` that has received two live messages."""
    seen = Seen(await w.connect())
    seen.client.send({"op": "sub", "id": 1, "subject": subject})

    def acked() -> bool:
        seen.seqs()
        return any(f.get("id") == 1 for f in seen.frames)

    await async_wait_for(acked, what="the ack")
    live = await publish(nc, subject, 2)
    assert await seen.until(live[-1]) == live
    return seen, live


async def link_down_while(w: InProc, relay: Relay, nc: NatsClient, subject: str) -> list[int]:
    """Cut the worker's link, publish while it is down, give the link back."""
    await relay.cut()
    await async_wait_for(lambda: not w.hub.nats_up, what="the link down")
    during = await publish(nc, subject, 3)
    await relay.start()
    await async_wait_for(lambda: w.hub.nats_up, what="the link up")
    return during


async def test_a_short_catch_up_read_is_read_again_while_live_messages_wait(
    relay: Relay, nc: NatsClient
) -> None:
    """The catch-up read misses what was published during the outage; a live message's
    ``Nats-Last-Sequence`` arriving meanwhile shows the hole: read again, then release."""
    w, reader = await worker(relay, short=True)
    try:
        subject = "xy.md.race.short"
        seen, before = await subscribed(w, nc, subject)
        messages = counted("fanout_recovery_caught_up_messages_total")
        during = await link_down_while(w, relay, nc, subject)
        await async_wait_for(lambda: reader.withheld, what="the catch-up read")
        assert [m.seq for m in reader.withheld] == during
        received = w.hub.nats_messages
        after = await publish(nc, subject, 2)  # live while the catch-up is still out
        await async_wait_for(lambda: w.hub.nats_messages >= received + 2, what="live, held")
        reader.go.set()
        assert await seen.until(after[-1]) == before + during + after
        assert not seen.dropped()
        assert reader.reads == 2
        assert counted("fanout_recovery_caught_up_messages_total") - messages >= len(during)
    finally:
        await w.stop()


async def test_jetstream_unavailable_during_a_catch_up_is_retried(
    relay: Relay, nc: NatsClient
) -> None:
    """JetStream answers nothing for three reads (a leader election): the catch-up retries
    with backoff while holding the clients instead of announcing a loss."""
    w, reader = await worker(relay, fail=3)
    try:
        subject = "xy.md.race.unavailable"
        seen, before = await subscribed(w, nc, subject)
        complete = counted("fanout_recovery_catchups_total", outcome="complete")
        during = await link_down_while(w, relay, nc, subject)
        await async_wait_for(lambda: reader.reads >= 1, what="the first catch-up read")
        after = await publish(nc, subject, 2)
        assert await seen.until(after[-1]) == before + during + after
        assert not seen.dropped()
        assert reader.reads == 4
        assert counted("fanout_recovery_catchups_total", outcome="complete") - complete == 1
    finally:
        await w.stop()


async def test_a_catch_up_that_cannot_read_says_dropped(
    relay: Relay, nc: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JetStream never answers within the catch-up's time: the clients are released with
    a ``dropped`` notice (loss is never silent) and live delivery goes on."""
    monkeypatch.setattr(catch_up, "CATCH_UP_S", 0.5)
    w, reader = await worker(relay, fail=1000)
    try:
        subject = "xy.md.race.failed"
        seen, before = await subscribed(w, nc, subject)
        failed = counted("fanout_recovery_catchups_total", outcome="failed")
        await link_down_while(w, relay, nc, subject)
        await async_wait_for(
            lambda: counted("fanout_recovery_catchups_total", outcome="failed") > failed,
            what="the catch-up to give up",
        )
        after = await publish(nc, subject, 1)
        assert await seen.until(after[-1]) == before + after
        # one notice per catch-up that gave up (the live message showed the hole again)
        assert seen.dropped() and {f["subject"] for f in seen.dropped()} == {subject}
        assert reader.reads >= 2
    finally:
        await w.stop()


class Crashing(HistoryReader):
    """The real reader; once ``armed`` names one of its calls, that call raises a
    RuntimeError (a bug, not :class:`Unavailable`) the first time, then works again."""

    def __init__(self, w: InProc) -> None:
        super().__init__(lambda: None if w.link is None else w.link.nc, JS_TIMEOUT_S)
        self.armed = ""

    def _crash(self, call: str) -> None:
        if self.armed == call:
            self.armed = ""
            raise RuntimeError(f"a bug in {call} (test)")

    async def state(self, stream: str) -> StreamState:
        self._crash("state")
        return await super().state(stream)

    async def read(
        self,
        stream: str,
        pattern: str,
        *,
        after: int | None = None,
        since: float | None = None,
        limit: int,
    ) -> tuple[list[Stored], int]:
        self._crash("read")
        return await super().read(stream, pattern, after=after, since=since, limit=limit)

    async def last(self, stream: str, pattern: str, k: int, state: StreamState) -> list[Stored]:
        self._crash("last")
        return await super().last(stream, pattern, k, state)


async def acked(client: Client, op_id: int) -> dict[str, Any]:
    """The ack of ``op_id``, with every ``msg`` that came before it (``replayed``)."""
    frames: list[dict[str, Any]] = []

    def found() -> dict[str, Any] | None:
        frames.extend(client.received())
        return next((f for f in frames if f.get("id") == op_id), None)

    ack = await async_wait_for(found, what=f"the ack of {op_id}")
    ack["replayed"] = [f["seq"] for f in frames if f.get("op") == "msg"]
    return ack


@pytest.mark.parametrize(
    ("call", "resume", "task"),
    [
        ("state", "since", "serve"),
        ("read", "since", "read"),
        ("last", "last", "rounds"),
        ("read", "time", "rounds"),
    ],
)
async def test_a_recovery_task_that_crashes_still_answers_its_resumes(
    relay: Relay,
    nc: NatsClient,
    caplog: pytest.LogCaptureFixture,
    call: str,
    resume: str,
    task: str,
) -> None:
    """A bug in the work behind a resume (the stream's state, a coalesced read by position,
    a round by count or time) must not leave the client waiting for an ack forever: it gets
    ``recovered:false, reason:"unavailable"``, the crash is logged with XYW009 and counted,
    and the next resume of the subject is served as if nothing happened."""
    w = InProc(
        make_settings(
            **{
                "ws.auth_required": False,
                "nats.urls": [relay.url],
                "history.streams": {"xy.md.>": "MD"},
            }
        )
    )
    reader = Crashing(w)
    w.hub.recovery.jetstream.reader = reader
    await w.start_nats()
    try:
        subject = f"xy.md.crash.{call}.{resume}"
        stored = await publish(nc, subject, 3)
        first = await w.connect()
        first.send({"op": "sub", "id": 1, "subject": subject})
        epoch = (await acked(first, 1))["epoch"]
        since: dict[str, Any] = {
            "since": {"since": {"seq": stored[0] - 1, "epoch": epoch}},
            "last": {"last": 3},
            "time": {"since": {"time": "2000-01-01T00:00:00Z"}},
        }[resume]
        failed = counted("fanout_recovery_task_failures_total", task=task)
        reader.armed = call
        crashed = await w.connect()
        with caplog.at_level(logging.ERROR, logger="fanout.recovery"):
            crashed.send({"op": "sub", "id": 2, "subject": subject, **since})
            ack = await acked(crashed, 2)
        assert (ack["op"], ack.get("recovered"), ack.get("reason")) == (
            "ack",
            False,
            "unavailable",
        ), ack
        assert ack["replayed"] == []
        logged = [r for r in caplog.records if getattr(r, "code", None) == Code.INTERNAL]
        assert len(logged) == 1
        assert logged[0].fields["pattern"] == subject  # type: ignore[attr-defined]
        assert counted("fanout_recovery_task_failures_total", task=task) - failed == 1
        again = await w.connect()
        again.send({"op": "sub", "id": 3, "subject": subject, **since})
        ack = await acked(again, 3)
        assert (ack["recovered"], ack["replayed"]) == (True, stored)
    finally:
        await w.stop()


async def test_a_catch_up_that_crashes_releases_its_clients_with_a_dropped_notice(
    relay: Relay, nc: NatsClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in a catch-up's read must not hold its clients' live messages forever: they
    get a ``dropped`` notice (loss is never silent), then live delivery goes on, and the
    next live message's ``Nats-Last-Sequence`` starts a catch-up that reads the hole."""
    w = InProc(
        make_settings(
            **{
                "ws.auth_required": False,
                "nats.urls": [relay.url],
                "nats.reconnect_wait_s": 0.1,
                "history.streams": {"xy.md.>": "MD"},
            }
        )
    )
    reader = Crashing(w)
    w.hub.recovery.jetstream.reader = reader
    await w.start_nats()
    try:
        subject = "xy.md.crash.catch_up"
        seen, before = await subscribed(w, nc, subject)
        failed = counted("fanout_recovery_task_failures_total", task="catch_up")
        reader.armed = "read"
        with caplog.at_level(logging.ERROR, logger="fanout.recovery"):
            during = await link_down_while(w, relay, nc, subject)
            after = await publish(nc, subject, 1)
            # the next live message shows the hole again: a new catch-up fills it
            assert await seen.until(after[-1]) == before + during + after
        assert [f["subject"] for f in seen.dropped()] == [subject]
        assert [getattr(r, "code", None) for r in caplog.records] == [Code.INTERNAL]
        assert counted("fanout_recovery_task_failures_total", task="catch_up") - failed == 1
    finally:
        await w.stop()
