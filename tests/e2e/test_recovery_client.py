"""fanout.js recovery (v1.2) in real headless Chromium: the worker is killed while a
publisher keeps going; the page reconnects, resumes, reports ``recovered`` and has every
message exactly once, in order."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from playwright.async_api import Page

from fanout.embedded_nats import EmbeddedNats
from tests.conftest import Gateway, jetstream_nats, launch_gateway, recovery_gateway, worker_pids

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

SUBJECT = "xy.md.e2e.recover"

TEST_HTML = """<!doctype html><meta charset="utf-8"><title>fanout.js recovery</title>
<script type="module">
import * as fanout from "/fanout.js";
window.fanout = fanout;
</script>"""

#: The page's client: every seq it got on SUBJECT, and every ``recovered`` event.
CLIENT = """(subject) => {
  const c = new window.fanout.FanoutClient(`ws://${location.host}/ws`,
                                           {backoff: {initialMs: 50, maxMs: 300}});
  window.rec = {seqs: [], recovered: [], closes: []};
  c.addEventListener("recovered", (e) => window.rec.recovered.push(e.detail));
  c.addEventListener("close", (e) => window.rec.closes.push(e.detail.code));
  c.subscribe(subject, (m) => window.rec.seqs.push(m.seq));
  window.client = c;
}"""


@pytest.fixture(scope="module")
def js_nats() -> Iterator[EmbeddedNats]:
    with jetstream_nats({"MD": "xy.md.>"}) as server:
        yield server


@pytest.fixture(scope="module")
def gw(js_nats: EmbeddedNats, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with recovery_gateway(tmp_path_factory.mktemp("recover"), js_nats.url, "xy.md.>=MD") as gateway:
        yield gateway


@pytest_asyncio.fixture(loop_scope="module")
async def nc(js_nats: EmbeddedNats) -> AsyncIterator[NatsClient]:
    client = await nats.connect(js_nats.url)
    yield client
    await client.close()


async def test_page_resumes_after_a_worker_kill_with_no_gap(
    page: Page, gw: Gateway, nc: NatsClient
) -> None:
    await page.goto(gw.http + "/healthz")
    await page.set_content(TEST_HTML)
    await page.wait_for_function("() => window.fanout !== undefined", timeout=5_000)
    await page.evaluate(CLIENT, SUBJECT)
    js = nc.jetstream()
    published: list[int] = []

    async def publish(n: int) -> None:
        for _ in range(n):
            published.append((await js.publish(SUBJECT, b'{"n":%d}' % len(published))).seq)

    deadline = time.monotonic() + 10
    while not await page.evaluate("window.rec.seqs.length"):
        assert time.monotonic() < deadline, "no message reached the page"
        await publish(1)
        await asyncio.sleep(0.1)  # waits on: the page's first message, bounded by the deadline

    stop = asyncio.Event()

    async def keep_publishing() -> None:
        while not stop.is_set() and len(published) < 2000:
            await publish(1)
            await asyncio.sleep(0.01)  # waits on: publisher pacing (at most 2000)

    task = asyncio.create_task(keep_publishing())
    (pid,) = worker_pids(gw).values()
    os.kill(pid, signal.SIGKILL)
    await page.wait_for_function("() => window.rec.recovered.length > 0", timeout=20_000)
    await asyncio.sleep(0.3)  # waits on: live messages after the resume
    stop.set()
    await task
    await page.wait_for_function(
        "(last) => window.rec.seqs.at(-1) === last", arg=published[-1], timeout=10_000
    )
    rec = await page.evaluate("window.rec")
    assert rec["closes"] and rec["recovered"][0]["recovered"] is True
    assert rec["recovered"][0]["subject"] == SUBJECT
    first = rec["seqs"][0]
    assert rec["seqs"] == published[published.index(first) :]  # no gap, no duplicate, in order
    await page.evaluate("window.client.close()")


async def test_demo_page_shows_recovered_after_a_worker_kill(
    page: Page, tmp_path_factory: pytest.TempPathFactory
) -> None:
    demo = launch_gateway(tmp_path_factory.mktemp("demo"), "--demo", "--workers", "1")
    try:
        await page.goto(demo.http + "/")
        await page.wait_for_function(
            "() => Number(document.getElementById('total').textContent) > 0", timeout=15_000
        )
        (pid,) = worker_pids(demo).values()
        os.kill(pid, signal.SIGKILL)
        await page.wait_for_function(
            """() => [...document.querySelectorAll('#log li')]
                   .some((li) => li.textContent.includes('recovered xy.md.tick.*'))""",
            timeout=20_000,
        )
        log = await page.evaluate(
            "() => [...document.querySelectorAll('#log li')].map((li) => li.textContent)"
        )
        assert any("nothing missed" in line for line in log), log
    finally:
        assert demo.stop() == 0
