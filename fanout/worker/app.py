"""The aiohttp applications of a worker: the public one and the admin one.

The public port (shared with WebSocket clients) serves ``/readyz``, the public
``/healthz`` fields (README.md, Health), ``/fanout.js`` and, with ``--demo``, the demo page.
Whatever names workers, URLs or patterns (``/metrics``, the detailed
``/healthz``, the live view) is on the admin port only (:mod:`fanout.worker.admin`).

Any worker can answer for the whole gateway: health and readiness read every
live worker's state file in the shared private directory, metrics come from
prometheus-client's multiprocess files. The supervisor is never on this path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from fanout import runtime
from fanout.errors import Code

STATIC = resources.files("fanout") / "static"


#: The public /healthz: the fields README.md lists and nothing else (no pids, URLs or patterns).
PUBLIC_HEALTH_FIELDS = (
    "natsConnected",
    "subscriptions",
    "lastErrorCode",
    "uptimeSeconds",
    "clients",
    "subsPerConn",
)


def gateway_health(states: list[runtime.WorkerState], quorum: float) -> dict[str, Any]:
    """The public /healthz fields, summed over live workers, plus one row per worker."""
    now = time.time()
    clients = sum(s.clients for s in states)
    subs = sum(s.subscriptions for s in states)
    connected = [s for s in states if s.nats_connected]
    errors = [s for s in sorted(states, key=lambda s: s.heartbeat_at) if s.last_error_code]
    # a draining worker is leaving (rolling restart or shutdown): judge the ones that serve
    serving = [s for s in states if not s.draining]
    ready = (
        bool(serving)
        and sum(s.nats_connected for s in serving) >= quorum * len(serving)
        and not any(s.shedding for s in serving)
    )
    return {
        "status": "ok" if ready else "degraded",
        "natsConnected": bool(states) and len(connected) == len(states),
        "subscriptions": subs,
        "lastErrorCode": errors[-1].last_error_code if errors else None,
        "uptimeSeconds": round(now - min((s.started_at for s in states), default=now), 3),
        "clients": clients,
        "subsPerConn": round(subs / clients, 3) if clients else 0.0,
        "ready": ready,
        "workers": [
            {
                "pid": s.pid,
                "index": s.index,
                "clients": s.clients,
                "subscriptions": s.subscriptions,
                "natsConnected": s.nats_connected,
                "natsUrl": s.nats_url,
                "lastErrorCode": s.last_error_code,
                "heartbeatAgeSeconds": round(now - s.heartbeat_at, 3),
                "loopLagSeconds": round(s.loop_lag_s, 4),
                "draining": s.draining,
                "shedding": s.shedding,
            }
            for s in sorted(states, key=lambda s: s.index)
        ],
    }


def static(name: str, content_type: str) -> Callable[[web.Request], Any]:
    """A handler for one file of the package's static directory (404 if not shipped)."""

    async def view(request: web.Request) -> web.Response:
        resource = STATIC / name
        if not resource.is_file():
            raise web.HTTPNotFound()
        return web.Response(
            body=resource.read_bytes(),
            content_type=content_type,
            headers={"Cache-Control": "no-cache"},
        )

    return view


StatesFn = Callable[[], list[runtime.WorkerState]]


def states_reader(state_dir: Path, own_state: Callable[[], runtime.WorkerState]) -> StatesFn:
    """Every live worker's state: this worker's fresh, the others' from their files."""

    def states() -> list[runtime.WorkerState]:
        mine = own_state()
        return [mine, *(s for s in runtime.read_states(state_dir) if s.pid != mine.pid)]

    return states


def readyz_view(states: StatesFn, quorum: float) -> Callable[[web.Request], Any]:
    async def readyz(request: web.Request) -> web.Response:
        health = gateway_health(states(), quorum)
        if health["ready"]:
            return web.json_response({"ready": True, "workers": len(health["workers"])})
        draining = all(w["draining"] for w in health["workers"])
        shedding = any(w["shedding"] for w in health["workers"])
        code = Code.LIMIT_EXCEEDED if draining or shedding else Code.NATS_DOWN
        message = (
            "draining"
            if draining
            else "overloaded: shedding new connections"
            if shedding
            else "NATS link down on some workers"
        )
        return web.json_response({"ready": False, "code": code, "message": message}, status=503)

    return readyz


def build_app(states: StatesFn, quorum: float, ws_path: str, demo: bool) -> web.Application:
    """The public port's HTTP side (behind ``Handshake``: one request per socket)."""

    async def healthz(request: web.Request) -> web.Response:
        health = gateway_health(states(), quorum)
        return web.json_response({key: health[key] for key in PUBLIC_HEALTH_FIELDS})

    app = web.Application()
    app.on_response_prepare.append(_one_request_per_socket)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz_view(states, quorum))
    app.router.add_get("/fanout.js", static("fanout.js", "text/javascript"))
    if demo:
        app.router.add_get("/", static("index.html", "text/html"))
        app.router.add_get("/demo.js", static("demo.js", "text/javascript"))
        app.router.add_get("/demo.css", static("demo.css", "text/css"))
    app.router.add_route("*", ws_path, ws_without_upgrade)
    return app


async def ws_without_upgrade(request: web.Request) -> web.Response:
    """A plain request on the WebSocket path (426 XYW008, per the contract)."""
    return web.json_response(
        {"code": Code.MALFORMED, "message": "this path only accepts WebSocket upgrades"},
        status=426,
        headers={"Upgrade": "websocket", "Sec-WebSocket-Version": "13"},
    )


async def _one_request_per_socket(request: web.Request, response: web.StreamResponse) -> None:
    """``Connection: close`` on every answer: ``Handshake`` hands aiohttp one request per socket.

    aiohttp runs this hook after it wrote its own Connection header, so both
    the header and the handler's keep-alive decision are set here.
    """
    response.force_close()
    response.headers["Connection"] = "close"
