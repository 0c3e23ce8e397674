"""The demo page in real headless Chromium against `fanout serve --demo`.

Live ticks, then the page across a kill -9 of its worker and across
a SIGHUP rolling restart: it reconnects, resubscribes and the ticks resume.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.async_api import Page

from tests.conftest import Gateway, launch_gateway, worker_pids
from tests.e2e.helpers import RECORD_EVENTS, demo_view, wait_for_new_worker

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

SYMBOLS = ["btc", "demo", "eth", "sol"]  # the demo publisher's, in the table's order

#: The page is live: every demo symbol has a row with a price, and the client is open.
LIVE = """(n) => {
  const rows = document.querySelectorAll("#ticks tr[data-symbol]");
  return rows.length >= n && document.getElementById("state").dataset.state === "open"
    && [...rows].every((tr) => /[0-9]/.test(tr.querySelector("td.price").textContent));
}"""

#: Ticks flow again: the page's last seq has moved past the given one.
SEQ_PAST = "(seq) => Number(document.getElementById('last-seq').textContent) > seq"


@pytest.fixture(scope="module")
def demo_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = launch_gateway(
        tmp_path_factory.mktemp("demo"), "--demo", "--workers", "1", FANOUT_DEMO_INTERVAL_S="0.1"
    )
    yield gw
    gw.stop()


async def open_live(page: Page, gw: Gateway) -> dict[str, Any]:
    await page.goto(gw.http + "/")
    await page.wait_for_function(LIVE, arg=len(SYMBOLS), timeout=15_000)
    await page.evaluate(RECORD_EVENTS, await page.evaluate_handle("window.fanoutDemo.client"))
    return await demo_view(page)


async def test_demo_page_shows_live_ticks(page: Page, demo_gw: Gateway) -> None:
    view = await open_live(page, demo_gw)
    assert view["symbols"] == SYMBOLS
    assert view["state"] == "open"
    assert view["nats"] == "up"
    assert all(p.replace(",", "").replace(".", "").isdigit() for p in view["prices"])
    assert int(view["lastSeq"]) > 0
    assert int(view["total"]) >= len(SYMBOLS)
    assert view["drops"] == "0" and view["reconnects"] == "0"
    assert view["client"]["state"] == "open" and view["client"]["dropped"] == 0
    # the counters move: two views a second apart differ in messages and seq
    await page.wait_for_function(SEQ_PAST, arg=int(view["lastSeq"]), timeout=20_000)
    await page.wait_for_function(
        "(n) => Number(document.getElementById('total').textContent) > n",
        arg=int(view["total"]),
        timeout=20_000,
    )
    await page.wait_for_function(
        "() => Number(document.getElementById('rate').textContent) > 0", timeout=20_000
    )


async def test_request_box_gets_a_reply_from_the_demo_orders_service(
    page: Page, demo_gw: Gateway
) -> None:
    """`--demo` runs the orders service (fanout.service); the page's request op reaches it."""
    await open_live(page, demo_gw)
    await page.click("#req-send")
    await page.wait_for_function(
        "() => document.getElementById('req-result').dataset.status === 'ok'", timeout=15_000
    )
    text = await page.inner_text("#req-result")
    assert '"item": "tea"' in text and '"qty": 2' in text
    assert "traceparent 00-" in text


async def test_kill_9_worker_page_reconnects_and_resubscribes(page: Page, demo_gw: Gateway) -> None:
    before = await open_live(page, demo_gw)
    old = worker_pids(demo_gw)[1]
    os.kill(old, signal.SIGKILL)
    await page.wait_for_function(
        "() => window.fanoutDemo.client.stats.reconnects === 1"
        " && window.fanoutDemo.client.state === 'open'",
        timeout=15_000,
    )
    assert wait_for_new_worker(demo_gw, old) != old
    reopened = await demo_view(page)
    # ticks after the reconnect: only a resubscribed connection gets them from the new worker
    await page.wait_for_function(SEQ_PAST, arg=int(reopened["lastSeq"]), timeout=20_000)
    await page.wait_for_function(
        "() => document.getElementById('reconnects').textContent === '1'", timeout=20_000
    )
    after = await demo_view(page)
    assert after["state"] == "open" and after["symbols"] == SYMBOLS
    assert after["client"]["conn"] != before["client"]["conn"]
    assert after["client"]["lastCloseCode"] == 1006
    events = await page.evaluate("window.events.map((e) => [e.type, e.detail.code ?? null])")
    assert events[:1] == [["close", 1006]]
    assert ["open", None] in events
    assert not any(t == "authfailed" for t, _ in events)
    assert any("closed 1006" in line for line in after["log"])


@pytest.mark.usefixtures("tcp_migrate_req")
async def test_sighup_rolling_restart_reconnects_at_once(page: Page, demo_gw: Gateway) -> None:
    before = await open_live(page, demo_gw)
    old = worker_pids(demo_gw)[1]
    assert demo_gw.proc is not None
    demo_gw.proc.send_signal(signal.SIGHUP)
    await page.wait_for_function(
        "() => window.fanoutDemo.client.stats.reconnects >= 1"
        " && window.fanoutDemo.client.state === 'open'",
        timeout=15_000,
    )
    closes = await page.evaluate(
        "window.events.filter((e) => e.type === 'close').map((e) => [e.at, e.detail.code,"
        " e.detail.reconnectInMs])"
    )
    opens = await page.evaluate("window.events.filter((e) => e.type === 'open').map((e) => e.at)")
    assert closes, "the page saw no close"
    first_at, code, delay = closes[0]
    assert (code, delay) == (1012, 0)  # worker restarting → reconnect now
    # no refused handshake (1006) and no backoff on the way: only restarts, reconnected at once
    assert all((c, d) == (1012, 0) for _, c, d in closes), closes
    assert opens and opens[-1] > first_at, (closes, opens)
    assert wait_for_new_worker(demo_gw, old) != old
    reopened = await demo_view(page)
    await page.wait_for_function(SEQ_PAST, arg=int(reopened["lastSeq"]), timeout=20_000)
    after = await demo_view(page)
    assert after["state"] == "open" and after["symbols"] == SYMBOLS
    assert after["client"]["conn"] != before["client"]["conn"]
    assert after["client"]["dropped"] == 0
