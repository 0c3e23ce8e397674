"""What a request through the gateway costs over a direct nats-py request, in the same run.

    python loadtests/request_overhead.py --count 3000
    python loadtests/request_overhead.py --count 3000 --responder service --concurrency 16

Starts, on loopback only: a nats-server, an echo responder in its own process
(a plain nats-py subscription, or a ``fanout.service`` with no interceptors),
and ``fanout serve --workers 1`` with requests on. Then it measures, in
alternating blocks so drift hits both sides alike, the round trip of
``--count`` requests per path: a nats-py client calling ``nc.request`` and a
WebSocket client (aiohttp) sending ``request`` ops. The gateway's overhead is
the difference; it includes the WebSocket framing and JSON work of the client.
Bounded: ``--count`` requests per path, ``--max-seconds`` of wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import nats
from nats.aio.client import Client

from fanout.embedded_nats import EmbeddedNats, free_port

SUBJECT = "bench.echo"
RESPONDERS = {
    "plain": """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    async def echo(msg):
        await msg.respond(msg.data)
    await nc.subscribe("bench.echo", cb=echo)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
""",
    "service": """
import asyncio, sys, nats
from fanout.service import Service
async def main():
    nc = await nats.connect(sys.argv[1])
    svc = Service(nc, name="bench", tracing=False)
    @svc.handler("bench.echo")
    async def echo(req):
        return req.data
    await svc.start()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
""",
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def direct_block(nc: Client, n: int, concurrency: int) -> list[float]:
    out: list[float] = []

    async def one(i: int) -> None:
        start = time.perf_counter()
        await nc.request(SUBJECT, f'{{"n":{i}}}'.encode(), timeout=5)
        out.append(time.perf_counter() - start)

    await run_concurrently(one, n, concurrency)
    return out


class WsRequester:
    """One WebSocket connection; replies are matched to waiters by id."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.waiters: dict[int, asyncio.Future[dict[str, object]]] = {}
        self.next_id = 1
        self.reader = asyncio.get_running_loop().create_task(self.read())

    async def read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            frame = json.loads(msg.data)
            waiter = self.waiters.pop(frame.get("id"), None)
            if waiter is not None:
                waiter.set_result(frame)

    async def request(self, i: int) -> float:
        op_id = self.next_id
        self.next_id += 1
        waiter = asyncio.get_running_loop().create_future()
        self.waiters[op_id] = waiter
        start = time.perf_counter()
        await self.ws.send_str(
            f'{{"op":"request","id":{op_id},"subject":"{SUBJECT}","data":{{"n":{i}}}}}'
        )
        frame = await asyncio.wait_for(waiter, 5)
        elapsed = time.perf_counter() - start
        if frame.get("op") != "reply":
            raise RuntimeError(f"gateway answered {frame}")
        return elapsed


async def gateway_block(requester: WsRequester, n: int, concurrency: int) -> list[float]:
    out: list[float] = []

    async def one(i: int) -> None:
        out.append(await requester.request(i))

    await run_concurrently(one, n, concurrency)
    return out


async def run_concurrently(fn: object, n: int, concurrency: int) -> None:
    queue = iter(range(n))

    async def worker() -> None:
        for i in queue:
            await fn(i)  # type: ignore[operator]

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of every live process in the process group ``pgid``."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def start_gateway(nats_url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FANOUT_", "NATS_", "WS_"))}
    env.update(
        NATS_URLS=nats_url,
        WS_REQUEST_WHITELIST="bench.>",
        FANOUT_WS_AUTH_REQUIRED="false",
        FANOUT_SERVER_HOST="127.0.0.1",
        FANOUT_SERVER_PORT=str(port),
        FANOUT_ADMIN_PORT="0",  # nothing here reads the admin port
        FANOUT_REQUESTS_RATE="1000000",
        FANOUT_REQUESTS_BURST="1000000",
        FANOUT_WS_INBOUND_RATE="1000000",
        FANOUT_WS_INBOUND_BURST="1000000",
        FANOUT_LOG_LEVEL="warning",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "fanout.cli", "serve", "--workers", "1"],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.05)
    proc.terminate()
    raise RuntimeError(f"gateway not ready:\n{log.read_text()}")


async def measure(
    args: argparse.Namespace, nats_url: str, port: int, gateway_pgid: int
) -> dict[str, object]:
    nc = await nats.connect(nats_url)
    session = aiohttp.ClientSession()
    ws = await session.ws_connect(f"ws://127.0.0.1:{port}/ws", max_msg_size=0, autoping=True)
    welcome = await asyncio.wait_for(ws.receive(), 5)
    assert json.loads(welcome.data)["op"] == "welcome"
    requester = WsRequester(ws)
    direct: list[float] = []
    gateway: list[float] = []
    deadline = time.monotonic() + args.max_seconds
    try:
        await direct_block(nc, args.warmup, args.concurrency)
        await gateway_block(requester, args.warmup, args.concurrency)
        block = max(args.concurrency, args.count // 10)
        cpu_before = group_cpu_s(gateway_pgid)
        while len(direct) < args.count and time.monotonic() < deadline:
            direct += await direct_block(nc, block, args.concurrency)
            gateway += await gateway_block(requester, block, args.concurrency)
            print(f"measured {len(direct)}/{args.count} requests per path", file=sys.stderr)
        cpu = group_cpu_s(gateway_pgid) - cpu_before
    finally:
        await ws.close()
        requester.reader.cancel()
        await session.close()
        await nc.close()
    us = 1e6
    result: dict[str, object] = {
        "responder": args.responder,
        "concurrency": args.concurrency,
        "count": len(direct),
    }
    for name, values in (("direct", direct), ("gateway", gateway)):
        result[f"{name}_p50_us"] = round(percentile(values, 0.50) * us, 1)
        result[f"{name}_p99_us"] = round(percentile(values, 0.99) * us, 1)
        result[f"{name}_mean_us"] = round(statistics.fmean(values) * us, 1)
    result["gateway_cpu_us_per_request"] = round(cpu / len(gateway) * us, 1)
    for q in (0.50, 0.99):
        extra = percentile(gateway, q) - percentile(direct, q)
        result[f"overhead_p{round(q * 100)}_us"] = round(extra * us, 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--count", type=int, default=3000, help="requests per path (max 100000)")
    parser.add_argument("--warmup", type=int, default=300, help="unmeasured requests per path")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight (max 100)")
    parser.add_argument(
        "--responder", choices=sorted(RESPONDERS), default="plain", help="the NATS service"
    )
    parser.add_argument("--max-seconds", type=float, default=60.0, help="stop measuring after")
    args = parser.parse_args()
    args.count = min(max(args.count, 10), 100_000)
    args.concurrency = min(max(args.concurrency, 1), 100)
    with EmbeddedNats() as server, tempfile.TemporaryDirectory(prefix="fanout-bench-") as tmp:
        responder = subprocess.Popen(
            [sys.executable, "-c", RESPONDERS[args.responder], server.url],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        port = free_port()
        gateway = start_gateway(server.url, port, Path(tmp) / "gateway.log")
        try:
            assert responder.stdout is not None
            if responder.stdout.readline().strip() != b"ready":
                raise RuntimeError("responder did not start")
            result = asyncio.run(measure(args, server.url, port, gateway.pid))
        finally:
            for proc in (gateway, responder):
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
