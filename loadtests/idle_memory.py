#!/usr/bin/env python3
"""Idle memory per connection: K idle WebSockets on one gateway worker, RSS before and after.

Opens the connections in steps (one client process per step) and reads the
worker's ``/proc/<pid>/status`` after each: RSS, its anonymous part (the
Python heap and the transports) and its file part (shared code), plus the
kernel's TCP socket memory from ``/proc/net/sockstat`` (not in RSS). The
per-connection figure is the slope: ``(RSS at K − RSS at 0) / K``. No
tracemalloc in the worker, so the figure is what the operator pays::

    python loadtests/idle_memory.py --connections 10000
    python loadtests/idle_memory.py --connections 10000 --subscribe
    python loadtests/idle_memory.py --connections 10000 --server natsws

RLIMIT_NOFILE is raised to its hard limit in every process it starts (the
worker inherits it); everything runs on loopback and is stopped on exit.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import (
    CONNECTED,
    FAILED,
    SLOTS,
    ClientJob,
    Counters,
    Procs,
    raise_nofile,
    run_tool,
    say,
    spawn_client,
    start_servers,
    wait_until,
    workers_of,
)


def status_kib(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of ``pid`` in KiB."""
    out = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in out:
            out[name] = int(value.split()[0])
    return out


def tcp_mem_kib() -> int:
    """Kernel memory held by TCP sockets, machine-wide (``mem`` is in pages)."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1]) * 4
    return 0


def sample(pid: int, conns: int) -> dict[str, int]:
    return {"connections": conns, **status_kib(pid), "tcp_mem_kib": tcp_mem_kib()}


def run(args: argparse.Namespace, procs: Procs) -> dict[str, Any]:
    nofile = raise_nofile()
    if args.connections + 100 > nofile:
        raise RuntimeError(f"RLIMIT_NOFILE hard limit {nofile} is too low for the worker")
    url, token = start_servers(
        procs, args.server, 1, args.connections + 100, [], None, args.gateway_src
    )
    workers = workers_of(procs)
    if len(workers) != 1:
        raise RuntimeError(f"expected one worker, found {workers}")
    worker = workers[0]
    time.sleep(args.settle)
    rows = [sample(worker, 0)]
    counters: Counters = mp.Array("q", args.steps * SLOTS, lock=False)
    per_step = args.connections // args.steps
    opened = 0
    for step in range(args.steps):
        count = per_step if step < args.steps - 1 else args.connections - opened
        job = ClientJob(
            step,
            args.server,
            url,
            token,
            opened,
            count,
            args.subjects,
            read_buffer=2048,
            record_latency=False,
            subscribe=args.subscribe,
        )
        spawn_client(procs, job, counters)
        base = step * SLOTS

        def settled(base: int = base, count: int = count) -> bool:
            return bool(counters[base + CONNECTED] + counters[base + FAILED] >= count)

        if not wait_until(settled, 60 + count / 100) or counters[base + FAILED]:
            raise RuntimeError(
                f"step {step}: connected {counters[base + CONNECTED]}/{count}, "
                f"failed {counters[base + FAILED]}"
            )
        opened += count
        time.sleep(args.settle)
        rows.append(sample(worker, opened))
        say(f"step {step + 1}/{args.steps}: {opened} connections, RSS {rows[-1]['VmRSS']} KiB")
    first, last = rows[0], rows[-1]
    k: int = args.connections

    def per_conn(key: str) -> float:
        return round(float(last[key] - first[key]) / k, 2)

    return {
        "label": args.label,
        "server": args.server,
        "connections": k,
        "subscribed": args.subscribe,
        "rss_per_conn_kib": per_conn("VmRSS"),
        "anon_per_conn_kib": per_conn("RssAnon"),
        "file_per_conn_kib": per_conn("RssFile"),
        "kernel_tcp_per_conn_kib": per_conn("tcp_mem_kib"),
        "rss_idle_worker_mib": round(first["VmRSS"] / 1024, 1),
        "steps": rows,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{'connections':>12} {'RSS KiB':>10} {'anon KiB':>10} {'file KiB':>9} "
        f"{'TCP mem KiB':>12} {'Δ RSS/conn':>11}"
    ]
    prev = None
    for row in result["steps"]:
        slope = ""
        if prev is not None and row["connections"] > prev["connections"]:
            added = row["connections"] - prev["connections"]
            slope = f"{(row['VmRSS'] - prev['VmRSS']) / added:.2f}"
        lines.append(
            f"{row['connections']:>12} {row['VmRSS']:>10} {row['RssAnon']:>10} "
            f"{row['RssFile']:>9} {row['tcp_mem_kib']:>12} {slope:>11}"
        )
        prev = row
    lines.append(
        f"{result['server']}: {result['rss_per_conn_kib']} KiB RSS per idle connection "
        f"(anon {result['anon_per_conn_kib']}, kernel TCP "
        f"{result['kernel_tcp_per_conn_kib']}) at {result['connections']} connections"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--server", choices=["fanout", "natsws"], default="fanout", help="what to start")
    p.add_argument("--connections", type=int, default=10_000, help="idle WebSockets in all")
    p.add_argument("--steps", type=int, default=5, help="client processes, one per step")
    p.add_argument("--subscribe", action="store_true", help="each connection subscribes once")
    p.add_argument("--subjects", type=int, default=100, help="distinct subjects (--subscribe)")
    p.add_argument("--settle", type=float, default=1.5, help="seconds before each reading")
    p.add_argument("--gateway-src", metavar="DIR", help="run the gateway from this source tree")
    p.add_argument("--label", default="", help="a name for this run in the JSON line")
    args = p.parse_args(argv)
    if not 1 <= args.steps <= 50 or args.connections < args.steps:
        p.error("need 1 <= steps <= 50 and connections >= steps")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_tool("idle_memory", parse_args(argv), run, table)


if __name__ == "__main__":
    sys.exit(main())
