#!/usr/bin/env python3
"""Loop hold: the longest single event-loop callback while subscriptions churn, in process.

A worker's hub, gateway and real :class:`~fanout.worker.nats_link.NatsLink` are
built in this process (``tests/inproc.py``: clients on fake transports, the
worker's ``gc.freeze()`` after boot) against a real nats-server. Every callback
the event loop runs (pure-Python asyncio, not uvloop: each ready handle, task
steps included) is timed around ``asyncio.Handle._run``; nothing else is
instrumented. Each frame is fed in a callback of its own, as a socket read
would be, and encoded beforehand; decoding the replies is the harness's time
and is not counted, nor are the harness task's own steps. Per scenario: the
longest callback and p99 over callbacks, in CPU time of the thread (what the
worker's code costs; wall time on a shared machine adds whatever other
processes took meanwhile, reported too), and the collector's share of the
longest one, and the longest callback with no collection in it:

1. ``sub_1000``: one client, one frame of 1000 ``sub`` ops (``sub_churn.py``'s
   patterns, overlapping wildcards included);
2. ``unsub_1000``: the same client, one frame of the 1000 ``unsub`` ops;
3. ``churn_3x1000``: 3 clients each subscribing 1000 patterns in one frame and
   unsubscribing them in one frame, all three at once, ``--rounds`` times
   (``sub_churn.py`` phase 2).

Run from the tree to measure (``sub_churn.py`` runs it after its own phases)::

    PYTHONPATH=$PWD python loadtests/loop_hold.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sub_churn import patterns

from fanout.embedded_nats import EmbeddedNats
from tests.inproc import Client, InProc, make_settings
from tests.security.hostile import text

Run = Callable[[asyncio.Handle], None]


def task_label(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    return f"task {getattr(coro, '__qualname__', repr(coro))}"


def what(handle: asyncio.Handle) -> str:
    """The callback's name, or the coroutine a task step ran."""
    callback = handle._callback  # type: ignore[attr-defined]
    for ref in (callback, getattr(callback, "__self__", None), *gc.get_referents(callback)):
        if isinstance(ref, asyncio.Task):
            return task_label(ref)
    return repr(handle)[:100]


def stats(values: list[float]) -> tuple[float, float]:
    """(max, p99) in ms."""
    if not values:
        return 0.0, 0.0
    ms = sorted(v * 1000.0 for v in values)
    return round(ms[-1], 2), round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3)


class Probe:
    """Times every ``Handle._run`` (each callback, each task step) while a phase records."""

    def __init__(self) -> None:
        self.recording = False
        #: Per callback: (CPU s, wall s, collector's wall s, what it was).
        self.holds: list[tuple[float, float, float, str]] = []
        #: The harness's own time inside the current callback (reading replies).
        self.harness = 0.0
        self.harness_task = ""
        self._gc = 0.0
        self._gc_start = 0.0

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self._gc += time.perf_counter() - self._gc_start

    def timed(self, run: Run) -> Run:
        def timed_run(handle: asyncio.Handle) -> None:
            if not self.recording:
                run(handle)
                return
            self.harness = self._gc = 0.0
            t0, c0 = time.perf_counter(), time.thread_time()
            run(handle)
            cpu = time.thread_time() - c0 - self.harness
            wall = time.perf_counter() - t0 - self.harness
            label = what(handle)
            if label != self.harness_task:
                self.holds.append((cpu, wall, self._gc, label))

        return timed_run

    @contextmanager
    def installed(self) -> Iterator[None]:
        run: Run = asyncio.Handle._run
        setattr(asyncio.Handle, "_run", self.timed(run))  # noqa: B010 (a method of the stdlib)
        gc.callbacks.append(self.on_gc)
        try:
            yield
        finally:
            gc.callbacks.remove(self.on_gc)
            setattr(asyncio.Handle, "_run", run)  # noqa: B010

    @contextmanager
    def phase(self, name: str, out: dict[str, Any]) -> Iterator[None]:
        self.holds = []
        self.recording = True
        try:
            yield
        finally:
            self.recording = False
            cpu_max, cpu_p99 = stats([h[0] for h in self.holds])
            wall_max, wall_p99 = stats([h[1] for h in self.holds])
            no_gc_max, _ = stats([h[0] for h in self.holds if not h[2]])
            longest = max(self.holds, default=(0.0, 0.0, 0.0, "-"))
            out[name] = {
                "callbacks": len(self.holds),
                "cpu_max_ms": cpu_max,
                "cpu_p99_ms": cpu_p99,
                "wall_max_ms": wall_max,
                "wall_p99_ms": wall_p99,
                "cpu_max_no_gc_ms": no_gc_max,
                "over_5ms_cpu": sum(1 for h in self.holds if h[0] > 0.005),
                "longest": longest[3],
                "longest_gc_ms": round(longest[2] * 1000.0, 2),
            }


async def replies(probe: Probe, client: Client, last_id: int, timeout_s: float = 60.0) -> None:
    """Wait (bounded) for the reply to op ``last_id``; an error reply ends the run."""
    deadline = time.monotonic() + timeout_s
    while True:
        t0 = time.perf_counter()
        frames = client.received()
        probe.harness += time.perf_counter() - t0
        for frame in frames:
            if frame.get("op") == "error":
                raise RuntimeError(f"error reply: {frame}")
            if frame.get("id") == last_id:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no reply to op {last_id}")
        await asyncio.sleep(0.001)


def frame(kind: str, subjects: Sequence[str]) -> bytes:
    """One masked text frame of ``kind`` ops with ids 1.., encoded before it is measured."""
    data: bytes = text([{"op": kind, "id": 1 + i, "subject": s} for i, s in enumerate(subjects)])
    return data


async def scenario(url: str, rounds: int, probe: Probe) -> dict[str, Any]:
    w = InProc(
        make_settings(
            **{
                "ws.auth_required": False,
                "ws.allow_full_wildcard": True,
                "ws.inbound_rate": 1_000_000,
                "ws.inbound_burst": 100_000,
                "nats.urls": [url],
            }
        )
    )
    out: dict[str, Any] = {}
    await w.start_nats()
    gc.freeze()  # as the worker does once booted
    this = asyncio.current_task()
    assert this is not None
    probe.harness_task = task_label(this)
    loop = asyncio.get_running_loop()
    try:
        one = await w.connect()
        one.received()
        pats = patterns("xy.md.churn.solo")
        sub, unsub = frame("sub", pats), frame("unsub", pats)
        one.send_raw(sub)  # warm-up round
        await replies(probe, one, len(pats))
        one.send_raw(unsub)
        await replies(probe, one, len(pats))
        with probe.phase("sub_1000", out):
            loop.call_soon(one.send_raw, sub)
            await replies(probe, one, len(pats))
        with probe.phase("unsub_1000", out):
            loop.call_soon(one.send_raw, unsub)
            await replies(probe, one, len(pats))
        churners = [await w.connect() for _ in range(3)]
        for c in churners:
            c.received()
        mine = [patterns(f"xy.md.churn.c{c}") for c in range(3)]
        frames = {kind: [frame(kind, m) for m in mine] for kind in ("sub", "unsub")}
        with probe.phase("churn_3x1000", out):
            for _ in range(rounds):
                for kind in ("sub", "unsub"):
                    for client, data in zip(churners, frames[kind], strict=True):
                        loop.call_soon(client.send_raw, data)  # a callback each, as a read
                    for client in churners:
                        await replies(probe, client, len(pats))
    finally:
        await w.stop()
    return out


def table(result: dict[str, Any]) -> str:
    lines = []
    for name in ("sub_1000", "unsub_1000", "churn_3x1000"):
        r = result[name]
        lines.append(
            f"{name:<13} CPU max {r['cpu_max_ms']:>6} ms  p99 {r['cpu_p99_ms']:>6} ms  "
            f"max without a collection {r['cpu_max_no_gc_ms']:>6} ms  "
            f"wall max {r['wall_max_ms']:>6} ms  >5 ms: {r['over_5ms_cpu']:>2}  "
            f"callbacks {r['callbacks']:>5}  longest: {r['longest']} (gc {r['longest_gc_ms']} ms)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=5, help="sub + unsub rounds of the 3 churners")
    p.add_argument("--nats-url", help="a running nats-server (default: start one)")
    p.add_argument("--label", default="")
    args = p.parse_args(argv)
    if not 1 <= args.rounds <= 100:
        p.error("rounds must be 1..100")
    probe = Probe()
    with contextlib.ExitStack() as stack:
        url = args.nats_url or stack.enter_context(EmbeddedNats()).url
        stack.enter_context(probe.installed())
        result = asyncio.run(scenario(url, args.rounds, probe))
    print(json.dumps({"label": args.label, "rounds": args.rounds, **result}), flush=True)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
