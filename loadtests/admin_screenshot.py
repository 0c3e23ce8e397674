#!/usr/bin/env python3
"""Refresh ``docs/admin.png``: the admin page during a kill -9 of a worker.

Starts ``fanout serve --demo --workers 2`` on free loopback ports (public and
admin), opens the demo page in ``--tabs`` headless Chromium tabs (so clients
receive ticks), opens ``/admin`` at 1280x800, kills worker 1 with SIGKILL and
prints what ``/admin/state.json`` said every 100 ms meanwhile (the timeline the
README describes); the screenshot is taken while the page shows it happening
(one worker of two and the restart, before the replacement is up). Through
Playwright with /usr/bin/chromium, never a downloaded browser::

    python loadtests/admin_screenshot.py             # → docs/admin.png
    python loadtests/admin_screenshot.py --event roll --out /tmp/roll.png

Every wait is bounded; the gateway is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from playwright.async_api import Page, async_playwright

from fanout.embedded_nats import free_port

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=2) as resp:
        view: dict[str, Any] = json.loads(resp.read())
        return view


def start_gateway(port: int, admin_port: int, interval_s: float) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FANOUT_", "NATS_", "JWT_"))}
    env.update(
        FANOUT_SERVER_PORT=str(port),
        FANOUT_ADMIN_PORT=str(admin_port),
        FANOUT_DEMO_INTERVAL_S=str(interval_s),
        FANOUT_LOG_LEVEL="warning",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "fanout.cli", "serve", "--demo", "--workers", "2"],
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"fanout serve exited with {proc.returncode}")
        try:
            if len(get_json(f"http://127.0.0.1:{admin_port}/admin/state.json")["workers"]) == 2:
                return proc
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.1)
    stop_gateway(proc)
    raise SystemExit("the gateway was not ready within 30 s")


def stop_gateway(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def line(view: dict[str, Any], t0: float) -> str:
    rows = " | ".join(
        f"w{w['index']} gen {w['generation']} pid {w['pid']} clients {w['clients']}"
        f"{' draining' if w['draining'] else ''} up {w['uptimeSeconds']} s"
        for w in view["workers"]
    )
    t = view["totals"]
    return (
        f"+{time.monotonic() - t0:4.1f} s  {view['status']:8} workers {t['workers']}/"
        f"{view['workersWanted']}  clients {t['clients']:3}  deliveries/s "
        f"{t['deliveriesPerSecond']:7.1f}  restarts {view['restarts']}  [{rows}]"
    )


async def timeline(state_url: str, seconds: float) -> list[str]:
    """What /admin/state.json says every 100 ms for ``seconds`` (from a thread: urllib)."""
    t0, out = time.monotonic(), []
    while time.monotonic() - t0 < seconds:
        try:
            out.append(line(await asyncio.to_thread(get_json, state_url), t0))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            out.append(f"+{time.monotonic() - t0:4.1f} s  unreachable: {exc}")
        await asyncio.sleep(0.1)
    return out


#: When to take the screenshot, per event: the moment the page shows it happening.
MOMENT = {
    # between the kill and the replacement: one worker live of two, the restart counted
    "kill": """() => document.getElementById('workers').textContent === '1/2'
      && document.getElementById('restart-count').textContent === '1'""",
    # a rolling restart: every worker replaced by one of the next generation
    "roll": """() => [...document.querySelectorAll('#rows tr')]
      .filter((tr) => tr.children[2].textContent === '1').length === 2""",
}


async def capture(
    public: str,
    admin: str,
    out: Path,
    tabs: int,
    warmup_s: float,
    after_s: float,
    event: str,
    supervisor: int,
) -> list[str]:
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            for _ in range(tabs):
                demo = await (await browser.new_context()).new_page()
                await demo.goto(public + "/")
            page: Page = await browser.new_page(
                viewport={"width": 1280, "height": 800}, color_scheme="dark"
            )
            await page.goto(admin + "/admin")
            await page.wait_for_function(
                "(n) => Number(document.getElementById('t-clients').textContent) >= n"
                " && document.querySelectorAll('#rows tr').length === 2",
                arg=tabs,
                timeout=15_000,
            )
            await asyncio.sleep(warmup_s)
            view = get_json(admin + "/admin/state.json")
            victim = next(w["pid"] for w in view["workers"] if w["index"] == 1)
            recorder = asyncio.create_task(timeline(admin + "/admin/state.json", after_s))
            if event == "kill":
                os.kill(victim, signal.SIGKILL)
            else:
                os.kill(supervisor, signal.SIGHUP)
            await page.wait_for_function(MOMENT[event], timeout=10_000)
            out.parent.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(out))
            return await recorder
        finally:
            await browser.close()


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "admin.png", help="PNG to write")
    p.add_argument("--tabs", type=int, default=6, help="demo page tabs (WebSocket clients)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before the kill")
    p.add_argument("--after", type=float, default=4.0, help="seconds of timeline after the kill")
    p.add_argument("--interval", type=float, default=0.1, help="demo tick interval (s)")
    p.add_argument(
        "--event",
        choices=sorted(MOMENT),
        default="kill",
        help="kill -9 of worker 1, or a rolling restart (SIGHUP to the supervisor)",
    )
    args = p.parse_args()
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} is missing (Debian package `chromium`)", file=sys.stderr)
        return 1
    port, admin_port = free_port(), free_port()
    proc = start_gateway(port, admin_port, args.interval)
    print(f"gateway ready: public :{port}, admin :{admin_port}", file=sys.stderr)
    try:
        lines = asyncio.run(
            capture(
                f"http://127.0.0.1:{port}",
                f"http://127.0.0.1:{admin_port}",
                args.out,
                args.tabs,
                args.warmup,
                args.after,
                args.event,
                proc.pid,
            )
        )
    finally:
        stop_gateway(proc)
    print("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
