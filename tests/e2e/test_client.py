"""fanout.js in real headless Chromium against real gateways and a real nats-server.

The demo page under a 10 000 msgs/s flood, the client's API used standalone
from a test page, and the token cases: a bad token backs off instead of
hammering, an expired one ends in 4005 + ``authfailed``, and ``expiring`` is
answered with an ``auth`` round trip on the same connection.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import jwt
import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from playwright.async_api import Page
from playwright.async_api import TimeoutError as PageTimeout

from fanout.devtoken import generate_keypair, make_token
from fanout.embedded_nats import EmbeddedNats
from tests.conftest import ROOT, Gateway, launch_gateway, metric
from tests.e2e.helpers import COUNT_SOCKETS, RECORD_EVENTS, demo_view, open_demo_page
from tests.helpers import async_wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

FLOOD_RATE = 10_000  # messages per second
FLOOD_S = 3.0
FLOOD_SYMBOLS = 20
WATCH_S = 4.0  # how long the bad-token test counts handshakes

#: A page of the gateway's origin that only loads the client module as ``window.fanout``.
TEST_HTML = """<!doctype html><meta charset="utf-8"><title>fanout.js e2e</title>
<script type="module">
import * as fanout from "/fanout.js";
window.fanout = fanout;
</script>"""


@pytest.fixture(scope="module")
def anon_gw(
    nats_module: EmbeddedNats, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gw = launch_gateway(
        tmp_path_factory.mktemp("anon"),
        "--workers",
        "1",
        NATS_URLS=nats_module.url,
        FANOUT_WS_AUTH_REQUIRED="false",
    )
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def auth_gw(
    nats_module: EmbeddedNats, keypair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gw = launch_gateway(
        tmp_path_factory.mktemp("auth"),
        "--workers",
        "1",
        NATS_URLS=nats_module.url,
        JWT_PUBLIC_KEY=str(keypair[1]),
        FANOUT_JWT_EXPIRING_LEAD_S="3600",
        FANOUT_JWT_LEEWAY_S="0",
    )
    yield gw
    gw.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def nc(nats_module: EmbeddedNats) -> AsyncIterator[NatsClient]:
    client = await nats.connect(nats_module.url)
    yield client
    await client.close()


def token_for(keypair: tuple[Path, Path], ttl_s: int) -> str:
    return make_token(
        private_key_pem=keypair[0].read_bytes(), sub="e2e", subjects=["xy.md.>"], ttl_s=ttl_s
    )


def exp_of(token: str) -> int:
    exp: int = jwt.decode(token, options={"verify_signature": False})["exp"]
    return exp


async def open_test_page(page: Page, gw: Gateway) -> None:
    """The test page, at the gateway's origin (a real response, so Chromium's local network
    access checks see a loopback page, which an intercepted response would not be)."""
    await page.goto(gw.http + "/healthz")
    await page.set_content(TEST_HTML)
    await page.wait_for_function("() => window.fanout !== undefined", timeout=15_000)


async def until_received(
    nc: NatsClient, page: Page, subject: str, seen: str, timeout_s: float = 20.0
) -> None:
    """Publish probes until the page's ``seen`` expression is true (the gateway's SUB is async)."""

    async def probed() -> bool:
        await nc.publish(subject, b'{"probe":true}')
        await nc.flush()
        try:
            await page.wait_for_function(seen, timeout=200)
        except PageTimeout:
            return False
        return True

    await async_wait_for(probed, timeout_s, f"a probe on {subject} to reach the page")


#: In-page responsiveness probes: the longest gap of a 50 ms timer, and the time from a
#: click on "Send request" to its answer shown in ``#req-result``.
MONITOR = """() => {
  const m = window.monitor = {gaps: [], submitAt: null, answeredMs: null};
  let last = performance.now();
  setInterval(() => { const now = performance.now(); m.gaps.push(now - last); last = now; }, 50);
  const form = document.getElementById("req-form");
  form.addEventListener("submit", () => { m.submitAt = performance.now(); });
  const box = document.getElementById("req-result");
  new MutationObserver(() => {
    const answered = ["ok", "error"].includes(box.dataset.status);
    if (m.submitAt !== null && m.answeredMs === null && answered) {
      m.answeredMs = performance.now() - m.submitAt;
    }
  }).observe(box, {attributes: true});
}"""

#: Forget the request box's last answer, so that the next one can be waited for.
RESET_RESULT = """() => {
  const box = document.getElementById("req-result");
  box.dataset.status = "idle";
  box.dataset.code = "";
}"""

#: The request box shows an answer.
ANSWERED = """() => ["ok", "error"].includes(
  document.getElementById("req-result").dataset.status)"""

#: Every message is either delivered or reported dropped (loss is never silent).
ACCOUNTED = (
    "(n) => { const s = window.fanoutDemo.client.stats; return s.messages + s.dropped >= n; }"
)

#: The page shows the client's numbers.
SHOWN = """() => {
  const s = window.fanoutDemo.client.stats;
  return document.getElementById("drops").textContent === String(s.dropped)
    && document.getElementById("total").textContent === String(s.messages);
}"""


async def start_publisher(
    nats_url: str, prefix: str, rate: int, seconds: float, burst_ms: float, pad: int = 0
) -> asyncio.Task[tuple[bytes, bytes]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.e2e.publisher",
        nats_url,
        prefix,
        str(rate),
        str(seconds),
        str(FLOOD_SYMBOLS),
        str(burst_ms),
        str(pad),
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    return asyncio.create_task(proc.communicate())


async def open_demo(page: Page, gw: Gateway, nc: NatsClient, prefix: str) -> int:
    """The demo page subscribed to ``prefix.*``, live; returns the probe messages it got."""
    await open_demo_page(page, gw, f"?subject={prefix}.*")
    await page.wait_for_function("() => window.fanoutDemo.client.state === 'open'", timeout=15_000)
    await until_received(
        nc, page, f"{prefix}.probe", "() => window.fanoutDemo.client.stats.messages > 0"
    )
    probes: int = await page.evaluate("window.fanoutDemo.client.stats.messages")
    return probes


async def test_page_survives_10k_messages_per_second(
    page: Page, anon_gw: Gateway, nats_module: EmbeddedNats, nc: NatsClient
) -> None:
    probes = await open_demo(page, anon_gw, nc, "xy.md.flood")
    await page.evaluate(MONITOR)
    publisher = await start_publisher(nats_module.url, "xy.md.flood", FLOOD_RATE, FLOOD_S, 10)
    round_trips: list[float] = []
    rates: list[int] = []
    click: asyncio.Task[None] | None = None
    while not publisher.done() and len(round_trips) < 200:
        t0 = time.monotonic()
        rates.append(await page.evaluate("Number(document.getElementById('rate').textContent)"))
        round_trips.append(time.monotonic() - t0)
        if click is None and rates[-1] >= 1_000:  # mid-flood: a person clicks "Send request"
            click = asyncio.create_task(page.click("#req-send"))
        await asyncio.sleep(0.1)  # waits on: samples the page's rate ten times a second
    sent = int((await asyncio.wait_for(publisher, 15))[0])
    assert click is not None
    await asyncio.wait_for(click, 10)
    await page.wait_for_function(ACCOUNTED, arg=sent + probes, timeout=20_000)
    await page.wait_for_function(SHOWN, timeout=20_000)
    await page.wait_for_function(ANSWERED, timeout=20_000)  # the click mid-flood
    monitor = await page.evaluate("window.monitor")
    view = await demo_view(page)
    stats = view["client"]
    round_trips.sort()
    print(
        f"flood: {sent} sent, page rates {rates}, evaluate round trips median"
        f" {round_trips[len(round_trips) // 2]:.3f} s max {round_trips[-1]:.3f} s, longest timer"
        f" gap {max(monitor['gaps']):.0f} ms, click answered in {monitor['answeredMs']} ms,"
        f" stats {stats}"
    )
    assert sent == FLOOD_RATE * FLOOD_S
    assert stats["messages"] + stats["dropped"] == sent + probes
    assert max(rates) > 0, rates  # the page shows a live rate (how high depends on the machine)
    # the page stayed usable: its timer kept firing and the click mid-flood got its answer
    # (how fast is a figure, printed above, not a pass/fail: loadtests/ measure speed)
    assert len(monitor["gaps"]) > 1
    assert monitor["answeredMs"] is not None
    # requests are off: XYW002 from the gateway, unless the answer queued behind the flood
    # longer than the request's own timer (a slow machine): then the client's XYW012
    assert await page.get_attribute("#req-result", "data-code") in ("XYW002", "XYW012")
    await page.evaluate(RESET_RESULT)
    await page.click("#req-send")  # the flood is over: the gateway's own answer
    await page.wait_for_function(ANSWERED, timeout=20_000)
    assert await page.get_attribute("#req-result", "data-code") == "XYW002"
    assert int(view["drops"]) == stats["dropped"] and int(view["total"]) == stats["messages"]
    assert view["state"] == "open" and stats["reconnects"] == 0
    assert len(view["symbols"]) == FLOOD_SYMBOLS + 1  # and the probe's row


async def test_drops_are_shown_when_the_page_falls_behind(
    page: Page, anon_gw: Gateway, nats_module: EmbeddedNats, nc: NatsClient
) -> None:
    """A busy main thread stops Chromium reading the socket; the gateway drops and says so."""
    probes = await open_demo(page, anon_gw, nc, "xy.md.big")
    publisher = await start_publisher(nats_module.url, "xy.md.big", 20_000, 1.0, 5, pad=2_000)
    await page.evaluate(
        "() => { const t = performance.now(); while (performance.now() - t < 2500) {} }"
    )
    sent = int((await asyncio.wait_for(publisher, 15))[0])
    await page.wait_for_function(ACCOUNTED, arg=sent + probes, timeout=20_000)
    await page.wait_for_function(SHOWN, timeout=20_000)
    view = await demo_view(page)
    stats = view["client"]
    print(f"drops: {sent} sent, stats {stats}")
    assert stats["messages"] + stats["dropped"] == sent + probes
    assert stats["dropped"] > 0
    assert view["drops"] == str(stats["dropped"])
    assert await page.evaluate("document.getElementById('drops').classList.contains('alert')")
    assert any("(XYW003)" in line and "dropped" in line for line in view["log"])
    assert view["state"] == "open" and stats["reconnects"] == 0


#: The standalone client on the test page: two callbacks on one subject, one on binary payloads.
STANDALONE = """() => {
  const {FanoutClient} = window.fanout;
  const c = new FanoutClient(`ws://${location.host}/ws`);
  const got = {a: [], b: [], bin: [], barrier: 0};
  const unsubA = c.subscribe("xy.md.api.json", (m) => got.a.push(m.data));
  const unsubB = c.subscribe("xy.md.api.json", (m) => got.b.push(m.data));
  c.subscribe("xy.md.api.bin", (m) => got.bin.push({
    isBytes: m.data instanceof Uint8Array, bytes: Array.from(m.data ?? []), hasB64: "b64" in m.raw,
    hasData: "data" in m.raw, subject: m.subject}));
  c.subscribe("xy.md.api.barrier", () => { got.barrier++; });
  window.api = {c, got, unsubA, unsubB, types: [typeof unsubA, typeof unsubB]};
}"""

#: A request's rejection as plain values (requests are off on this gateway).
REQUEST = """async () => {
  try {
    await window.api.c.request("svc.orders.get", {order_id: "o-1"}, {timeoutMs: 1000});
    return null;
  } catch (e) {
    const isFanoutError = e instanceof window.fanout.FanoutError;
    return {name: e.name, code: e.code, isFanoutError, state: window.api.c.state};
  }
}"""


async def barrier(nc: NatsClient, page: Page) -> None:
    """One message on the barrier subject has reached the page (published after everything else)."""
    before = await page.evaluate("window.api.got.barrier")
    await nc.publish("xy.md.api.barrier", b"{}")
    await nc.flush()
    await page.wait_for_function("(n) => window.api.got.barrier > n", arg=before, timeout=20_000)


async def test_fanout_js_standalone_api(page: Page, anon_gw: Gateway, nc: NatsClient) -> None:
    await open_test_page(page, anon_gw)
    await page.evaluate(STANDALONE)
    assert await page.evaluate("window.api.types") == ["function", "function"]
    for subject, seen in (
        ("xy.md.api.json", "window.api.got.b.length > 0"),
        ("xy.md.api.bin", "window.api.got.bin.length > 0"),
        ("xy.md.api.barrier", "window.api.got.barrier > 0"),
    ):
        await until_received(nc, page, subject, f"() => {seen}")
    await page.evaluate("for (const k of ['a', 'b', 'bin']) window.api.got[k].length = 0")

    await nc.publish("xy.md.api.json", b'{"n": 1,  "s": "x"}')
    await nc.publish("xy.md.api.bin", b"\x00\x01\xfe\xffnot json")
    await barrier(nc, page)
    got = await page.evaluate("window.api.got")
    assert got["a"] == got["b"] == [{"n": 1, "s": "x"}]
    assert got["bin"] == [
        {
            "isBytes": True,
            "bytes": [0, 1, 254, 255, *b"not json"],
            "hasB64": True,
            "hasData": False,
            "subject": "xy.md.api.bin",
        }
    ]

    # one callback off: the other still gets messages; both off: nothing more arrives
    await page.evaluate("window.api.unsubA(); window.api.unsubA()")
    await nc.publish("xy.md.api.json", b'{"n": 2}')
    await barrier(nc, page)
    got = await page.evaluate("window.api.got")
    assert got["a"] == [{"n": 1, "s": "x"}] and got["b"] == [{"n": 1, "s": "x"}, {"n": 2}]
    await page.evaluate("window.api.unsubB()")
    # the request goes out after the unsub, so its answer means the gateway processed both
    assert await page.evaluate(REQUEST) == {
        "name": "FanoutError",
        "code": "XYW002",
        "isFanoutError": True,
        "state": "open",
    }
    for n in range(3):
        await nc.publish("xy.md.api.json", json.dumps({"n": 3 + n}).encode())
    await barrier(nc, page)
    got = await page.evaluate("window.api.got")
    assert got["b"] == [{"n": 1, "s": "x"}, {"n": 2}] and got["a"] == [{"n": 1, "s": "x"}]
    stats = await page.evaluate("window.api.c.stats")
    assert stats["reconnects"] == 0 and stats["lastCloseCode"] is None


async def test_bad_token_backs_off_instead_of_hammering(page: Page, auth_gw: Gateway) -> None:
    other_key, _ = generate_keypair("ec")
    forged = make_token(private_key_pem=other_key, sub="e2e", subjects=["xy.md.>"], ttl_s=600)
    before = metric(auth_gw, "fanout_handshake_failures_total", code="XYW005")
    await page.add_init_script(COUNT_SOCKETS)
    await open_demo_page(page, auth_gw, f"?token={forged}")
    await asyncio.sleep(WATCH_S)  # waits on: the window in which the attempts are counted
    view = await demo_view(page)

    async def counted() -> tuple[int, float] | None:
        """Sockets the page opened and refusals counted, once they agree (the newest
        attempt may still be on its way to the gateway when the window ends)."""
        attempts = await page.evaluate("window.socketsOpened")
        refused = metric(auth_gw, "fanout_handshake_failures_total", code="XYW005") - before
        return (attempts, refused) if attempts == refused else None

    _, refused = await async_wait_for(counted, 10, "every attempt refused and counted")
    # full-jitter backoff from 500 ms doubling: ~5 attempts in 4 s; more than 10 is a
    # hammering client (a 2^-15 chance for a correct one)
    assert 1 <= refused <= 10, refused
    assert view["client"]["lastCloseCode"] == 1006  # a browser never sees the 401
    assert view["state"] == "reconnecting" and view["client"]["messages"] == 0
    assert any("refused the handshake" in line for line in view["log"])


async def test_expired_token_ends_in_4005_and_authfailed(
    page: Page, auth_gw: Gateway, keypair: tuple[Path, Path]
) -> None:
    await page.add_init_script(COUNT_SOCKETS)
    await open_demo_page(page, auth_gw, f"?token={token_for(keypair, 4)}")
    await page.wait_for_function("() => window.fanoutDemo.client.state === 'open'", timeout=15_000)
    await page.evaluate(RECORD_EVENTS, await page.evaluate_handle("window.fanoutDemo.client"))
    await page.wait_for_function(
        "() => window.events.some((e) => e.type === 'authfailed')", timeout=20_000
    )
    refused = metric(auth_gw, "fanout_handshake_failures_total", code="XYW005")
    await asyncio.sleep(1.5)  # waits on: a client that reconnected anyway would show up here
    events = await page.evaluate("window.events.map((e) => [e.type, e.detail.code ?? null])")
    view = await demo_view(page)
    assert ["close", 4005] in events and ["authfailed", 4005] in events
    assert (
        await page.evaluate("window.events.find((e) => e.type === 'close').detail.reconnectInMs")
        is None
    )
    assert view["state"] == "closed" and view["client"]["lastCloseCode"] == 4005
    assert await page.evaluate("window.socketsOpened") == 1
    assert metric(auth_gw, "fanout_handshake_failures_total", code="XYW005") == refused
    assert any("authentication failed (4005)" in line for line in view["log"])
    assert any("token expires at" in line for line in view["log"])  # the `expiring` notice


#: The client on the test page takes its tokens from the test (``window.nextToken``).
RENEWING = """() => {
  const {FanoutClient} = window.fanout;
  const c = new FanoutClient(`ws://${location.host}/ws`, {token: () => window.nextToken()});
  window.api = {c, got: 0};
  c.subscribe("xy.md.renew.t", () => { window.api.got++; });
  return c;
}"""


async def test_token_refresh_on_expiring_keeps_the_connection(
    page: Page, auth_gw: Gateway, keypair: tuple[Path, Path], nc: NatsClient
) -> None:
    issued: list[str] = []

    def next_token() -> str:
        issued.append(token_for(keypair, 300 if not issued else 900))
        return issued[-1]

    await page.expose_function("nextToken", next_token)
    await open_test_page(page, auth_gw)
    await page.evaluate(RECORD_EVENTS, await page.evaluate_handle(RENEWING))
    await page.wait_for_function("() => window.api.c.state === 'open'", timeout=15_000)
    first_conn = await page.evaluate("window.api.c.welcome.conn")
    assert await page.evaluate("window.api.c.welcome.expires_at") == exp_of(issued[0])
    # the lead time (3600 s) exceeds the token's life, so the next sweep sends `expiring`
    await page.wait_for_function(
        "() => window.events.some((e) => e.type === 'authrenewed')", timeout=15_000
    )
    renewed = await page.evaluate(
        "window.events.find((e) => e.type === 'authrenewed').detail.expiresAt"
    )
    assert len(issued) >= 2
    assert renewed in {exp_of(t) for t in issued[1:]}
    assert renewed >= exp_of(issued[0]) + 600
    types = await page.evaluate("window.events.map((e) => e.type)")
    assert types.index("expiring") < types.index("authrenewed")
    await until_received(nc, page, "xy.md.renew.t", "() => window.api.got > 0")
    assert "close" not in await page.evaluate("window.events.map((e) => e.type)")
    assert await page.evaluate("window.api.c.welcome.conn") == first_conn
    assert await page.evaluate("window.api.c.stats") == {
        "messages": await page.evaluate("window.api.got"),
        "dropped": 0,
        "reconnects": 0,
        "lastCloseCode": None,
    }
