"""Small helpers shared by the browser tests: gateway introspection and in-page probes."""

from __future__ import annotations

from typing import Any

from playwright.async_api import Page

from tests.conftest import ROOT, Gateway, worker_pids
from tests.helpers import wait_for

#: Records the client's events with their page time: ``window.events`` is a list of
#: ``{type, at, detail}``. The argument is a JS expression for the client.
RECORD_EVENTS = """(client) => {
  window.events = [];
  for (const type of ["open", "close", "welcome", "expiring", "authrenewed", "authfailed",
                      "dropped", "error", "status", "unsubscribed", "recovered"]) {
    const record = (e) => window.events.push({type, at: performance.now(), detail: e.detail});
    client.addEventListener(type, record);
  }
}"""

#: Counts WebSocket constructions in the page (installed before any page script runs).
COUNT_SOCKETS = """(() => {
  const Native = window.WebSocket;
  window.socketsOpened = 0;
  window.WebSocket = class extends Native {
    constructor(...args) { super(...args); window.socketsOpened++; }
  };
})()"""

#: What the demo page shows, read from its stable ids, plus the client's own numbers.
DEMO_VIEW = """() => {
  const text = (id) => document.getElementById(id).textContent;
  const c = window.fanoutDemo.client;
  return {
    state: text("state"), dataState: document.getElementById("state").dataset.state,
    nats: text("nats"), rate: text("rate"), total: text("total"), drops: text("drops"),
    reconnects: text("reconnects"), lastSeq: text("last-seq"),
    symbols: [...document.querySelectorAll("#ticks tr[data-symbol]")].map((r) => r.dataset.symbol),
    prices: [...document.querySelectorAll("#ticks td.price")].map((d) => d.textContent),
    log: [...document.querySelectorAll("#log li")].map((li) => li.textContent),
    client: {state: c.state, ...c.stats, conn: c.welcome && c.welcome.conn, expiresAt: c.expiresAt},
  };
}"""


async def demo_view(page: Page) -> dict[str, Any]:
    view: dict[str, Any] = await page.evaluate(DEMO_VIEW)
    return view


def wait_for_new_worker(gw: Gateway, old_pid: int, timeout_s: float = 20.0) -> int:
    """The pid of worker 1 once it is no longer ``old_pid``."""
    return wait_for(
        lambda: p if (p := worker_pids(gw).get(1)) not in (None, old_pid) else None,
        timeout_s,
        f"worker 1 to replace {old_pid}",
    )


def _inlined_demo_page() -> str:
    static = ROOT / "fanout" / "static"
    html = (static / "index.html").read_text()
    css = (static / "demo.css").read_text()
    script = (static / "demo.js").read_text()
    html = html.replace('<link rel="stylesheet" href="/demo.css">', f"<style>{css}</style>")
    html = html.replace(
        '<script type="module" src="/demo.js"></script>', f'<script type="module">{script}</script>'
    )
    assert "/demo.css" not in html and "/demo.js" not in html
    return html


async def open_demo_page(page: Page, gw: Gateway, query: str = "") -> None:
    """The demo page against a gateway without ``--demo`` (which serves ``/`` only in demo mode).

    A real loopback response of the gateway's origin first (Chromium's local network
    checks then see a loopback page), keeping ``query`` for the page's ``location``; then
    the demo page's HTML with its CSS and script inline (it imports the public /fanout.js).
    """
    await page.goto(f"{gw.http}/readyz{query}")
    await page.set_content(_inlined_demo_page())
