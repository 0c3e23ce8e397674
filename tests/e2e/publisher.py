"""A tick publisher in its own process, so the flood does not stall the test's event loop.

``python -m tests.e2e.publisher URL SUBJECT RATE SECONDS SYMBOLS BURST_MS PAD``
publishes ``RATE * SECONDS`` JSON ticks on ``SUBJECT.fNN`` (each padded with
``PAD`` bytes), in bursts every ``BURST_MS``, then prints how many it sent.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import nats


async def publish(
    url: str, prefix: str, rate: int, seconds: float, symbols: int, burst_ms: float, pad: int
) -> int:
    nc = await nats.connect(url)
    padding = "x" * pad
    total = int(rate * seconds)
    sent = 0
    started = time.monotonic()
    try:
        # a generous cap: a loaded machine publishes late, but still publishes everything
        while sent < total and time.monotonic() - started < seconds * 10 + 30:
            due = min(total, int((time.monotonic() - started) * rate) + 1)
            while sent < due:
                i = sent % symbols
                price = 100.0 + i + sent % 97 / 100
                tick = {"symbol": f"f{i:02d}", "price": price, "seq": sent + 1, "pad": padding}
                await nc.publish(f"{prefix}.f{i:02d}", json.dumps(tick).encode())
                sent += 1
            await asyncio.sleep(burst_ms / 1000)  # waits on: paces the bursts to the rate
        await nc.flush()
    finally:
        await nc.close()
    return sent


def main() -> None:
    url, prefix, rate, seconds, symbols, burst_ms, pad = sys.argv[1:8]
    sent = publish(url, prefix, int(rate), float(seconds), int(symbols), float(burst_ms), int(pad))
    print(asyncio.run(sent))


if __name__ == "__main__":
    main()
