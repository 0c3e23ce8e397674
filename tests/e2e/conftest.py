"""Real headless Chromium for the e2e tests: the system browser, never a download.

The browser is the OS package at /usr/bin/chromium. Without it the e2e tests
skip, except under CI (the ``CI`` variable set), where its absence is a broken
image and fails loudly. One browser per test module (module event loop); each
test gets a fresh context and page, and any uncaught page error fails it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Error, Page, ViewportSize, async_playwright

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT: ViewportSize = {"width": 1280, "height": 800}


def require_chromium() -> None:
    if CHROMIUM.exists():
        return
    why = f"{CHROMIUM} is missing (Debian package `chromium`)"
    if os.environ.get("CI"):
        pytest.fail(f"CI must provide the system Chromium: {why}")
    pytest.skip(why)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    require_chromium()
    async with async_playwright() as pw:
        b = await pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield b
        finally:
            await b.close()


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport=VIEWPORT)
    pg = await context.new_page()
    errors: list[Error] = []
    pg.on("pageerror", lambda err: errors.append(err))
    try:
        yield pg
    finally:
        await context.close()
    assert errors == [], f"uncaught errors in the page: {errors}"
