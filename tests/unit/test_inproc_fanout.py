"""Fan-out rules on an in-process worker: outbox policies, batch sharing, drop notices,
the write-stall cut, pings, idle and closing deadlines (scripted clock, no processes).

The hub's message entry point is fed directly: what is tested is what the hub does
with a message, not how NATS delivers it (tests/unit/test_inproc_nats.py does that).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from prometheus_client import REGISTRY

from fanout.core.wsconnection import CLOSE_TIMEOUT_S
from fanout.errors import Close
from tests.inproc import Client, InProc, make_settings
from tests.security.hostile import client_frame

SUBJECT = "xy.md.fan.a"


async def worker(**overrides: Any) -> InProc:
    """An anonymous worker whose NATS is up (the hub is fed by hand)."""
    w = InProc(make_settings(**{"ws.auth_required": False, **overrides}))
    w.hub.nats_up = True
    return w


async def subscribed(w: InProc, subject: str = SUBJECT) -> Client:
    client = await w.connect()
    client.send({"op": "sub", "id": 1, "subject": subject})
    frames = client.received()
    assert frames[0]["op"] == "welcome"
    assert frames[1:] == [{"op": "ack", "id": 1}]
    return client


def body(n: int) -> bytes:
    return b'{"n":%d}' % n


def numbers(frames: list[dict[str, Any]]) -> list[int]:
    return [f["data"]["n"] for f in frames if f.get("op") == "msg"]


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def cut_reasons(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        getattr(r, "reason", "")
        for r in caplog.records
        if r.name == "fanout.hub" and r.getMessage() == "slow consumer disconnected"
    ]


async def test_idle_clients_share_one_write_per_flush() -> None:
    w = await worker()
    clients = [await subscribed(w) for _ in range(3)]
    before = [c.transport.writes for c in clients]
    for n in range(1, 4):
        w.publish(SUBJECT, SUBJECT, body(n))
    assert [c.transport.writes for c in clients] == before, "written once per loop turn"
    await w.turn()
    for c, writes in zip(clients, before, strict=True):
        assert c.transport.writes == writes + 1
        assert numbers(c.received()) == [1, 2, 3]
    first = clients[0].transport.chunks[-1]
    assert all(c.transport.chunks[-1] is first for c in clients), "one joined bytes object"
    assert w.hub.forwarded == 9


async def test_a_client_that_subscribes_mid_batch_gets_only_what_follows() -> None:
    w = await worker()
    early = await subscribed(w)
    w.publish(SUBJECT, SUBJECT, body(1))
    late = await subscribed(w)
    w.publish(SUBJECT, SUBJECT, body(2))
    await w.turn()
    assert numbers(early.received()) == [1, 2]
    assert numbers(late.received()) == [2]


async def test_a_full_batch_is_written_without_waiting_for_the_turn() -> None:
    w = await worker(**{"outbox.max_batch": 4})
    client = await subscribed(w)
    for n in range(1, 5):
        w.publish(SUBJECT, SUBJECT, body(n))
    assert numbers(client.received()) == [1, 2, 3, 4]


async def test_unsub_stops_delivery_after_its_ack() -> None:
    w = await worker()
    client = await subscribed(w)
    client.send({"op": "unsub", "id": 2, "subject": SUBJECT})
    assert client.received() == [{"op": "ack", "id": 2}]
    w.publish(SUBJECT, SUBJECT, body(1))
    await w.turn()
    assert client.received() == []
    assert w.hub.book.subscription_count == 0 and SUBJECT not in w.hub.batches


async def test_sub_outside_the_acl_and_past_max_subs_are_refused() -> None:
    w = await worker(**{"ws.max_subs": 2})
    client = await w.connect()
    client.received()
    client.send(
        {"op": "sub", "id": 1, "subject": "other.x"},
        {"op": "sub", "id": 2, "subject": "xy.md.a"},
        {"op": "sub", "id": 3, "subject": "xy.md.b"},
        {"op": "sub", "id": 4, "subject": "xy.md.c"},
    )
    replies = client.received()
    assert [(r["op"], r["id"], r.get("code")) for r in replies] == [
        ("error", 1, "XYW002"),
        ("ack", 2, None),
        ("ack", 3, None),
        ("error", 4, "XYW007"),
    ]


async def test_paused_client_gets_its_backlog_when_the_transport_drains() -> None:
    w = await worker()
    client = await subscribed(w)
    client.conn.pause_writing()
    for n in range(1, 4):
        w.publish(SUBJECT, SUBJECT, body(n))
    await w.turn()
    assert client.received() == []
    client.conn.resume_writing()
    await w.turn()
    assert numbers(client.received()) == [1, 2, 3]


async def test_drop_oldest_announces_the_gap_before_the_newest_messages() -> None:
    w = await worker(**{"outbox.max_messages": 3})
    reader, slow = await subscribed(w), await subscribed(w)
    slow.conn.pause_writing()
    dropped = sample("xy_ws_messages_dropped_total", reason="drop_oldest")
    for n in range(1, 6):
        w.publish(SUBJECT, SUBJECT, body(n))
    await w.turn()
    assert numbers(reader.received()) == [1, 2, 3, 4, 5]
    slow.conn.resume_writing()
    await w.turn()
    frames = slow.received()
    assert frames[0] == {"op": "dropped", "subject": SUBJECT, "count": 2, "code": "XYW003"}
    assert numbers(frames[1:]) == [3, 4, 5]
    w.sweep()
    assert sample("xy_ws_messages_dropped_total", reason="drop_oldest") == dropped + 2


async def test_latest_policy_keeps_only_the_newest_value_per_subject() -> None:
    w = await worker(**{"outbox.policies": {"xy.md.tick.>": "latest"}})
    subject = "xy.md.tick.btc"
    reader, slow = await subscribed(w, subject), await subscribed(w, subject)
    slow.conn.pause_writing()
    for n in range(1, 31):
        w.publish(subject, subject, body(n))
    await w.turn()
    assert numbers(reader.received()) == list(range(1, 31))
    slow.conn.resume_writing()
    await w.turn()
    assert slow.received() == [
        {"op": "dropped", "subject": subject, "count": 29, "code": "XYW003"},
        {"op": "msg", "subject": subject, "data": {"n": 30}},
    ]
    assert w.hub.dropped == [0, 29, 0]
    assert slow.close_code is None


async def test_disconnect_policy_cuts_on_a_full_outbox_before_the_stall_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    w = await worker(
        **{"outbox.policies": {"xy.md.strict.>": "disconnect"}, "outbox.max_messages": 3}
    )
    subject = "xy.md.strict.orders"
    reader, slow = await subscribed(w, subject), await subscribed(w, subject)
    slow.conn.pause_writing()
    with caplog.at_level(logging.WARNING, "fanout.hub"):
        for n in range(1, 5):
            w.publish(subject, subject, body(n))
        await w.turn()
    frames = slow.received()
    assert slow.close_code == Close.SLOW_CONSUMER
    assert not [f for f in frames if f.get("op") == "dropped"]
    assert cut_reasons(caplog) == ["outbox full"]
    assert numbers(reader.received()) == [1, 2, 3, 4]
    assert w.hub.dropped == [0, 0, 0]


async def test_stalled_client_is_cut_at_the_write_stall_deadline_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    w = await worker(**{"outbox.write_timeout_s": 10})
    good = [await subscribed(w) for _ in range(5)]
    slow = await subscribed(w)
    slow.conn.pause_writing()
    cuts = sample("xy_ws_slow_consumers_total")
    for n in range(1, 21):
        w.publish(SUBJECT, SUBJECT, body(n))
    await w.turn()
    w.clock.advance(9.5)
    w.sweep()
    assert slow.close_code is None and not slow.transport.is_closing()
    with caplog.at_level(logging.WARNING, "fanout.hub"):
        w.clock.advance(1.0)
        w.sweep()
    slow.frames()
    assert slow.close_code == Close.SLOW_CONSUMER
    assert cut_reasons(caplog) == ["write stalled"]
    assert sample("xy_ws_slow_consumers_total") == cuts + 1
    for client in good:
        assert numbers(client.received()) == list(range(1, 21))
        assert client.close_code is None


async def test_ping_sweep_pings_the_quiet_then_closes_the_idle() -> None:
    w = await worker(**{"ws.ping_interval_s": 20, "ws.idle_timeout_s": 60})
    client = await w.connect()
    client.frames()
    w.clock.advance(19)
    w.ping_idle()
    client.frames()
    assert client.pings == 0
    w.clock.advance(2)
    w.ping_idle()
    client.frames()
    assert client.pings == 1
    w.clock.advance(40)
    w.ping_idle()
    client.frames()
    assert client.close_code == Close.GOING_AWAY


async def test_the_client_close_is_echoed_and_the_socket_closed() -> None:
    w = await worker()
    client = await subscribed(w)
    client.send_raw(client_frame(0x8, (1000).to_bytes(2, "big")))
    assert client.frames() == [(0x8, (1000).to_bytes(2, "big"))]
    assert client.transport.closed
    await w.turn()
    assert w.hub.connections == set() and w.hub.book.subscription_count == 0


async def test_a_client_that_never_answers_our_close_is_aborted_by_the_sweep() -> None:
    w = await worker()
    client = await subscribed(w)
    client.conn.close(Close.GOING_AWAY, "bye")
    client.frames()
    assert client.close_code == Close.GOING_AWAY
    assert not client.transport.is_closing() and w.gateway.closing
    w.clock.advance(CLOSE_TIMEOUT_S - 0.5)
    w.sweep()
    assert not client.transport.aborted
    w.clock.advance(1)
    w.sweep()
    assert client.transport.aborted
    await w.turn()
    assert not w.gateway.closing


async def test_nats_status_frames_follow_the_link() -> None:
    w = await worker()
    client = await w.connect()
    client.received()
    w.hub.on_nats_status(False)
    assert client.received() == [{"op": "status", "nats": "down", "code": "XYW004"}]
    w.hub.on_nats_status(True)
    assert client.received() == [{"op": "status", "nats": "up"}]


async def test_nats_down_closes_clients_when_configured() -> None:
    w = await worker(**{"nats.disconnect_clients_when_down": True})
    client = await w.connect()
    w.hub.on_nats_status(False)
    client.frames()
    assert client.close_code == Close.NATS_UNAVAILABLE


async def test_a_client_admitted_while_nats_is_down_is_told_so() -> None:
    w = await worker()
    w.hub.nats_up = False
    client = await w.connect()
    assert [f["op"] for f in client.received()] == ["welcome", "status"]
