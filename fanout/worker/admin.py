"""The admin listener's application: /metrics, the detailed /healthz, the live view.

Every worker listens on the admin address too (SO_REUSEPORT, like the public
port), so the supervisor keeps no sockets and any worker answers: whatever it
says about the gateway comes from the shared state directory (every worker's
state file, the supervisor's file, prometheus-client's multiprocess files),
never from its own memory. The admin address is loopback by default; nothing
here is meant for browsers of the public.

``/admin/state.json`` is the live view: one row per worker and the totals.
``fanout top`` prints the same JSON (``--json``) or a table, and ``/admin``
is a static page polling it every second.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from aiohttp import web

from fanout import __version__, metrics, runtime
from fanout.worker.app import StatesFn, gateway_health, readyz_view, static


def worker_row(s: runtime.WorkerState, now: float) -> dict[str, Any]:
    return {
        "pid": s.pid,
        "index": s.index,
        "generation": s.generation,
        "clients": s.clients,
        "subscriptions": s.subscriptions,
        "deliveriesPerSecond": round(s.forwarded_per_s, 1),
        "dropsPerSecond": round(s.dropped_per_s, 1),
        "deliveredTotal": s.forwarded_total,
        "droppedTotal": s.dropped_total,
        "outboxMax": s.outbox_max,
        "loopLagSeconds": round(s.loop_lag_s, 4),
        "rssBytes": s.rss_bytes,
        "openFds": s.open_fds,
        "nats": "connected" if s.nats_connected else "down",
        "natsUrl": s.nats_url,
        "lastErrorCode": s.last_error_code,
        "draining": s.draining,
        "shedding": s.shedding,
        "uptimeSeconds": round(now - s.started_at, 1),
        "heartbeatAgeSeconds": round(now - s.heartbeat_at, 3),
    }


def live_view(
    states: list[runtime.WorkerState],
    supervisor: runtime.SupervisorState | None,
    quorum: float,
    now: float,
) -> dict[str, Any]:
    """What ``fanout top`` and ``/admin`` show: per worker, totals, what the supervisor wants."""
    health = gateway_health(states, quorum)
    rows = [worker_row(s, now) for s in sorted(states, key=lambda s: (s.index, s.started_at))]
    return {
        "at": round(now, 3),
        "version": __version__,
        "status": health["status"],
        "ready": health["ready"],
        "workersWanted": supervisor.workers_wanted if supervisor else None,
        "generation": supervisor.generation if supervisor else None,
        "restarts": {k: v for k, v in sorted(supervisor.restarts.items()) if v}
        if supervisor
        else {},
        "workers": rows,
        "totals": {
            "workers": len(rows),
            "clients": sum(r["clients"] for r in rows),
            "subscriptions": sum(r["subscriptions"] for r in rows),
            "deliveriesPerSecond": round(sum(r["deliveriesPerSecond"] for r in rows), 1),
            "dropsPerSecond": round(sum(r["dropsPerSecond"] for r in rows), 1),
            "outboxMax": max((r["outboxMax"] for r in rows), default=0),
            "loopLagSeconds": max((r["loopLagSeconds"] for r in rows), default=0.0),
            "rssBytes": sum(r["rssBytes"] for r in rows),
            "openFds": sum(r["openFds"] for r in rows),
            "natsConnected": sum(r["nats"] == "connected" for r in rows),
        },
    }


def build_admin_app(states: StatesFn, state_dir: Path, quorum: float) -> web.Application:
    """The admin port's application (plain aiohttp: operators and Prometheus, not the public)."""

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response(gateway_health(states(), quorum))

    async def metrics_view(request: web.Request) -> web.Response:
        body, content_type = metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def state_json(request: web.Request) -> web.Response:
        view = live_view(states(), runtime.read_supervisor_state(state_dir), quorum, time.time())
        return web.json_response(view, headers={"Cache-Control": "no-store"})

    app = web.Application()
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz_view(states, quorum))
    app.router.add_get("/admin", static("admin.html", "text/html"))
    app.router.add_get("/admin/admin.js", static("admin.js", "text/javascript"))
    app.router.add_get("/admin/state.json", state_json)
    return app
