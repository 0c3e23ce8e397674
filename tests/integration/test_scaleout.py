"""Scale-out, tested: HAProxy (deploy/haproxy/haproxy.cfg, the Debian package's binary) in
front of two gateway instances (own supervisors and ports, 2 workers each) on a 3-node
NATS cluster with an R3 stream. Resuming clients (the browser client's logic) ride
through a gateway SIGTERM, a worker kill -9 and a NATS node kill, and each ends with
the complete sequence: no gap, no duplicate.

The cluster and its stream are formed once per module (most of a test's set-up); each
test gets it whole: the node a test killed restarts on its ports and store afterwards,
and the next test begins once MD has a leader and two current replicas. The gateways
and HAProxy are each test's own (two of the tests stop or kill parts of them).

``FANOUT_SCALEOUT_CLIENTS`` sets the number of clients (default 200 on this shared
2-core machine; the issue's 1000 is ``FANOUT_SCALEOUT_CLIENTS=1000``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import PeerInfo

from fanout.demo import create_stream
from fanout.embedded_nats import EmbeddedNats, free_port, wait_for_port
from tests.conftest import ROOT, Gateway, http_get, launch_gateway, metric, worker_pids
from tests.helpers import async_wait_for

CLIENTS = int(os.environ.get("FANOUT_SCALEOUT_CLIENTS", "200"))
RATE = 100.0  # messages per second on the recoverable subject
SUBJECT = "xy.md.scale.tick"
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"


def haproxy_binary() -> str:
    found = shutil.which("haproxy")
    if found is None:
        why = "haproxy is not installed (Debian package `haproxy`)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide HAProxy: {why}")
        pytest.skip(why)
    return found


@pytest.fixture(scope="module")
def nats_cluster() -> Iterator[list[EmbeddedNats]]:
    """3 nats-servers with JetStream, clustered; stream MD (xy.md.>) with 3 replicas.

    One per module: forming it (routes, meta leader election, the R3 stream) is most of
    a test's set-up; :func:`cluster` hands it to each test whole."""
    route_ports = [free_port() for _ in range(3)]
    nodes = []
    for i, rp in enumerate(route_ports):
        routes = ", ".join(
            f"nats-route://127.0.0.1:{p}" for j, p in enumerate(route_ports) if j != i
        )
        conf = (
            f"server_name: n{i}\n"
            f"cluster {{ name: fanout-scale, listen: 127.0.0.1:{rp}, routes: [{routes}] }}\n"
        )
        nodes.append(EmbeddedNats(config_text=conf, jetstream=True))
    for node in nodes:
        node.start()

    async def stream() -> None:
        nc = await nats.connect([n.url for n in nodes])
        async with asyncio.timeout(30):
            while True:  # the JetStream meta leader is elected after the routes are up
                try:
                    await create_stream(nc, "MD", "xy.md.>", "fanout.live", replicas=3)
                    break
                except nats.errors.Error:
                    await asyncio.sleep(0.5)  # waits on: the meta leader, bounded by the timeout
        await nc.close()

    try:
        asyncio.run(stream())
        asyncio.run(whole(nodes, {}))
        yield nodes
    finally:
        for node in nodes:
            node.cleanup()


async def whole(nodes: list[EmbeddedNats], restarted: dict[str, float]) -> None:
    """MD has a leader and its two other replicas are current (caught up, online), each of
    ``restarted`` (server name -> ``time.monotonic()`` when it restarted) heard from since:
    the leader counts a replica killed a moment ago as current until it misses it. Then
    any one node may hang or die again, and a direct read on any node sees every message."""

    def ready(p: PeerInfo) -> bool:
        at = restarted.get(p.name or "")
        heard = at is None or (p.active is not None and p.active / 1e9 < time.monotonic() - at)
        return bool(p.current) and not p.offline and heard

    nc = await nats.connect([n.url for n in nodes], max_reconnect_attempts=-1)
    js = nc.jetstream(timeout=5)

    async def is_whole() -> bool:
        try:
            info = (await js.stream_info("MD")).cluster
        except (nats.errors.Error, TimeoutError):
            return False  # no leader to answer yet
        replicas = (info.replicas or []) if info else []
        return (
            info is not None
            and info.leader is not None
            and len(replicas) == 2
            and all(ready(p) for p in replicas)
        )

    try:
        await async_wait_for(is_whole, 60, "MD led, its 2 other replicas current", 0.2)
    finally:
        await nc.close()


@pytest.fixture
def cluster(nats_cluster: list[EmbeddedNats]) -> Iterator[list[EmbeddedNats]]:
    """The module's cluster, whole again after the test: a node the test hung is resumed,
    one it killed restarts on its ports, config and JetStream store (a rebooted machine),
    and the next test waits for nothing."""
    yield nats_cluster
    restarted: dict[str, float] = {}
    for i, node in enumerate(nats_cluster):
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGCONT)  # a test that failed while it hung
        else:
            node.stop()  # drops the dead server's config directory
            restarted[f"n{i}"] = time.monotonic()
            node.start()
    asyncio.run(whole(nats_cluster, restarted))


@dataclass
class Balancer:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


@pytest.fixture
def stack(
    cluster: list[EmbeddedNats], tmp_path: Path
) -> Iterator[tuple[list[Gateway], Balancer, list[EmbeddedNats]]]:
    binary = haproxy_binary()
    urls = ",".join(n.url for n in cluster)
    gateways = []
    for i in (1, 2):
        (tmp_path / f"gw{i}").mkdir()
        gateways.append(
            launch_gateway(
                tmp_path / f"gw{i}",
                "--workers",
                "2",
                NATS_URLS=urls,
                FANOUT_WS_AUTH_REQUIRED="false",
                FANOUT_HISTORY_STREAMS="xy.md.>=MD",
                FANOUT_SERVER_GRACEFUL_TIMEOUT_S="2",
            )
        )
    port = free_port()
    env = dict(
        os.environ,
        FANOUT_LB_BIND=f"127.0.0.1:{port}",
        FANOUT_GATEWAY_1=f"127.0.0.1:{gateways[0].port}",
        FANOUT_GATEWAY_2=f"127.0.0.1:{gateways[1].port}",
    )
    log = (tmp_path / "haproxy.log").open("wb")
    proc = subprocess.Popen(
        [binary, "-db", "-f", str(HAPROXY_CFG)], env=env, stdout=log, stderr=log
    )
    try:
        assert wait_for_port("127.0.0.1", port, 10), "haproxy did not listen"
        yield gateways, Balancer(proc, port), cluster
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        for gw in gateways:
            gw.stop()


@dataclass
class Resumer:
    """One client doing what fanout.js does: remember seq/epoch, resume after any close."""

    url: str
    seqs: list[int] = field(default_factory=list)
    epoch: str | None = None
    closes: list[int | None] = field(default_factory=list)
    recovered: list[bool] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    async def run(self, session: aiohttp.ClientSession, done: Callable[[Resumer], bool]) -> None:
        while not done(self):
            try:
                async with session.ws_connect(self.url, max_msg_size=0) as ws:
                    await self._serve(ws, done)
                    self.closes.append(ws.close_code)
                    await ws.close()
            except (aiohttp.ClientError, ConnectionError, TimeoutError):
                self.closes.append(None)
            if not done(self):
                await asyncio.sleep(random.uniform(0.05, 0.3))  # waits on: reconnect jitter

    async def _serve(
        self, ws: aiohttp.ClientWebSocketResponse, done: Callable[[Resumer], bool]
    ) -> None:
        sub: dict[str, object] = {"op": "sub", "id": 1, "subject": SUBJECT}
        if self.seqs and self.epoch is not None:
            sub["since"] = {"seq": self.seqs[-1], "epoch": self.epoch}
        await ws.send_str(json.dumps(sub))
        while not done(self):
            try:
                msg = await ws.receive(timeout=0.5)
            except TimeoutError:
                continue  # the last message may have come before the target was known
            if msg.type != aiohttp.WSMsgType.TEXT:
                return
            data = json.loads(msg.data)
            for frame in data if isinstance(data, list) else [data]:
                if frame.get("op") == "msg":
                    self.seqs.append(frame["seq"])
                elif frame.get("op") == "ack" and frame.get("id") == 1:
                    self.epoch = frame.get("epoch", self.epoch)
                    if "recovered" in frame:
                        self.recovered.append(frame["recovered"])
                        self.reasons.append(frame.get("reason", ""))


class Publisher:
    """JetStream publishes at RATE with a message id each (a retry is deduplicated).

    The ids are this publisher's own: the module's tests share stream MD, which
    deduplicates an id for 2 minutes, and would ack an earlier test's ``scale-0`` with
    that test's seq instead of storing the message."""

    def __init__(self, nc: NatsClient) -> None:
        self.js = nc.jetstream(timeout=2)
        self.ids = f"scale-{secrets.token_hex(4)}"
        self.seqs: list[int] = []
        self.stop = asyncio.Event()

    async def publish_one(self) -> None:
        n = len(self.seqs)
        for _ in range(60):  # a node or leader change: retry the same message id
            try:
                ack = await self.js.publish(
                    SUBJECT, b'{"n":%d}' % n, headers={"Nats-Msg-Id": f"{self.ids}-{n}"}
                )
            except (nats.errors.Error, TimeoutError):
                await asyncio.sleep(0.25)  # waits on: a retry pause, at most 60 tries
                continue
            self.seqs.append(ack.seq)
            return
        raise AssertionError("JetStream did not take a publish for 15 s")

    async def run(self) -> None:
        while not self.stop.is_set():
            await self.publish_one()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 1 / RATE)


@contextlib.asynccontextmanager
async def traffic(
    balancer: Balancer, cluster: list[EmbeddedNats]
) -> AsyncIterator[tuple[list[Resumer], Publisher]]:
    """CLIENTS resuming clients through the balancer and a publisher (connected to the
    nodes in ``cluster``); on exit: one last message, every client reads up to it, each
    has the complete sequence."""
    nc = await nats.connect([n.url for n in cluster], max_reconnect_attempts=-1)
    publisher = Publisher(nc)
    target: list[int] = []

    def done(r: Resumer) -> bool:
        return bool(target) and bool(r.seqs) and r.seqs[-1] >= target[0]

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        clients = [Resumer(balancer.ws) for _ in range(CLIENTS)]
        tasks = [asyncio.create_task(c.run(session, done)) for c in clients]
        pub = asyncio.create_task(publisher.run())
        try:
            async with asyncio.timeout(30):
                while not all(c.seqs for c in clients):
                    await asyncio.sleep(0.1)  # waits on: first messages (timeout)
            yield clients, publisher
            await asyncio.sleep(1.0)  # waits on: traffic flowing meanwhile
            publisher.stop.set()
            await pub
            await publisher.publish_one()
            target.append(publisher.seqs[-1])
            try:
                async with asyncio.timeout(60):
                    await asyncio.gather(*tasks)
            except TimeoutError:
                stuck = [
                    (c.seqs[-1:], c.closes, c.recovered, c.reasons) for c in clients if not done(c)
                ]
                raise AssertionError(
                    f"{len(stuck)} clients short of {target}: {stuck[:5]}"
                ) from None
        finally:
            publisher.stop.set()
            for task in [*tasks, pub]:
                task.cancel()
            await nc.close()
    published = publisher.seqs
    for c in clients:
        first = published.index(c.seqs[0])
        assert c.seqs == published[first:], "a gap or a duplicate"
        assert all(c.recovered), c.reasons


async def test_gateway_sigterm_clients_move_to_the_other_through_haproxy(
    stack: tuple[list[Gateway], Balancer, list[EmbeddedNats]],
) -> None:
    gateways, balancer, cluster = stack
    async with traffic(balancer, cluster) as (clients, _):
        await asyncio.sleep(1.0)  # waits on: traffic flowing meanwhile
        assert await asyncio.to_thread(gateways[0].stop) == 0
    moved = [c for c in clients if 1001 in c.closes or 1012 in c.closes]
    assert moved, "no client was on the stopped gateway"


async def test_worker_kill_9_clients_resume(
    stack: tuple[list[Gateway], Balancer, list[EmbeddedNats]],
) -> None:
    gateways, balancer, cluster = stack
    async with traffic(balancer, cluster) as (clients, _):
        await asyncio.sleep(1.0)  # waits on: traffic flowing meanwhile
        os.kill(next(iter(worker_pids(gateways[1]).values())), signal.SIGKILL)
        await asyncio.sleep(1.0)  # waits on: traffic flowing meanwhile
    assert any(len(c.closes) > 1 for c in clients), "nobody was on the killed worker"


async def not_leading(nc: NatsClient, victim: str) -> None:
    """The stream's leader is not the node ``victim``: publishes go on while it hangs."""
    js = nc.jetstream(timeout=5)
    async with asyncio.timeout(60):
        while True:
            info = await js.stream_info("MD")
            leader = info.cluster.leader if info.cluster else None
            if leader is not None and leader != victim:
                return
            if leader == victim:
                with contextlib.suppress(nats.errors.Error):
                    await nc.request("$JS.API.STREAM.LEADER.STEPDOWN.MD", b"", timeout=5)
            await asyncio.sleep(0.2)  # waits on: the leader change, bounded by the timeout


async def test_nats_node_kill_clients_keep_everything(
    stack: tuple[list[Gateway], Balancer, list[EmbeddedNats]],
) -> None:
    """The node a worker is connected to hangs, then dies: what was published through
    the other nodes meanwhile never reached the worker live; it reconnects to another
    node and catches up from the R3 stream (leader elections on the way); its clients
    stay and miss nothing."""
    gateways, balancer, cluster = stack
    _, body, _ = http_get(gateways[0].admin + "/healthz")
    url = json.loads(body)["workers"][0]["natsUrl"]
    (victim,) = [n for n in cluster if n.url == url]
    others = [n for n in cluster if n is not victim]
    nc = await nats.connect([n.url for n in others])
    try:
        await not_leading(nc, f"n{cluster.index(victim)}")
    finally:
        await nc.close()

    def caught_up() -> tuple[float, float]:
        """(messages caught up, complete catch-ups) of the gateway whose worker moves."""
        gw = gateways[0]
        return (
            metric(gw, "fanout_recovery_caught_up_messages_total"),
            metric(gw, "fanout_recovery_catchups_total", outcome="complete"),
        )

    before = caught_up()
    async with traffic(balancer, others) as (clients, publisher):
        await asyncio.sleep(1.0)  # waits on: traffic flowing meanwhile
        assert victim.proc is not None
        victim.proc.send_signal(signal.SIGSTOP)
        frozen = len(publisher.seqs)
        async with asyncio.timeout(30):
            while len(publisher.seqs) < frozen + 50:
                await asyncio.sleep(0.05)  # waits on: 50 publishes, bounded by the timeout
        missed = len(publisher.seqs) - frozen
        victim.kill()
        await asyncio.sleep(3.0)  # waits on: traffic flowing meanwhile
    assert all(len(c.closes) == 1 for c in clients), "a client was disconnected"
    # the worker on the dead node read what it missed from the stream
    messages, catch_ups = caught_up()
    assert catch_ups - before[1] >= 1
    assert messages - before[0] >= missed - 1  # one may be in flight
