"""A runnable ``fanout.service``: an in-memory order book answering the gateway's requests.

    nats-server -a 127.0.0.1 -p 4222 &
    WS_REQUEST_WHITELIST='svc.orders.>' NATS_URLS=nats://127.0.0.1:4222 \\
        fanout serve --demo --workers 1 --port 8080 &
    python examples/orders_service.py --nats nats://127.0.0.1:4222

then, in the demo page's console (or any ``FanoutClient``)::

    await client.request("svc.orders.get", {id: "o-1"})
    await client.request("svc.orders.create", {item: "tea", qty: 2})

The service itself is built in ``fanout/demo_orders.py`` (``build``).
Endpoints: ``svc.orders.get``, ``svc.orders.list``, ``svc.orders.create``. With
``--jwks-url`` or ``--public-key`` every request must carry the browser's JWT
(start the gateway with ``FANOUT_REQUESTS_FORWARD_TOKEN=true``) and orders
belong to the token's ``sub``; without them the gateway's ``Fanout-Principal``
is trusted. ``nats micro list`` / ``nats micro stats orders`` show the service.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

import nats

from fanout.demo_orders import build

log = logging.getLogger("orders")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    parser.add_argument("--jwks-url")
    parser.add_argument("--public-key", help="PEM text or a path")
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--burst", type=float, default=100.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    nc = await nats.connect(args.nats, name="orders-service")
    svc = build(
        nc, jwks_url=args.jwks_url, public_key=args.public_key, rate=args.rate, burst=args.burst
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with svc:
        log.info("orders service %s listening on svc.orders.*", svc.micro.id)
        await stop.wait()
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
