"""The demo order book: a ``fanout.service`` answering ``svc.orders.get|list|create``.

``fanout serve --demo`` runs it as a side process so the demo page's request box
has something to call; ``examples/orders_service.py`` runs it on its own.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec
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


def build(
    nc: Client,
    *,
    jwks_url: str | None = None,
    public_key: str | None = None,
    rate: float = 50.0,
    burst: float = 100.0,
) -> Service:
    """The order book service; with a key or JWKS every request must carry a valid JWT."""
    orders: dict[str, Order] = {}
    svc = Service(nc, name="orders", version="1.0.0", description="demo order book")
    if jwks_url or public_key:
        svc.with_auth(JwtAuth(jwks_url=jwks_url, public_key=public_key))
    svc.with_rate_limit(per="principal", rate=rate, burst=burst)
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
