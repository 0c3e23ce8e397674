"""A runnable ``fanout.service``: an in-memory order book answering the gateway's requests.

    nats-server -a 127.0.0.1 -p 4222 &
    WS_REQUEST_WHITELIST='svc.orders.>' NATS_URLS=nats://127.0.0.1:4222 \\
        fanout serve --demo --workers 1 --port 8080 &
    python examples/orders_service.py --nats nats://127.0.0.1:4222

then, in the demo page's console (or any ``FanoutClient``)::

    await client.request("svc.orders.get", {id: "o-1"})
    await client.request("svc.orders.create", {item: "tea", qty: 2})

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
import time
from typing import Any

import msgspec
import nats
from nats.aio.client import Client

from fanout.service import JwtAuth, Next, Request, Service, ServiceError

log = logging.getLogger("orders")


class NewOrder(msgspec.Struct, forbid_unknown_fields=True):
    item: str
    qty: int


class Order(msgspec.Struct):
    id: str
    owner: str
    item: str
    qty: int
    created_ms: int


def owner_of(req: Request) -> str:
    """The verified principal when JwtAuth ran, else the gateway's word, else ``anonymous``."""
    if req.context.principal is not None and req.context.principal.sub:
        return req.context.principal.sub
    if req.metadata is not None and req.metadata.principal:
        return req.metadata.principal
    return "anonymous"


async def access_log(req: Request, call_next: Next) -> Any:
    """A custom interceptor: one log line per request with its correlation id and duration."""
    started = time.perf_counter()
    outcome = "error"
    try:
        result = await call_next(req)
        outcome = "ok"
        return result
    except ServiceError as exc:
        outcome = exc.code
        raise
    finally:
        log.info(
            "%s %s corr=%s %.1f ms",
            req.subject,
            outcome,
            req.context.correlation_id,
            (time.perf_counter() - started) * 1000,
        )


def build(nc: Client, args: argparse.Namespace) -> Service:
    orders: dict[str, Order] = {}
    svc = Service(nc, name="orders", version="1.0.0", description="demo order book")
    if args.jwks_url or args.public_key:
        svc.with_auth(JwtAuth(jwks_url=args.jwks_url, public_key=args.public_key))
    svc.with_rate_limit(per="principal", rate=args.rate, burst=args.burst)
    svc.with_circuit_breaker(failures=5, reset_after=10.0, timeout=2.0)
    svc.with_interceptor(access_log)

    @svc.handler("svc.orders.get")
    async def get_order(req: Request) -> Order:
        order_id = req.data.get("id") if isinstance(req.data, dict) else None
        order = orders.get(order_id) if isinstance(order_id, str) else None
        if order is None or order.owner != owner_of(req):
            raise ServiceError("404", f"no order {order_id!r}")
        return order

    @svc.handler("svc.orders.list")
    async def list_orders(req: Request) -> list[Order]:
        owner = owner_of(req)
        return [o for o in orders.values() if o.owner == owner]

    @svc.handler("svc.orders.create")
    async def create_order(req: Request) -> Order:
        new = req.decode(NewOrder)
        if new.qty <= 0:
            raise ServiceError("400", "qty must be positive")
        order = Order(
            f"o-{len(orders) + 1}", owner_of(req), new.item, new.qty, int(time.time() * 1000)
        )
        orders[order.id] = order
        return order

    return svc


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
    svc = build(nc, args)
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
