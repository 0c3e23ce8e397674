"""The demo publisher: random-walk ticks on ``xy.md.tick.<symbol>`` for ``fanout serve --demo``.

Runs as a side process of the supervisor (never inside a worker), with its
own NATS connection, so the demo traffic looks exactly like a real publisher's.
:func:`side_processes` is what ``fanout serve --demo`` hands the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import Callable

import msgspec
import nats
import uvloop
from nats.aio.client import Client
from nats.js.api import RePublish, StreamConfig
from setproctitle import setproctitle

from fanout import logs
from fanout.settings import Settings

log = logging.getLogger("fanout.demo")

START_PRICES = {"btc": 64000.0, "eth": 3400.0, "sol": 150.0, "demo": 100.0}


class Tick(msgspec.Struct):
    symbol: str
    price: float
    ts: int
    seq: int


async def publish_ticks(
    url: str, symbols: list[str], interval_s: float, stop: asyncio.Event
) -> None:
    nc = await nats.connect(url, name="fanout-demo", max_reconnect_attempts=-1)
    encoder = msgspec.json.Encoder()
    prices = {s: START_PRICES.get(s, 100.0) for s in symbols}
    seq = 0
    try:
        while not stop.is_set():
            seq += 1
            now_ms = int(time.time() * 1000)
            for symbol in symbols:
                price = prices[symbol] * (1.0 + random.gauss(0.0, 0.002))
                prices[symbol] = price
                tick = Tick(symbol=symbol, price=round(price, 4), ts=now_ms, seq=seq)
                await nc.publish(f"xy.md.tick.{symbol}", encoder.encode(tick))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
    finally:
        await nc.drain()


def run_publisher(settings: Settings) -> int:
    """Side-process entry point: publish until SIGTERM."""
    logs.setup(settings.log.level, fmt=settings.log.format)
    setproctitle("fanout demo-publisher")
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await create_streams(settings)
        await publish_ticks(
            settings.nats.urls[0], settings.demo.symbols, settings.demo.interval_s, stop
        )

    uvloop.run(main())
    return 0


def run_orders_service(settings: Settings) -> int:
    """Side-process entry point: the demo order book on ``svc.orders.*`` until SIGTERM."""
    from fanout.demo_orders import build

    logs.setup(settings.log.level, fmt=settings.log.format)
    setproctitle("fanout demo-orders")
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        nc = await nats.connect(settings.nats.urls[0], name="fanout-demo-orders")
        async with build(nc):
            await stop.wait()
        await nc.drain()

    uvloop.run(main())
    return 0


def side_processes() -> list[tuple[str, Callable[[Settings], int]]]:
    """The demo's processes beside the workers: the tick publisher and the order book."""
    return [("demo-publisher", run_publisher), ("demo-orders", run_orders_service)]


async def create_streams(settings: Settings) -> None:
    """The demo's ``[history]`` streams on the embedded nats-server (JetStream on)."""
    history = settings.history
    if not history.streams:
        return
    nc = await nats.connect(settings.nats.urls[0], name="fanout-demo-streams")
    try:
        for pattern, name in history.streams.items():
            await create_stream(nc, name, pattern, history.republish_prefix)
    except nats.errors.Error as exc:
        log.error("demo streams not created", extra={"reason": repr(exc)})
    finally:
        await nc.close()


async def create_stream(
    nc: Client, name: str, pattern: str, republish_prefix: str, replicas: int = 1
) -> None:
    """The stream recovery reads, republishing to ``<prefix>.<pattern>`` (demo and tests only:
    in production the streams are the operator's). Idempotent."""
    js = nc.jetstream()
    config = StreamConfig(
        name=name,
        subjects=[pattern],
        republish=RePublish(src=pattern, dest=f"{republish_prefix}.{pattern}"),
        max_msgs=100_000,
        max_age=3600.0,
        allow_direct=True,
        num_replicas=replicas,
    )
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError:
        await js.update_stream(config)
