"""The admin page (/admin on the admin port) in real headless Chromium.

A two-worker `fanout serve --demo` with the demo page open in a second tab (so
messages flow): the admin page shows both workers and the totals, moves every
second, and across a kill -9 of a worker shows the replacement and the restart.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.async_api import Browser, Page

from tests.conftest import Gateway, http_get, launch_gateway, worker_pids

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

#: What the admin page shows, read from its stable ids.
ADMIN_VIEW = """() => {
  const text = (id) => document.getElementById(id).textContent;
  return {
    status: text("status"), workers: text("workers"), restarts: text("restart-count"),
    restartsLine: text("restarts"), clients: text("t-clients"),
    deliveries: text("t-deliveries"), polls: Number(document.body.dataset.polls || 0),
    pids: [...document.querySelectorAll("#rows tr")].map((tr) => Number(tr.dataset.pid)),
    nats: [...document.querySelectorAll("#rows tr td:last-child b")].map((b) => b.dataset.state),
  };
}"""


@pytest.fixture(scope="module")
def admin_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = launch_gateway(
        tmp_path_factory.mktemp("admin-page"),
        "--demo",
        "--workers",
        "2",
        FANOUT_DEMO_INTERVAL_S="0.1",
    )
    yield gw
    gw.stop()


async def admin_view(page: Page) -> dict[str, Any]:
    view: dict[str, Any] = await page.evaluate(ADMIN_VIEW)
    return view


async def open_with_demo_tab(page: Page, browser: Browser, gw: Gateway) -> Page:
    """The demo page in its own context (its own origin), then the admin page."""
    demo = await (await browser.new_context()).new_page()
    await demo.goto(gw.http + "/")
    await demo.wait_for_function(
        "() => document.getElementById('state').dataset.state === 'open'", timeout=5_000
    )
    await page.goto(gw.admin + "/admin")
    return demo


async def test_admin_page_shows_both_workers_and_moves_every_second(
    page: Page, browser: Browser, admin_gw: Gateway
) -> None:
    demo = await open_with_demo_tab(page, browser, admin_gw)
    try:
        await page.wait_for_function(
            "() => Number(document.getElementById('t-clients').textContent) >= 1"
            " && Number(document.getElementById('t-deliveries').textContent) > 0"
            " && document.getElementById('workers').textContent === '2/2'",
            timeout=15_000,
        )
        view = await admin_view(page)
        assert sorted(view["pids"]) == sorted(worker_pids(admin_gw).values())
        assert view["status"] == "ok"
        assert view["nats"] == ["connected", "connected"]
        # the same restarts as the supervisor counted (the kill -9 test may have run first)
        _, body, _ = http_get(admin_gw.admin + "/admin/state.json")
        restarts = json.loads(body)["restarts"]
        assert view["restarts"] == str(sum(restarts.values()))
        if not restarts:
            assert view["restartsLine"] == "no worker restarts since start"
        await page.wait_for_function(
            "(n) => Number(document.body.dataset.polls) >= n + 2", arg=view["polls"], timeout=5_000
        )
    finally:
        await demo.context.close()


async def test_admin_page_across_a_kill_9_shows_the_replacement_and_the_restart(
    page: Page, admin_gw: Gateway
) -> None:
    await page.goto(admin_gw.admin + "/admin")
    await page.wait_for_function(
        "() => document.querySelectorAll('#rows tr').length === 2", timeout=5_000
    )
    before = worker_pids(admin_gw)
    os.kill(before[1], signal.SIGKILL)
    await page.wait_for_function(
        """(old) => {
          const pids = [...document.querySelectorAll('#rows tr')]
            .map((tr) => Number(tr.dataset.pid));
          return pids.length === 2 && !pids.includes(old)
            && document.getElementById('restart-count').textContent === '1';
        }""",
        arg=before[1],
        timeout=15_000,
    )
    view = await admin_view(page)
    assert before[2] in view["pids"] and view["workers"] == "2/2"
    assert view["restartsLine"] == "worker restarts since start: signal 1"
    after = await asyncio.to_thread(worker_pids, admin_gw)
    assert sorted(view["pids"]) == sorted(after.values())
