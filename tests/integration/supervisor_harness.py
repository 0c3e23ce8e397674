"""Runs the real Supervisor with a tiny worker of its own, for test_supervisor.py.

The tiny worker does what the supervisor relies on and nothing else: it binds
its own SO_REUSEPORT listener (answering each connection with "<pid> <index>"),
writes its state file from an asyncio loop every heartbeat interval, and
honours SIGTERM / SIGUSR1 (leave), SIGQUIT (exit at once). SIGUSR2 blocks its
loop (the stuck-worker case). HARNESS_MODE picks a misbehaviour:
``bootfail`` (write a boot error, exit 3) or ``slowdrain`` (ignore the leave
signals' deadline and keep heartbeating for a minute), ``abortproof`` (ignore
SIGABRT, so a stuck worker needs SIGKILL) or ``crash`` (worker 2 exits 1 right
after it starts listening: a crash loop).

Usage: python supervisor_harness.py CONFIG STATE_DIR OUT_DIR
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import sys
import time
from pathlib import Path

from setproctitle import setproctitle

from fanout import logs, runtime
from fanout.embedded_nats import LocalNats
from fanout.settings import Settings, load
from fanout.supervisor import WORKER_BOOT_ERROR, Supervisor

MODE = os.environ.get("HARNESS_MODE", "ok")


def tiny_worker(settings: Settings, index: int, state_dir: Path) -> int:
    setproctitle(f"fanout worker {index}")
    if MODE == "abortproof":
        signal.signal(signal.SIGABRT, signal.SIG_IGN)
    if MODE == "bootfail":
        runtime.write_boot_error(state_dir, f"port {settings.server.port} is in use (harness)")
        return WORKER_BOOT_ERROR
    return asyncio.run(_serve(settings, index, state_dir))


async def _serve(settings: Settings, index: int, state_dir: Path) -> int:
    loop = asyncio.get_running_loop()
    now = time.time()
    state = runtime.WorkerState(
        pid=os.getpid(),
        index=index,
        started_at=now,
        heartbeat_at=now,
        listening=False,
        draining=False,
        clients=0,
        subscriptions=0,
        nats_connected=False,
        nats_url=settings.nats.urls[0],
        last_error_code=None,
        loop_lag_s=0.0,
        generation=int(os.environ["FANOUT_GENERATION"]),
    )
    runtime.write_state(state_dir, state)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"{os.getpid()} {index}\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(
        answer, settings.server.host, settings.server.port, reuse_port=True
    )
    state.listening = True
    leave = asyncio.Event()

    def on_leave() -> None:
        server.close()
        state.listening, state.draining = False, True
        runtime.write_state(state_dir, state)
        leave.set()

    loop.add_signal_handler(signal.SIGTERM, on_leave)
    loop.add_signal_handler(signal.SIGUSR1, on_leave)
    loop.add_signal_handler(signal.SIGQUIT, os._exit, 0)
    loop.add_signal_handler(signal.SIGUSR2, time.sleep, 60)
    interval = settings.server.heartbeat_interval_s
    if MODE == "crash" and index == 2:
        runtime.write_state(state_dir, state)
        await asyncio.sleep(interval)  # waits on: a short life before the crash, the case
        return 1
    for _ in range(100_000):
        state.heartbeat_at = time.time()
        runtime.write_state(state_dir, state)
        if leave.is_set():
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(leave.wait(), interval)
    for _ in range(600 if MODE == "slowdrain" else 0):
        state.heartbeat_at = time.time()
        runtime.write_state(state_dir, state)
        await asyncio.sleep(interval)  # waits on: heartbeats of a worker slow to drain
    await server.wait_closed()
    return 0


def ticker(settings: Settings) -> int:
    """The side process: records its pid and the NATS url it was given, then idles."""
    out = Path(os.environ["HARNESS_OUT"])
    (out / f"ticker-{os.getpid()}").write_text(settings.nats.urls[0])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    for _ in range(600):
        time.sleep(0.1)  # waits on: a side process idles until it is stopped
    return 0


def main() -> int:
    config, state_dir, out = sys.argv[1:4]
    os.environ["HARNESS_OUT"] = out
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    settings = load(config)
    logs.setup(settings.log.level, fmt=settings.log.format)
    supervisor = Supervisor(
        settings,
        worker_target=tiny_worker,
        state_dir=Path(state_dir),
        config_path=config,
        extra_children=[("ticker", ticker)],
        sidecar=LocalNats(),
    )
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
