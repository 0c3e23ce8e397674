#!/usr/bin/env python3
"""How a worker should get stream sequences onto live messages: CPU per NATS message.

Issue 15 names two ways: (a) the stream republishes every stored message
(``RePublish``, headers ``Nats-Sequence`` …) to ``<prefix>.<subject>`` and the
worker keeps a plain core subscription; (b) one ordered push consumer per
pattern per worker. This script measures, in a subscriber process of its own,
user + sys CPU per message received for:

- ``core``: today's path, a core subscription on the original subject (baseline);
- ``republish``: a core subscription on the republished subject, the sequence
  read from the raw header block (what the gateway does);
- ``republish-parsed``: the same with nats-py's full header parse (for reference);
- ``ordered``: nats-py's ordered push consumer (``js.subscribe(ordered_consumer=True)``).

nats-server's CPU per message is reported too (the republish is server work).
Everything on loopback; one nats-server with JetStream in a temporary store::

    python loadtests/seq_ingest.py --messages 50000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

import nats
import uvloop
from nats.js.api import RePublish, StreamConfig

from fanout.embedded_nats import EmbeddedNats

SUBJECT = "xy.md.bench.x"
PREFIX = "fanout.rp"
STREAM = "BENCH"
MODES = ("core", "republish", "republish-parsed", "ordered")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAYLOAD = b'{"symbol":"x","price":64000.1234,"ts":1764590000000,"pad":"' + b"p" * 40 + b'"}'


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _seq_from_raw(headers: bytes) -> int:
    """The gateway's way: find ``Nats-Sequence:`` in the raw block, no dict."""
    i = headers.find(b"Nats-Sequence:")
    end = headers.find(b"\r\n", i)
    return int(headers[i + 14 : end])


async def subscriber(url: str, mode: str, count: int, ready: Connection) -> None:
    done = asyncio.Event()
    got = 0
    last_seq = 0

    class RawClient(nats.NATS):
        """Messages straight from the parser, as the worker's LinkClient takes them."""

        async def _process_msg(
            self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
        ) -> None:
            nonlocal got, last_seq
            if mode == "core":
                subject.decode()
            elif mode == "republish":
                subject.decode()
                last_seq = _seq_from_raw(headers)
            else:
                hdr = await self._process_headers(headers)
                assert hdr is not None
                last_seq = int(hdr["Nats-Sequence"])
            got += 1
            if got == count:
                done.set()

    if mode == "ordered":
        nc = await nats.connect(url)
        js = nc.jetstream()

        async def on_msg(msg: nats.aio.msg.Msg) -> None:
            nonlocal got, last_seq
            last_seq = msg.metadata.sequence.stream
            got += 1
            if got == count:
                done.set()

        await js.subscribe(SUBJECT, cb=on_msg, ordered_consumer=True, deliver_policy="new")
    else:
        nc = RawClient()
        await nc.connect(url)
        subject = SUBJECT if mode == "core" else f"{PREFIX}.{SUBJECT}"
        await nc.subscribe(subject, pending_msgs_limit=-1, pending_bytes_limit=-1)
    await nc.flush()
    start = cpu_s()
    ready.send("ready")
    t0 = time.monotonic()
    await asyncio.wait_for(done.wait(), 120)
    elapsed = time.monotonic() - t0
    used = cpu_s() - start
    ready.send({"cpu_s": used, "got": got, "last_seq": last_seq, "elapsed_s": elapsed})
    await nc.close()


def subscriber_main(url: str, mode: str, count: int, ready: Connection) -> None:
    uvloop.run(subscriber(url, mode, count, ready))


async def setup_stream(url: str) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(
            name=STREAM,
            subjects=["xy.md.>"],
            republish=RePublish(src="xy.md.>", dest=f"{PREFIX}.xy.md.>"),
            max_msgs=1_000_000,
        )
    )
    await nc.close()


async def publish(url: str, count: int, rate: float) -> None:
    """Core publishes at ``rate`` msg/s in ticks of 10 ms (the stream captures them)."""
    nc = await nats.connect(url)
    per_tick = max(1, int(rate / 100))
    sent = 0
    next_at = time.monotonic()
    while sent < count:
        for _ in range(min(per_tick, count - sent)):
            await nc.publish(SUBJECT, PAYLOAD)
            sent += 1
        await nc.flush()
        next_at += 0.01
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    await nc.close()


def one_run(server: EmbeddedNats, mode: str, count: int, rate: float) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=subscriber_main, args=(server.url, mode, count, child))
    proc.start()
    try:
        if not parent.poll(30):
            raise RuntimeError("subscriber did not start")
        parent.recv()
        assert server.proc is not None
        nats_before = proc_cpu_s(server.proc.pid)
        uvloop.run(publish(server.url, count, rate))
        if not parent.poll(120):
            raise RuntimeError("subscriber did not receive everything")
        result = parent.recv()
        nats_used = proc_cpu_s(server.proc.pid) - nats_before
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    return {
        "mode": mode,
        "us_per_msg": 1e6 * result["cpu_s"] / count,
        "nats_us_per_msg": 1e6 * nats_used / count,
        "got": result["got"],
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--messages", type=int, default=50_000, help="messages per run")
    p.add_argument("--rate", type=float, default=20_000.0, help="messages per second")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all modes (medians)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated modes to run")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    with EmbeddedNats(jetstream=True) as server:
        uvloop.run(setup_stream(server.url))
        for _ in range(args.rounds):
            for mode in modes:
                run = one_run(server, mode, args.messages, args.rate)
                print(json.dumps(run), flush=True)
                runs[mode].append(run)
    print(f"\n{'mode':<18} {'sub CPU-us/msg':>15} {'nats-server CPU-us/msg':>23}")
    for mode, rs in runs.items():
        sub = statistics.median(r["us_per_msg"] for r in rs)
        srv = statistics.median(r["nats_us_per_msg"] for r in rs)
        print(f"{mode:<18} {sub:>15.2f} {srv:>23.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
