#!/usr/bin/env python3
"""Refresh ``docs/demo.png``: the demo page with live ticks, in headless system Chromium.

Starts ``fanout serve --demo --workers 1`` on a free loopback port, opens ``/``
in /usr/bin/chromium (through Playwright, never a downloaded browser) at
1280x800, lets the sparklines fill for ``--seconds``, checks the page is live
(state ``open``, one row per demo symbol, no drops), and writes the PNG. Run it
whenever the page changes::

    python loadtests/screenshot.py              # → docs/demo.png
    python loadtests/screenshot.py --scheme light --out /tmp/light.png

Every wait is bounded; the gateway is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Literal

from playwright.async_api import async_playwright

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
SYMBOLS = 4  # the demo publisher's default symbols


def start_gateway(port: int, interval_s: float) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FANOUT_", "NATS_", "JWT_"))}
    env.update(
        FANOUT_SERVER_PORT=str(port),
        FANOUT_ADMIN_PORT="0",  # the demo page only
        FANOUT_DEMO_INTERVAL_S=str(interval_s),
        FANOUT_LOG_LEVEL="warning",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "fanout.cli", "serve", "--demo", "--workers", "1"],
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"fanout serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return proc
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    stop_gateway(proc)
    raise SystemExit("the gateway was not ready within 20 s")


def stop_gateway(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def capture(
    url: str, out: Path, seconds: float, scheme: Literal["dark", "light"]
) -> dict[str, object]:
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = await browser.new_page(
                viewport={"width": 1280, "height": 800}, color_scheme=scheme
            )
            await page.goto(url)
            await page.wait_for_function(
                "(n) => document.querySelectorAll('#ticks tr[data-symbol]').length >= n"
                " && document.getElementById('state').dataset.state === 'open'",
                arg=SYMBOLS,
                timeout=10_000,
            )
            await asyncio.sleep(seconds)
            await page.click("#req-send")  # show a reply from the demo orders service too
            await page.wait_for_function(
                "() => document.getElementById('req-result').dataset.status === 'ok'",
                timeout=5_000,
            )
            view: dict[str, object] = await page.evaluate(
                """() => ({state: document.getElementById("state").textContent,
                  rows: document.querySelectorAll("#ticks tr[data-symbol]").length,
                  rate: document.getElementById("rate").textContent,
                  drops: document.getElementById("drops").textContent})"""
            )
            if view["state"] != "open" or view["rows"] != SYMBOLS or view["drops"] != "0":
                raise SystemExit(f"the page is not live, not taking a screenshot: {view}")
            out.parent.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(out))
            return view
        finally:
            await browser.close()


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "demo.png", help="PNG to write")
    p.add_argument("--seconds", type=float, default=20.0, help="let the charts fill this long")
    p.add_argument("--interval", type=float, default=0.2, help="demo tick interval (s)")
    p.add_argument("--scheme", choices=["dark", "light"], default="dark", help="colour scheme")
    args = p.parse_args()
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} is missing (Debian package `chromium`)", file=sys.stderr)
        return 1
    port = free_port()
    proc = start_gateway(port, args.interval)
    print(
        f"demo gateway ready on :{port}; filling the charts for {args.seconds} s", file=sys.stderr
    )
    try:
        view = asyncio.run(
            capture(f"http://127.0.0.1:{port}/", args.out, args.seconds, args.scheme)
        )
    finally:
        stop_gateway(proc)
    print(f"wrote {args.out} ({view})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
