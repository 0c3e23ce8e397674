#!/usr/bin/env python3
"""Subscription churn: what a sub/unsub costs the worker, and what churn costs a neighbour.

Two phases against one gateway worker (real nats-server, loopback):

1. **per-op cost** — one connection goes 0 → 1000 → 0 subscriptions, ``--rounds``
   times, in frames of ``--frame-ops`` ops, with overlapping wildcards mixed in
   (every 20th pattern is ``xy.md.churn.<k>.*`` over twenty literal ones, plus one
   ``xy.md.churn.>`` over everything). Reported: the worker's CPU time (user +
   sys from ``/proc``) divided by the ops, in µs.
2. **neighbour** — 3 clients each subscribe 1000 patterns in one frame and
   unsubscribe them in one frame, ``--rounds`` times, while a neighbour pings in a
   loop and a prober opens a handshake and reads ``/readyz`` every 100 ms.
   Reported: the neighbour's ping round trip p50 / p99 / max, refused handshakes
   and non-200 ``/readyz`` answers.

3. **loop hold** — ``loop_hold.py`` run against the same nats-server, on the
   code of the gateway measured (``--gateway-src`` or this tree): the longest
   single event-loop callback (CPU ms, max and p99) of a worker built in process
   while one frame of 1000 subs, one of 1000 unsubs, and 3 clients × 1000
   sub/unsub churn are handled. ``--no-loop-hold`` skips it.

The inbound rate limit is raised for the run (it is not what is measured) and
``>`` patterns are allowed::

    python loadtests/sub_churn.py
    python loadtests/sub_churn.py --gateway-src /tmp/before --label before
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
from bench import CpuSnapshot, Procs, percentile, run_tool, start_servers, workers_of

GATEWAY_ENV = [
    "FANOUT_WS_INBOUND_RATE=1000000",
    "FANOUT_WS_INBOUND_BURST=100000",
    "FANOUT_WS_ALLOW_FULL_WILDCARD=true",
    "FANOUT_LOG_LEVEL=warning",
]


def patterns(prefix: str) -> list[str]:
    """1000 patterns; every 20th a wildcard over twenty literals, one ``>`` over all."""
    out = [f"{prefix}.{i % 50}.*" if i % 20 == 0 else f"{prefix}.{i % 50}.{i}" for i in range(999)]
    out.append(f"{prefix}.>")
    return out


class Client:
    """A bare protocol client: ops out, replies counted by id."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 1

    async def ops(self, kind: str, subjects: Sequence[str], per_frame: int) -> None:
        """Send ``kind`` for every subject, ``per_frame`` ops a frame; wait for every reply."""
        for start in range(0, len(subjects), per_frame):
            chunk = subjects[start : start + per_frame]
            frame = []
            for subject in chunk:
                frame.append({"op": kind, "id": self.next_id, "subject": subject})
                self.next_id += 1
            await self.ws.send_str(json.dumps(frame, separators=(",", ":")))
            await self.wait_id(self.next_id - 1)

    async def wait_id(self, last: int) -> None:
        async with asyncio.timeout(60):
            while True:
                msg = await self.ws.receive()
                if msg.type != aiohttp.WSMsgType.TEXT:
                    raise RuntimeError(f"connection ended: {msg.type}")
                data = json.loads(msg.data)
                for frame in data if isinstance(data, list) else [data]:
                    if frame.get("op") == "error":
                        raise RuntimeError(f"error reply: {frame}")
                    if frame.get("id") == last:
                        return

    async def ping(self) -> float:
        op_id = self.next_id
        self.next_id += 1
        t0 = time.perf_counter()
        await self.ws.send_str(json.dumps({"op": "ping", "id": op_id}))
        await self.wait_id(op_id)
        return (time.perf_counter() - t0) * 1000.0


async def connect(session: aiohttp.ClientSession, url: str, token: str) -> Client:
    """Connect; a shedding worker (503) is retried for up to 60 s (the old code sheds)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            ws = await session.ws_connect(
                url, protocols=("bearer", token), autoping=True, max_msg_size=0
            )
            break
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status != 503 or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
    welcome = await ws.receive()
    if welcome.type != aiohttp.WSMsgType.TEXT:
        raise RuntimeError("no welcome frame")
    return Client(ws)


def http_status(url: str) -> int:
    """The status, or 0 when no answer came within 5 s."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, TimeoutError):
        return 0


async def scenario(
    args: argparse.Namespace, url: str, token: str, pids: list[int]
) -> dict[str, Any]:
    http = url.removeprefix("ws://").partition("/")[0]
    async with aiohttp.ClientSession() as session:
        # phase 1: one connection 0 -> 1000 -> 0, per-op CPU of the worker
        one = await connect(session, url, token)
        pats = patterns("xy.md.churn.solo")
        await one.ops("sub", pats, args.frame_ops)  # warm-up round
        await one.ops("unsub", pats, args.frame_ops)
        before = CpuSnapshot.take(pids)
        t0 = time.perf_counter()
        for _ in range(args.rounds):
            await one.ops("sub", pats, args.frame_ops)
            await one.ops("unsub", list(reversed(pats)), args.frame_ops)
        wall = time.perf_counter() - t0
        user, sys_, _ = CpuSnapshot.take(pids).since(before)
        ops = args.rounds * 2 * len(pats)
        await one.ws.close()

        # phase 2: 3 churners, a pinging neighbour, a handshake prober
        neighbour = await connect(session, url, token)
        churners = [await connect(session, url, token) for _ in range(3)]
        refused: list[int] = []
        readyz: list[int] = []
        done = asyncio.Event()

        async def churn(c: int, client: Client) -> None:
            mine = patterns(f"xy.md.churn.c{c}")
            for _ in range(args.rounds):
                await client.ops("sub", mine, len(mine))
                await client.ops("unsub", mine, len(mine))

        async def probe() -> None:
            while not done.is_set():
                status = await asyncio.to_thread(http_status, f"http://{http}/readyz")
                if status != 200:
                    readyz.append(status)
                try:
                    extra = await session.ws_connect(
                        url, protocols=("bearer", token), timeout=aiohttp.ClientWSTimeout(5)
                    )
                except aiohttp.WSServerHandshakeError as exc:
                    refused.append(exc.status)
                except (TimeoutError, aiohttp.ClientError):
                    refused.append(0)
                else:
                    await extra.close()
                await asyncio.sleep(0.1)

        async def pings(stop: asyncio.Event) -> list[float]:
            rtts: list[float] = []
            while not stop.is_set():
                rtts.append(await neighbour.ping())
                await asyncio.sleep(0.005)
            return rtts

        idle_done = asyncio.Event()
        baseline = asyncio.create_task(pings(idle_done))
        await asyncio.sleep(args.baseline_s)
        idle_done.set()
        idle = sorted(await baseline)
        prober = asyncio.create_task(probe())
        pinger = asyncio.create_task(pings(done))
        await asyncio.gather(*(churn(c, cl) for c, cl in enumerate(churners)))
        done.set()
        rtts = sorted(await pinger)
        await prober
        for cl in [neighbour, *churners]:
            await cl.ws.close()
    return {
        "label": args.label,
        "rounds": args.rounds,
        "frame_ops": args.frame_ops,
        "ops": ops,
        "worker_cpu_us_per_op": round((user + sys_) / ops * 1e6, 2),
        "wall_us_per_op": round(wall / ops * 1e6, 2),
        "neighbour_pings": len(rtts),
        "neighbour_ping_ms": {
            "p50": round(percentile(rtts, 0.5), 2),  # type: ignore[arg-type]
            "p99": round(percentile(rtts, 0.99), 2),  # type: ignore[arg-type]
            "max": round(rtts[-1], 2) if rtts else float("nan"),
        },
        "idle_ping_ms": {
            "p50": round(percentile(idle, 0.5), 2),  # type: ignore[arg-type]
            "p99": round(percentile(idle, 0.99), 2),  # type: ignore[arg-type]
        },
        "handshakes_refused": refused,
        "readyz_not_200": readyz,
    }


HOLD_PHASES = ("sub_1000", "unsub_1000", "churn_3x1000")


def loop_hold(args: argparse.Namespace, nats_url: str) -> dict[str, Any] | None:
    """Phase 3: ``loop_hold.py`` in a process of its own on the measured tree's code;
    None when that tree cannot run it (older than the in-process harness)."""
    here = Path(__file__).resolve().parent
    src = Path(args.gateway_src).resolve() if args.gateway_src else here.parent
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [sys.executable, str(here / "loop_hold.py"), "--nats-url", nats_url]
    try:
        done = subprocess.run(
            [*command, "--rounds", str(min(args.rounds, 5))],
            cwd=src,
            env=env,
            capture_output=True,
            timeout=600,
            check=True,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        print(f"loop hold phase failed: {exc}", file=sys.stderr)
        return None
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[0])
    return {name: result[name] for name in HOLD_PHASES}


def run(args: argparse.Namespace, procs: Procs) -> dict[str, Any]:
    url, token = start_servers(
        procs,
        "fanout",
        1,
        10_000,
        [*GATEWAY_ENV, *args.gateway_env],
        args.log_dir,
        args.gateway_src,
    )
    assert token is not None
    pids = workers_of(procs)
    result = asyncio.run(scenario(args, url, token, pids))
    if args.loop_hold:
        assert procs.nats is not None
        result["loop_hold"] = loop_hold(args, procs.nats.url)
    return result


def table(result: dict[str, Any]) -> str:
    ping = result["neighbour_ping_ms"]
    rows = [
        ("run", result["label"] or "-"),
        ("ops (0 -> 1000 -> 0 x rounds)", f"{result['ops']} in frames of {result['frame_ops']}"),
        ("worker CPU µs/op", f"{result['worker_cpu_us_per_op']}"),
        ("wall µs/op (one client)", f"{result['wall_us_per_op']}"),
        ("neighbour ping ms p50/p99/max", f"{ping['p50']} / {ping['p99']} / {ping['max']}"),
        ("neighbour pings", f"{result['neighbour_pings']}"),
        (
            "same, no churn: p50/p99",
            f"{result['idle_ping_ms']['p50']} / {result['idle_ping_ms']['p99']}",
        ),
        ("handshakes refused (0: no answer)", json.dumps(result["handshakes_refused"])),
        ("/readyz not 200", json.dumps(result["readyz_not_200"])),
    ]
    hold = result.get("loop_hold")
    if hold is None:
        rows.append(("longest loop hold", "n/a (phase 3 skipped or failed)"))
    else:
        for name in HOLD_PHASES:
            r = hold[name]
            rows.append(
                (
                    f"longest loop hold, {name}: CPU ms max/p99",
                    f"{r['cpu_max_ms']} / {r['cpu_p99_ms']} (no collection in it: "
                    f"{r['cpu_max_no_gc_ms']}; wall max {r['wall_max_ms']})",
                )
            )
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=10, help="0 -> 1000 -> 0 cycles per client")
    p.add_argument("--frame-ops", type=int, default=100, help="ops per frame in phase 1")
    p.add_argument("--gateway-env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--gateway-src", metavar="DIR", help="run the gateway from another tree")
    p.add_argument(
        "--baseline-s",
        type=float,
        default=3.0,
        help="seconds of neighbour pings without churn first (machine noise)",
    )
    p.add_argument("--log-dir", help="keep the gateway log here")
    p.add_argument(
        "--no-loop-hold",
        dest="loop_hold",
        action="store_false",
        help="skip phase 3 (the in-process loop-hold measurement)",
    )
    p.add_argument("--label", default="")
    args = p.parse_args(argv)
    if not 1 <= args.rounds <= 1000 or not 1 <= args.frame_ops <= 1000:
        p.error("rounds must be 1..1000 and frame-ops 1..1000")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_tool("sub_churn", parse_args(argv), run, table)


if __name__ == "__main__":
    sys.exit(main())
