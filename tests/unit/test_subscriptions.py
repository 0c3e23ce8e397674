"""The subscription state machine: commands, liveness, and at most one NATS sub per pattern."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import re

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.protocol.command import sub_cmd, unsub_cmd
from nats.protocol.parser import Parser

from fanout.core.subscriptions import DRAINING, LIVE, PENDING, SUB, UNSUB, Subscriptions, Turn
from fanout.worker.hub import Hub
from fanout.worker.link_client import LinkClient, _RoutedSubscription
from tests.inproc import make_settings


def test_want_take_confirm_makes_live() -> None:
    s = Subscriptions()
    assert s.want("a") is False
    assert s.state("a") is None
    turn = s.take()
    assert turn.commands == [(SUB, "a")]
    assert s.state("a") == PENDING
    assert s.confirmed(turn) == ["a"]
    assert s.state("a") == LIVE
    assert s.want("a") is True  # already live: ack at once
    assert s.take().commands == []


def test_one_flush_confirms_a_whole_batch() -> None:
    s = Subscriptions()
    for i in range(1000):
        s.want(f"p.{i}")
    turn = s.take()
    assert len(turn.commands) == 1000
    assert len(s.confirmed(turn)) == 1000


def test_want_unwant_in_one_turn_sends_nothing() -> None:
    s = Subscriptions()
    for _ in range(5):
        s.want("p")
        s.unwant("p")
    s.want("p")
    turn = s.take()
    assert turn.commands == [(SUB, "p")]


def test_unwant_a_pending_pattern_unsubscribes_it_once() -> None:
    s = Subscriptions()
    s.want("p")
    first = s.take()
    s.unwant("p")
    second = s.take()
    assert second.commands == [(UNSUB, "p")]
    assert s.state("p") == DRAINING
    assert s.confirmed(first) == []  # its SUB was undone meanwhile
    s.confirmed(second)
    assert s.state("p") is None


def test_rewant_a_draining_pattern_sends_unsub_before_sub() -> None:
    s = Subscriptions()
    s.want("p")
    s.confirmed(s.take())
    s.unwant("p")
    s.want("p")
    assert s.take().commands == []  # net effect: nothing, the live sub stays
    s.unwant("p")
    unsub = s.take()
    s.want("p")
    sub = s.take()
    assert unsub.commands == [(UNSUB, "p")] and sub.commands == [(SUB, "p")]
    s.confirmed(unsub)
    assert s.confirmed(sub) == ["p"]


def test_disconnect_makes_everything_pending_until_a_flush_after_reconnect() -> None:
    s = Subscriptions()
    s.want("a")
    s.confirmed(s.take())
    s.disconnected()
    assert s.state("a") == PENDING
    assert s.want("a") is False
    s.reconnected()
    turn = s.take()
    assert turn.commands == [] and turn.confirm == ["a"]
    assert s.confirmed(turn) == ["a"]


def test_lost_flush_is_retried() -> None:
    s = Subscriptions()
    s.want("a")
    turn = s.take()
    s.lost(turn)
    assert s.has_work
    retry = s.take()
    assert retry.commands == [] and retry.confirm == ["a"]
    assert s.confirmed(retry) == ["a"]


def test_reset_resubscribes_everything_wanted_and_ignores_old_turns() -> None:
    s = Subscriptions()
    s.want("a")
    s.want("b")
    old = s.take()
    s.reset()
    assert s.subscribed == 0
    assert s.confirmed(old) == []
    turn = s.take()
    assert sorted(turn.commands) == [(SUB, "a"), (SUB, "b")]


def test_nats_py_private_api_we_rely_on() -> None:
    """LinkClient overrides Client._process_msg and (un)subscribes with its own lean
    Subscription the way nats-py does (Client._sid, _subs, the SUB/UNSUB lines in
    _pending / _pending_data_size, the PING and its waiter in _pongs): a nats-py
    upgrade that changes any of it must fail here, loudly."""
    params = list(inspect.signature(Client._process_msg).parameters)
    assert params == ["self", "sid", "subject", "reply", "data", "headers"]
    assert inspect.iscoroutinefunction(Client._process_msg)
    assert inspect.iscoroutinefunction(Client._process_headers)
    parse = inspect.getsource(Parser.parse)
    assert "_process_msg(sid, subject, reply, payload, hdr)" in parse
    subscribe = inspect.getsource(Client.subscribe)
    for step in ("self._sid += 1", "self._subs[sid] = sub", "await self._send_subscribe(sub)"):
        assert step in subscribe
    send = inspect.getsource(Client._send_subscribe)
    assert "prot_command.sub_cmd(sub._subject, EMPTY, sub._id)" in send
    unsubscribe = inspect.getsource(Subscription.unsubscribe)
    for step in (
        "self._closed = True",
        "self._conn._remove_sub(self._id)",
        "await self._conn._send_unsubscribe(self._id, limit=limit)",
    ):
        assert step in unsubscribe
    assert "prot_command.unsub_cmd(sid, limit)" in inspect.getsource(Client._send_unsubscribe)
    send = inspect.getsource(Client._send_command)
    for step in ("self._pending.append(cmd)", "self._pending_data_size += len(cmd)"):
        assert step in send  # what LinkClient.send does for a slice of lines
    # LinkClient.confirm writes the buffer and its PING as nats-py's flusher and
    # _send_ping do, and nats-py resolves PONG waiters first in, first out
    assert "self._transport.writelines(self._pending[:])" in inspect.getsource(Client._flusher)
    ping = inspect.getsource(Client._send_ping)
    assert "self._pongs.append(future)" in ping and "self._transport.write(PING_PROTO)" in ping
    pong = inspect.getsource(Client._process_pong)
    assert "future = self._pongs.pop(0)" in pong and "future.set_result(True)" in pong
    assert sub_cmd("a.b", "", 7) == b"SUB a.b  7\r\n"
    assert unsub_cmd(7, 0) == b"UNSUB 7 \r\n"

    def attributes(init: object) -> set[str]:
        return set(re.findall(r"self\.(_\w+)\s*(?::[^=]*)?=", inspect.getsource(init)))  # type: ignore[arg-type]

    lean = attributes(_RoutedSubscription.__init__)
    defaults = {n for n in vars(_RoutedSubscription) if n.startswith("_") and n[1] != "_"}
    assert defaults.isdisjoint(lean)
    assert defaults | lean == attributes(Subscription.__init__)


def test_link_client_queues_nats_py_s_own_command_lines() -> None:
    """What LinkClient.route/unroute/send put in nats-py's buffer is what nats-py's
    subscribe/unsubscribe would have sent, and nats-py's close sees a plain Subscription."""
    hub = Hub(make_settings(**{"ws.auth_required": False}), asyncio.new_event_loop())
    nc = LinkClient(hub)
    lines: list[bytes] = []
    sub_a, route_a = nc.route("xy.a", lines)
    sub_b, _ = nc.route("xy.*", lines)
    nc.unroute(sub_a, lines)
    nc.send(lines)
    assert nc._pending == [sub_cmd("xy.a", "", 1) + sub_cmd("xy.*", "", 2) + unsub_cmd(1, 0)]
    assert nc._pending_data_size == len(nc._pending[0])
    assert list(nc._subs.values()) == [sub_b] and sub_a._closed and not sub_b._closed
    assert (route_a.sid, route_a.pattern, route_a.overlap) == (1, "xy.a", 1)
    assert nc.routes.keys() == {1, 2}
    nc.unrouted([route_a])
    assert nc.routes.keys() == {2}
    hub.loop.close()


PATTERNS_ALL = ["a", "b", "c.*", "c.>"]
PATTERNS = st.sampled_from(PATTERNS_ALL)


class SubscriptionModel(RuleBasedStateMachine):
    """The table driven like the worker drives it, against a scripted nats-server."""

    def __init__(self) -> None:
        super().__init__()
        self.table = Subscriptions()
        self.sids = itertools.count(1)
        #: The client's Subscription objects (what nats-py holds): pattern → sid.
        self.client: dict[str, int] = {}
        #: What nats-server holds for this connection: sid → pattern.
        self.server: dict[int, str] = {}
        #: Written, not yet read by the server: ("SUB", sid, p) / ("UNSUB", sid) / ("PING", turn).
        self.wire: list[tuple[object, ...]] = []
        self.inflight: list[object] = []
        self.connected = True
        self.wanted: set[str] = set()
        #: The turn being decided, a slice at a time.
        self.open: Turn | None = None
        #: Turns whose PONG came, their live patterns released a slice at a time.
        self.releasing: list[Turn] = []

    @rule(pattern=PATTERNS)
    def want(self, pattern: str) -> None:
        self.wanted.add(pattern)
        self.table.want(pattern)

    @rule(pattern=PATTERNS)
    def unwant(self, pattern: str) -> None:
        self.wanted.discard(pattern)
        self.table.unwant(pattern)

    @precondition(lambda self: self.open is not None or self.table.has_work)
    @rule(limit=st.integers(1, 3))
    def drive(self, limit: int) -> None:
        """One slice of the driver: a turn begins if none is open, its next ``limit``
        patterns are decided (wants and unwants may come between two slices), and the
        flush goes once all of them are."""
        if self.open is None:
            self.open = self.table.begin()
        turn = self.open
        for op, pattern in self.table.decide(turn, limit):
            if op == SUB:
                assert pattern not in self.client
                sid = next(self.sids)
                self.client[pattern] = sid
                if self.connected:
                    self.wire.append(("SUB", sid, pattern))
            else:
                sid = self.client.pop(pattern)
                if self.connected:
                    self.wire.append(("UNSUB", sid))
        if turn.undecided:
            return
        self.open = None
        if not turn.needs_flush:
            return
        if self.connected:
            self.wire.append(("PING", turn))
            self.inflight.append(turn)
        else:
            self.table.lost(turn)

    @precondition(lambda self: self.wire)
    @rule()
    def server_reads(self) -> None:
        kind, *args = self.wire.pop(0)
        if kind == "SUB":
            sid, pattern = args
            self.server[sid] = pattern  # type: ignore[index]
        elif kind == "UNSUB":
            self.server.pop(args[0], None)  # type: ignore[call-overload]
        else:
            turn = args[0]
            self.inflight.remove(turn)
            self.releasing.append(turn)  # type: ignore[arg-type]

    @precondition(lambda self: self.releasing)
    @rule(limit=st.integers(1, 3))
    def release(self, limit: int) -> None:
        """One slice of a PONG's turn made live; anything may happen between two slices."""
        turn = self.releasing[0]
        for pattern in self.table.confirmed(turn, limit):
            assert pattern in self.server.values()
        if not turn.unreleased or turn.epoch != self.table.epoch:
            self.releasing.pop(0)

    @precondition(lambda self: self.connected)
    @rule()
    def disconnect(self) -> None:
        self.connected = False
        self.server.clear()
        self.wire.clear()
        for turn in self.inflight:
            self.table.lost(turn)  # type: ignore[arg-type]
        self.inflight.clear()
        self.table.disconnected()

    @precondition(lambda self: not self.connected)
    @rule()
    def reconnect(self) -> None:
        """nats-py resends a SUB for each Subscription it holds."""
        self.connected = True
        self.wire.extend(("SUB", sid, pattern) for pattern, sid in self.client.items())
        self.table.reconnected()

    @rule()
    def replace_client(self) -> None:
        """closed_cb: a new client, a new server-side connection."""
        self.client.clear()
        self.server.clear()
        self.wire.clear()
        self.inflight.clear()
        self.open = None  # the driver drops a turn of the old client at its next slice
        self.releasing.clear()
        self.connected = True
        self.table.reset()

    @invariant()
    def at_most_one_nats_subscription_per_pattern(self) -> None:
        held = list(self.server.values())
        assert len(held) == len(set(held))
        assert self.table.subscribed == len(self.client)

    @invariant()
    def live_means_the_server_has_it(self) -> None:
        for pattern in self.client:
            if self.table.is_live(pattern):
                assert pattern in self.server.values()

    def teardown(self) -> None:
        """Let everything settle: every wanted pattern live, nothing else subscribed."""
        if not self.connected:
            self.reconnect()
        for _ in range(50):
            if self.open is not None or self.table.has_work:
                self.drive(len(PATTERNS_ALL))
            elif self.wire:
                self.server_reads()
            elif self.releasing:
                self.release(len(PATTERNS_ALL))
            else:
                break
        assert not self.wire
        assert set(self.server.values()) == self.wanted
        assert set(self.client) == self.wanted
        assert all(self.table.is_live(p) for p in self.wanted)


SubscriptionModel.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None
)
TestSubscriptionModel = SubscriptionModel.TestCase
