"""The real Supervisor in a subprocess, with real forks, real signals and real sockets.

The workers are supervisor_harness.py's tiny worker, which behaves like the
real one where the supervisor cares (SO_REUSEPORT listener, heartbeats through
fanout.runtime, SIGTERM/SIGUSR1/SIGQUIT), and an embedded nats-server is
started because no NATS url is configured.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from fanout import runtime
from fanout.embedded_nats import free_port
from tests.helpers import wait_for

HARNESS = Path(__file__).with_name("supervisor_harness.py")
REASONS = {"boot_error": 0, "crash": 0, "exit": 0, "signal": 0, "timeout": 0}

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="needs /proc and SO_REUSEPORT"),
    pytest.mark.slow,
]


def write_config(path: Path, port: int, workers: int, **server: float) -> None:
    values = {"worker_timeout_s": 1.0, "heartbeat_interval_s": 0.1, "graceful_timeout_s": 2.0}
    values.update(server)
    lines = ["[server]", 'host = "127.0.0.1"', f"port = {port}", f"workers = {workers}"]
    lines += [f"{key} = {value}" for key, value in values.items()]
    lines += ["[ws]", "auth_required = false"]
    # the tiny worker serves no admin port; 0 also spares the supervisor its admin lock
    lines += ["[admin]", "port = 0"]
    path.write_text("\n".join(lines) + "\n")


def proc_stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, session id, state letter) of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[3]), fields[0]


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def live_pids() -> Iterator[tuple[int, tuple[int, int, str]]]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat_ := proc_stat(int(entry.name))) and stat_[2] != "Z":
            yield int(entry.name), stat_


def listen_sockets(port: int) -> int:
    """How many sockets listen on ``port`` right now (one per SO_REUSEPORT worker)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
            count += 1
    return count


def who_answers(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
        return int(conn.makefile().readline().split()[0])


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    port: int
    workers: int
    config: Path
    state_dir: Path
    out: Path
    log: Path

    def listening(self) -> list[runtime.WorkerState]:
        return [s for s in runtime.read_states(self.state_dir) if s.listening]

    def by_index(self) -> dict[int, runtime.WorkerState]:
        return {s.index: s for s in self.listening()}

    def supervisor(self) -> runtime.SupervisorState:
        state = runtime.read_supervisor_state(self.state_dir)
        assert state is not None
        return state

    def send(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait_listening(self, count: int, timeout: float = 20.0) -> list[runtime.WorkerState]:
        return wait_for(
            lambda: states if len(states := self.listening()) == count else None,
            timeout,
            f"{count} listening workers",
        )

    def log_lines(self) -> list[dict[str, Any]]:
        lines = self.log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def exits(self, pid: int) -> list[dict[str, Any]]:
        return [e for e in self.log_lines() if e["msg"].endswith(" exited") and e["pid"] == pid]

    def family(self) -> set[int]:
        """Live processes of this gateway: its session (supervisor, workers, side process)
        and the embedded nats-server (its own session), found by the port in the log."""
        urls = [e["url"] for e in self.log_lines() if e["msg"] == "embedded nats-server started"]
        nats_args = [f"-p {url.rsplit(':', 1)[1]}" for url in urls]
        return {
            pid
            for pid, (_, sid, _) in live_pids()
            if sid == self.proc.pid
            or ("nats-server" in (line := cmdline(pid)) and any(a in line for a in nats_args))
        }

    def tickers(self) -> dict[int, str]:
        files = self.out.glob("ticker-*")
        return {int(f.name.split("-")[1]): f.read_text() for f in files}


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def start_gateway(
        workers: int = 2, mode: str = "ok", wait: bool = True, **server: float
    ) -> Gateway:
        port = free_port()
        base = tmp_path / f"gw{len(started)}"
        base.mkdir()
        config, out, log = base / "fanout.toml", base / "out", base / "supervisor.log"
        out.mkdir()
        write_config(config, port, workers, **server)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("FANOUT_", "NATS_", "JWT_", "WS_"))
        }
        env["HARNESS_MODE"] = mode
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                [sys.executable, str(HARNESS), str(config), str(base / "state"), str(out)],
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        gateway = Gateway(proc, port, workers, config, base / "state", out, log)
        started.append(gateway)
        if wait:
            gateway.wait_listening(workers)
            wait_for(gateway.tickers, 10, "the side process")
        return gateway

    yield start_gateway
    for gateway in started:
        leftovers = gateway.family()
        if gateway.proc.poll() is None:
            gateway.proc.kill()
            gateway.proc.wait(10)
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue


def test_workers_share_the_port_and_name_their_processes(start: Callable[..., Gateway]) -> None:
    gw = start(workers=2)
    states = gw.listening()
    assert sorted(s.index for s in states) == [1, 2]
    assert {s.generation for s in states} == {0}
    nats_url = states[0].nats_url
    assert nats_url is not None and nats_url.startswith("nats://127.0.0.1:")
    assert {s.nats_url for s in states} == {nats_url}
    pids = {s.pid for s in states}
    answered: set[int] = set()
    for _ in range(64):
        answered.add(who_answers(gw.port))
        if answered == pids:
            break
    assert answered == pids
    assert cmdline(gw.proc.pid) == f"fanout supervisor :{gw.port}"
    for state in states:
        assert cmdline(state.pid) == f"fanout worker {state.index}"
        assert proc_stat(state.pid)[:2] == (gw.proc.pid, gw.proc.pid)  # type: ignore[index]
    [(ticker_pid, ticker_url)] = gw.tickers().items()
    assert ticker_url == nats_url
    assert cmdline(ticker_pid) == "fanout ticker"
    host, port = nats_url.removeprefix("nats://").split(":")
    with socket.create_connection((host, int(port)), timeout=2) as conn:
        assert conn.makefile("rb").readline().startswith(b"INFO {")
    assert (os.stat(gw.state_dir).st_mode & 0o777) == 0o700
    sup = gw.supervisor()
    assert (sup.pid, sup.workers_wanted, sup.generation, sup.restarts) == (
        gw.proc.pid,
        2,
        0,
        REASONS,
    )


def test_sigterm_stops_everything_and_leaves_no_orphans(start: Callable[..., Gateway]) -> None:
    gw = start(workers=2)
    workers = {s.pid for s in gw.listening()}
    family = gw.family()
    assert len(family) == 5  # supervisor, two workers, the side process, nats-server
    assert {proc_stat(pid)[0] for pid in family} == {os.getpid(), gw.proc.pid}  # type: ignore[index]
    gw.send(signal.SIGTERM)
    assert gw.proc.wait(5) == 0
    assert [pid for pid in family if proc_stat(pid) is not None] == []
    assert not gw.state_dir.exists()
    for pid in workers:
        [line] = gw.exits(pid)
        assert (line["reason"], line["exit_code"]) == ("shutdown", 0)


def test_killed_worker_is_replaced(start: Callable[..., Gateway]) -> None:
    gw = start(workers=2)
    old = gw.by_index()[1]
    os.kill(old.pid, signal.SIGKILL)
    new = wait_for(
        lambda: s if (s := gw.by_index().get(1)) and s.pid != old.pid else None,
        10.0,
        "a new worker 1",
    )
    assert new.index == 1 and gw.by_index()[2].pid != old.pid
    assert gw.supervisor().restarts == {**REASONS, "signal": 1}
    [line] = gw.exits(old.pid)
    assert (line["worker"], line["reason"], line["signal"]) == (1, "signal", "SIGKILL")
    assert line["level"] == "warning"
    [old_ticker] = gw.tickers()
    os.kill(old_ticker, signal.SIGKILL)
    wait_for(lambda: set(gw.tickers()) - {old_ticker}, 10.0, "a new side process")
    assert gw.supervisor().restarts == {**REASONS, "signal": 1}


@pytest.mark.parametrize(("mode", "signal_name"), [("ok", "SIGABRT"), ("abortproof", "SIGKILL")])
def test_worker_with_a_blocked_loop_is_killed_and_replaced(
    start: Callable[..., Gateway], mode: str, signal_name: str
) -> None:
    gw = start(workers=2, mode=mode, worker_timeout_s=1.0)
    stuck = gw.by_index()[2]
    os.kill(stuck.pid, signal.SIGUSR2)
    wait_for(
        lambda: (s := gw.by_index().get(2)) and s.pid != stuck.pid,
        20.0,
        "worker 2 replaced",
    )
    # 1 s without a heartbeat, then SIGABRT; SIGKILL 2 s later when SIGABRT is ignored
    assert gw.supervisor().restarts == {**REASONS, "timeout": 1}
    [line] = gw.exits(stuck.pid)
    assert (line["worker"], line["reason"], line["signal"]) == (2, "timeout", signal_name)
    assert gw.by_index()[1].pid != stuck.pid and len(gw.listening()) == 2


def test_crash_loop_backs_off_exponentially(start: Callable[..., Gateway]) -> None:
    gw = start(workers=2, mode="crash", wait=False)

    def starts() -> list[float]:
        return [
            datetime.fromisoformat(e["time"]).timestamp()
            for e in gw.log_lines()
            if e["msg"] == "worker started" and e["worker"] == 2
        ]

    times = wait_for(lambda: t if len(t := starts()) >= 6 else None, 30.0, "six starts of worker 2")
    gaps = [b - a for a, b in itertools.pairwise(times)][:5]
    # each gap: the crashed worker's short life plus a delay of 0.1, 0.2, 0.4, 0.8, 1.6 s
    # (a slow machine only lengthens the gaps: the doubling delay is the lower bound)
    for k, gap in enumerate(gaps):
        assert gap >= 0.1 * 2**k, gaps
    assert gw.supervisor().restarts["crash"] >= 5
    assert [s.index for s in gw.listening()] in ([1], [1, 2])


def test_workers_that_cannot_boot_stop_the_supervisor_with_exit_2(
    start: Callable[..., Gateway],
) -> None:
    gw = start(workers=2, mode="bootfail", wait=False)
    assert gw.proc.wait(10) == 2
    plain = [ln for ln in gw.log.read_text().splitlines() if not ln.startswith("{")]
    assert plain == [f"fanout: workers cannot boot: port {gw.port} is in use (harness)"]
    boot_errors = [e for e in gw.log_lines() if e.get("reason") == "boot_error"]
    assert len(boot_errors) == 2
    assert {e["exit_code"] for e in boot_errors} == {3}
    assert gw.family() == set()


def test_sighup_rolls_one_worker_at_a_time_keeping_all_listening(
    start: Callable[..., Gateway],
) -> None:
    gw = start(workers=2)
    old = {s.index: s.pid for s in gw.listening()}
    write_config(gw.config, gw.port, 2, graceful_timeout_s=2.5)
    gw.send(signal.SIGHUP)

    def rolled() -> bool:
        """Checked on every poll: all along two sockets listen and one new worker boots."""
        states = runtime.read_states(gw.state_dir)
        assert listen_sockets(gw.port) >= 2
        assert len([s for s in states if s.generation == 1 and not s.listening]) <= 1
        current = [s for s in states if s.generation == 1 and s.listening]
        return len(current) == 2 and not {s.pid for s in states} & set(old.values())

    wait_for(rolled, 30.0, "the rolling restart")
    new = {s.index: s.pid for s in gw.listening()}
    assert sorted(new) == [1, 2] and not set(new.values()) & set(old.values())
    assert gw.supervisor().generation == 1
    assert gw.supervisor().restarts == REASONS
    wait_for(lambda: all(gw.exits(pid) for pid in old.values()), 10.0, "the old workers' exits")
    events = [(e["msg"], e["pid"]) for e in gw.log_lines() if "pid" in e]
    for index, pid in old.items():
        [line] = gw.exits(pid)
        assert (line["reason"], line["exit_code"]) == ("reload", 0)
        # an old worker is told to leave only once its successor listens
        assert events.index(("worker listening", new[index])) < events.index(("worker exited", pid))
    # one at a time: worker 2's successor is forked only once worker 1's listens
    assert events.index(("worker listening", new[1])) < events.index(("worker started", new[2]))


def test_reload_naming_a_missing_file_is_refused_before_any_fork(
    start: Callable[..., Gateway], tmp_path: Path
) -> None:
    gw = start(workers=1)
    old = {s.index: s.pid for s in gw.listening()}
    missing = tmp_path / "gone" / "denylist.txt"
    with gw.config.open("a") as config:
        config.write(f'[jwt]\ndenylist_path = "{missing}"\n')
    gw.send(signal.SIGHUP)
    refused = wait_for(
        lambda: [e["msg"] for e in gw.log_lines() if e["msg"].startswith("reload refused")],
        3.0,
        "the refused reload",
    )
    assert refused == [
        "reload refused, keeping the old settings: invalid config: jwt.denylist_path:"
        f" cannot read {missing}: No such file or directory (from {gw.config})"
    ]
    assert {s.index: s.pid for s in gw.listening()} == old
    assert gw.supervisor().generation == 0


def test_bad_reload_keeps_the_old_workers(start: Callable[..., Gateway]) -> None:
    gw = start(workers=2)
    old = {s.index: s.pid for s in gw.listening()}
    gw.config.write_text("[server\nport = 1\n")
    gw.send(signal.SIGHUP)
    wait_for(
        lambda: [e for e in gw.log_lines() if e["msg"].startswith("reload refused")],
        10.0,
        "the refused reload",
    )
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    with blocker:
        write_config(gw.config, blocker.getsockname()[1], 2)
        gw.send(signal.SIGHUP)
        wait_for(
            lambda: [e for e in gw.log_lines() if e["msg"].startswith("rolling restart aborted")],
            10.0,
            "the aborted roll",
        )
    assert {s.index: s.pid for s in gw.listening()} == old
    assert gw.supervisor().generation == 0
    assert gw.supervisor().restarts == {**REASONS, "crash": 1}
    assert cmdline(gw.proc.pid) == f"fanout supervisor :{gw.port}"
    os.kill(old[1], signal.SIGKILL)
    replaced = wait_for(
        lambda: s if (s := gw.by_index().get(1)) and s.pid != old[1] else None,
        10.0,
        "worker 1 on the old settings",
    )
    assert replaced.generation == 0
    assert listen_sockets(gw.port) == 2


def test_ttin_and_ttou_change_the_worker_count(start: Callable[..., Gateway]) -> None:
    gw = start(workers=2)
    gw.send(signal.SIGTTIN)
    states = gw.wait_listening(3)
    assert sorted(s.index for s in states) == [1, 2, 3]
    assert gw.supervisor().workers_wanted == 3
    newest = max(states, key=lambda s: s.started_at)
    gw.send(signal.SIGTTOU)
    gw.wait_listening(2)
    wait_for(lambda: gw.exits(newest.pid), 10.0, "the newest worker's exit")
    [line] = gw.exits(newest.pid)
    assert (line["reason"], line["exit_code"]) == ("scale_down", 0)
    gw.send(signal.SIGTTOU)
    [last] = gw.wait_listening(1)
    assert gw.supervisor().workers_wanted == 1
    # a TTOU at one worker is ignored: the TTIN handled after it makes two, not one
    gw.send(signal.SIGTTOU)
    wait_for(
        lambda: len([e for e in gw.log_lines() if e["msg"] == "signal SIGTTOU"]) == 3,
        10.0,
        "the third SIGTTOU received",
    )
    gw.send(signal.SIGTTIN)
    assert last.pid in {s.pid for s in gw.wait_listening(2)}
    assert gw.exits(last.pid) == []
    assert gw.supervisor().workers_wanted == 2
    assert gw.supervisor().restarts == REASONS


def test_second_ctrl_c_stops_at_once(start: Callable[..., Gateway]) -> None:
    gw = start(workers=2, mode="slowdrain", graceful_timeout_s=20.0)
    family = gw.family()
    os.killpg(gw.proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole process group
    states = wait_for(
        lambda: (
            s if (s := runtime.read_states(gw.state_dir)) and all(x.draining for x in s) else None
        ),
        10.0,
        "both workers draining",
    )
    assert gw.proc.poll() is None
    assert len(states) == 2
    os.killpg(gw.proc.pid, signal.SIGINT)
    # the drain would take 20 s (graceful_timeout_s): exiting well before shows the quick stop
    assert gw.proc.wait(10) == 0
    assert [pid for pid in family if proc_stat(pid) is not None] == []


def test_graceful_stop_is_bounded(start: Callable[..., Gateway]) -> None:
    gw = start(workers=2, mode="slowdrain", graceful_timeout_s=1.0)
    workers = {s.pid for s in gw.listening()}
    gw.send(signal.SIGTERM)
    assert gw.proc.wait(20) == 0
    for pid in workers:
        [line] = gw.exits(pid)
        assert (line["reason"], line["signal"]) == ("shutdown", "SIGKILL")
    assert gw.family() == set()
