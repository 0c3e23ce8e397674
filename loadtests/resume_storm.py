#!/usr/bin/env python3
"""Reconnect storm with recovery (issue 15, targets): N clients on a 2-worker gateway,
kill -9 of one worker, every client resumes; zero loss, time to resume, gateway CPU.

Starts nats-server with JetStream (stream STORM on one subject, republished), a
gateway (``--workers``, recovery on), M client processes holding N resuming
clients (what fanout.js does: remember ``seq``/``epoch``, resume with ``since``
after any close) and a publisher at ``--rate``. After the warm-up it kills one
worker with SIGKILL and measures:

- resumed: the time from the kill until the last disconnected client got its
  ``recovered`` ack (``--plain``: its plain ack);
- loss: every client's sequences must be contiguous from its first to the last
  published (the stream holds one subject, so its sequences are 1, 2, 3, …);
- gateway CPU (user + sys of the supervisor's process tree, the replacement
  worker included) from the kill until all resumed, per reconnected client.

``--plain`` reconnects without ``since`` (today's reconnect) for the comparison::

    python loadtests/resume_storm.py --clients 5000 --workers 2
    python loadtests/resume_storm.py --clients 5000 --workers 2 --plain
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import resource
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import nats
import uvloop

from fanout.demo import create_stream
from fanout.embedded_nats import EmbeddedNats, free_port

SUBJECT = "xy.md.storm.tick"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def raise_nofile() -> None:
    """The soft file-descriptor limit up to the hard one (each client is a socket)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def tree_cpu_s(root: int) -> float:
    """User + sys seconds of ``root`` and its live descendants (children's stats included)."""
    total = 0.0
    pids = [root]
    while pids:
        pid = pids.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        pids.extend(int(c) for c in children)
    return total


class Client:
    __slots__ = ("closes", "epoch", "first", "last", "ok", "resumed_at", "seqs_ok")

    def __init__(self) -> None:
        self.first = 0
        self.last = 0
        self.epoch: str | None = None
        self.seqs_ok = True
        self.closes = 0
        self.resumed_at = 0.0
        self.ok = True

    async def run(
        self, session: aiohttp.ClientSession, url: str, plain: bool, stop: asyncio.Event
    ) -> None:
        while not stop.is_set():
            try:
                async with session.ws_connect(url, max_msg_size=0) as ws:
                    await self._serve(ws, plain, stop)
            except (aiohttp.ClientError, ConnectionError, TimeoutError):
                pass
            if not stop.is_set():
                self.closes += 1
                await asyncio.sleep(random.uniform(0.05, 0.5))

    async def _serve(
        self, ws: aiohttp.ClientWebSocketResponse, plain: bool, stop: asyncio.Event
    ) -> None:
        sub: dict[str, Any] = {"op": "sub", "id": 1, "subject": SUBJECT}
        resuming = bool(self.last and self.epoch and not plain)
        if resuming:
            sub["since"] = {"seq": self.last, "epoch": self.epoch}
        await ws.send_str(json.dumps(sub))
        while not stop.is_set():
            try:
                msg = await ws.receive(timeout=0.5)
            except TimeoutError:
                continue
            if msg.type != aiohttp.WSMsgType.TEXT:
                return
            data = json.loads(msg.data)
            for f in data if isinstance(data, list) else [data]:
                op = f.get("op")
                if op == "msg":
                    seq = f["seq"]
                    if self.last and seq != self.last + 1 and not plain:
                        self.seqs_ok = False
                    if not self.first:
                        self.first = seq
                    self.last = max(self.last, seq)
                elif op == "ack" and f.get("id") == 1:
                    self.epoch = f.get("epoch", self.epoch)
                    if self.closes:
                        self.resumed_at = time.monotonic()
                        if resuming and f.get("recovered") is not True:
                            self.ok = False


def client_main(url: str, count: int, plain: bool, pipe: Connection) -> None:
    raise_nofile()

    async def main() -> None:
        stop = asyncio.Event()
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        clients = [Client() for _ in range(count)]
        tasks = [asyncio.create_task(c.run(session, url, plain, stop)) for c in clients]
        loop = asyncio.get_running_loop()
        while True:
            cmd = await loop.run_in_executor(None, pipe.recv)
            if cmd == "report":
                pipe.send(
                    [(c.first, c.last, c.seqs_ok, c.closes, c.resumed_at, c.ok) for c in clients]
                )
            elif cmd == "stop":
                stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)
                await session.close()
                pipe.send("stopped")
                return

    uvloop.run(main())


def healthz(admin_port: int) -> dict[str, Any]:
    """The detailed /healthz (one row per worker) of the gateway's admin listener."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/healthz", timeout=5) as r:
        data: dict[str, Any] = json.loads(r.read())
    return data


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--clients", type=int, default=5000, help="resuming WebSocket clients")
    p.add_argument("--processes", type=int, default=4, help="client processes")
    p.add_argument("--workers", type=int, default=2, help="gateway workers (one is killed)")
    p.add_argument("--rate", type=float, default=2.0, help="messages/s on the subject")
    p.add_argument("--plain", action="store_true", help="reconnect without since (baseline)")
    p.add_argument("--timeout", type=float, default=60.0, help="give up waiting after this")
    args = p.parse_args(argv)
    raise_nofile()
    server = EmbeddedNats(jetstream=True)
    server.start()
    gw: subprocess.Popen[bytes] | None = None
    pipes: list[Connection] = []
    procs: list[mp.process.BaseProcess] = []
    try:

        async def setup() -> None:
            nc = await nats.connect(server.url)
            await create_stream(nc, "STORM", SUBJECT, "fanout.live")
            await nc.close()

        asyncio.run(setup())
        port, admin = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FANOUT_", "NATS_"))}
        env.update(
            NATS_URLS=server.url,
            FANOUT_SERVER_PORT=str(port),
            FANOUT_ADMIN_PORT=str(admin),
            FANOUT_SERVER_HOST="127.0.0.1",
            FANOUT_WS_AUTH_REQUIRED="false",
            FANOUT_HISTORY_STREAMS=f"{SUBJECT}=STORM",
            FANOUT_SERVER_MAX_CONNECTIONS=str(args.clients + 1000),
            FANOUT_SERVER_HANDSHAKE_RATE_PER_IP="0",
        )
        gw = subprocess.Popen(
            [sys.executable, "-m", "fanout.cli", "serve", "--workers", str(args.workers)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if len(healthz(admin)["workers"]) >= args.workers:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("gateway did not start")
            time.sleep(0.2)
        ctx = mp.get_context("fork")
        per = [
            args.clients // args.processes + (i < args.clients % args.processes)
            for i in range(args.processes)
        ]
        for count in per:
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=client_main, args=(f"ws://127.0.0.1:{port}/ws", count, args.plain, child)
            )
            proc.start()
            pipes.append(parent)
            procs.append(proc)

        async def publisher(stop: asyncio.Event) -> int:
            nc = await nats.connect(server.url)
            js = nc.jetstream()
            last = 0
            while not stop.is_set():
                last = (await js.publish(SUBJECT, b'{"t":%f}' % time.time())).seq
                await asyncio.sleep(1 / args.rate)
            await nc.close()
            return last

        def report() -> list[tuple[int, int, bool, int, float, bool]]:
            rows: list[tuple[int, int, bool, int, float, bool]] = []
            for pipe in pipes:
                pipe.send("report")
            for pipe in pipes:
                rows.extend(pipe.recv())
            return rows

        async def scenario() -> dict[str, Any]:
            stop = asyncio.Event()
            pub = asyncio.create_task(publisher(stop))
            started = time.monotonic()
            while not all(r[0] for r in report()):
                if time.monotonic() - started > args.timeout:
                    raise RuntimeError("clients did not all get a message")
                await asyncio.sleep(1)
            victim = healthz(admin)["workers"][0]
            cpu0 = tree_cpu_s(gw.pid)
            killed_at = time.monotonic()
            os.kill(victim["pid"], signal.SIGKILL)
            await asyncio.sleep(2)
            while True:
                rows = report()
                hit = [r for r in rows if r[3]]
                if hit and all(r[4] for r in hit):
                    break
                if time.monotonic() - killed_at > args.timeout:
                    break
                await asyncio.sleep(0.25)
            resumed_s = max((r[4] for r in hit), default=killed_at) - killed_at
            cpu = tree_cpu_s(gw.pid) - cpu0
            await asyncio.sleep(2)
            stop.set()
            last = await pub
            await asyncio.sleep(2)
            rows = report()
            return {
                "mode": "plain" if args.plain else "resume",
                "clients": args.clients,
                "workers": args.workers,
                "reconnected": len(hit),
                "resumed_s": round(resumed_s, 2),
                "all_resumed": all(r[4] for r in hit),
                "gateway_cpu_s": round(cpu, 2),
                "cpu_ms_per_reconnect": round(1000 * cpu / max(1, len(hit)), 3),
                "not_recovered": sum(1 for r in rows if not r[5]),
                "gaps": sum(1 for r in rows if not r[2]),
                "short_of_last": sum(1 for r in rows if r[1] != last),
                "last_published": last,
            }

        result = asyncio.run(scenario())
        print(json.dumps(result))
        return 0
    finally:
        for pipe in pipes:
            with contextlib.suppress(OSError):
                pipe.send("stop")
        for proc in procs:
            proc.join(20)
            if proc.is_alive():
                proc.kill()
        if gw is not None:
            os.killpg(gw.pid, signal.SIGTERM)
            try:
                gw.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(gw.pid, signal.SIGKILL)
        server.cleanup()


if __name__ == "__main__":
    sys.exit(main())
