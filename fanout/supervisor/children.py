"""The supervisor's child processes: fork, reset in the child, kill, reap, bury.

A child starts with the supervisor's signals blocked across ``fork`` (no
handler of the parent runs in the child), then resets them to the defaults,
ignores SIGINT/SIGHUP (Ctrl-C reaches the whole process group; a reload is the
supervisor's), and asks Linux for SIGTERM when the supervisor dies, even by
SIGKILL (``PR_SET_PDEATHSIG``): no orphans. Its body's return value is its exit code.

A :class:`Sidecar` is the other kind: a process children depend on that the
supervisor does not fork (the embedded nats-server, handed in by ``fanout serve``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from setproctitle import setproctitle

from fanout import runtime
from fanout.settings import Settings
from fanout.supervisor.policy import ExitCause, Heartbeat, Verdict
from fanout.supervisor.signals import HANDLED, SignalQueue

log = logging.getLogger("fanout.supervisor")

_PR_SET_PDEATHSIG = 1

WorkerTarget = Callable[[Settings, int, Path], int]
ExtraTarget = Callable[[Settings], int]


class Sidecar(Protocol):
    """A process the children depend on that the supervisor does not fork (the embedded NATS).

    The supervisor asks it for the settings children get (at start and on
    every reload), checks it every tick and stops it last. An
    :class:`~fanout.errors.OperatorError` from the first two stops the gateway
    (exit 2) or refuses the reload; its message says why.
    """

    def settings_for_children(self, settings: Settings) -> Settings: ...
    def check(self) -> None: ...
    def stop(self) -> None: ...


class NoSidecar:
    """No sidecar: children get the settings as they are."""

    def settings_for_children(self, settings: Settings) -> Settings:
        return settings

    def check(self) -> None:
        return None

    def stop(self) -> None:
        return None


@dataclass(slots=True)
class Child:
    """A live child as the supervisor tracks it."""

    pid: int
    name: str  # "worker" or the side process's name
    index: int  # 1..N for workers, 0 for side processes
    generation: int
    started: float  # monotonic
    beat: Heartbeat
    ready: bool = False
    leaving: str | None = None  # why we asked it to go; its exit is then planned
    kill_reason: str | None = None  # "timeout" once its heartbeat stopped


@dataclass(frozen=True, slots=True)
class Forker:
    """Starts the supervisor's children: workers running ``target``, and side processes."""

    target: WorkerTarget
    state_dir: Path
    signals: SignalQueue

    def worker(self, settings: Settings, index: int, generation: int) -> Child | None:
        """Fork worker ``index`` of ``generation``; None if fork failed.

        Its heartbeat starts worker_timeout_s in the future: the boot grace.
        """
        target, state_dir = self.target, self.state_dir

        def body() -> int:
            os.environ["FANOUT_GENERATION"] = str(generation)
            return target(settings, index, state_dir)

        pid = fork(body, None, self.signals)
        if pid is None:
            return None
        now = time.monotonic()
        beat = Heartbeat(seen=now + settings.server.worker_timeout_s)
        extra = {"pid": pid, "worker": index, "fields": {"generation": generation}}
        log.info("worker started", extra=extra)
        return Child(pid, "worker", index, generation, now, beat)

    def side(
        self, name: str, target: ExtraTarget, settings: Settings, generation: int
    ) -> Child | None:
        """Fork the side process ``name`` (titled ``fanout <name>``); None if fork failed."""
        pid = fork(lambda: target(settings), f"fanout {name}", self.signals)
        if pid is None:
            return None
        now = time.monotonic()
        log.info("side process started", extra={"pid": pid, "fields": {"child": name}})
        return Child(pid, name, 0, generation, now, Heartbeat(now))


def fork(body: Callable[[], int], title: str | None, signals: SignalQueue) -> int | None:
    """Fork a child that runs ``body`` and exits with its result; None if fork failed."""
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    try:
        pid = os.fork()
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        log.error("fork failed: %s", exc)
        return None
    if pid:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        return pid
    code = 1
    try:
        _reset_child(parent, old_mask, signals)
        if title:
            setproctitle(title)
        code = body()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        log.exception("child process failed", extra={"pid": os.getpid()})
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _reset_child(parent: int, mask: Iterable[int], signals: SignalQueue) -> None:
    """In a fresh child: default signal handlers, no self-pipe; INT/HUP are the supervisor's."""
    signal.set_wakeup_fd(-1)
    signals.close_pipe()
    for sig in HANDLED:
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _die_with_parent(parent)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _die_with_parent(parent: int) -> None:
    """Have Linux SIGTERM this child when the supervisor dies, even by SIGKILL: no orphans."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:
        os._exit(0)


def leave(child: Child, why: str, sig: int) -> None:
    """Ask ``child`` to go: its exit is then planned (logged, not counted, not replaced)."""
    child.leaving = child.leaving or why
    kill(child.pid, sig)


def murder(child: Child, verdict: Verdict, now: float) -> None:
    """Carry out a heartbeat verdict: SIGABRT a stuck worker (a traceback), SIGKILL it if that
    did not do."""
    if verdict is Verdict.ABORT:
        extra = {"pid": child.pid, "worker": child.index, "reason": "timeout"}
        log.error("worker heartbeat stopped; killing it", extra=extra)
        child.kill_reason, child.beat.aborted_at = "timeout", now
        kill(child.pid, signal.SIGABRT)
    elif verdict is Verdict.KILL:
        child.beat.killed = True
        kill(child.pid, signal.SIGKILL)


def kill(pid: int, sig: int) -> None:
    """Send ``sig``; a child that is already gone is not an error (it is reaped next)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def reap(pids: Iterable[int]) -> list[tuple[int, int]]:
    """(pid, exit code) of those ``pids`` that exited, without blocking; codes < 0 are signals."""
    exited = []
    for pid in pids:
        try:
            wpid, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            wpid, status = pid, 0
        if wpid:
            exited.append((pid, os.waitstatus_to_exitcode(status)))
    return exited


def bury(state_dir: Path, pid: int) -> tuple[runtime.WorkerState | None, str | None]:
    """Clear what an exited child left in the state directory: (its last state, its boot error)."""
    from prometheus_client import multiprocess  # after PROMETHEUS_MULTIPROC_DIR is set

    last = runtime.read_state(state_dir, pid)
    runtime.remove_state(state_dir, pid)
    multiprocess.mark_process_dead(pid, str(state_dir))  # type: ignore[no-untyped-call]
    return last, runtime.pop_boot_error(state_dir, pid)


def look_at(state_dir: Path, child: Child, now: float) -> bool:
    """Read a worker's state file into its heartbeat; True when it has just started listening."""
    state = runtime.read_state(state_dir, child.pid)
    if state is None:
        return False
    child.beat.observe(state.heartbeat_at, now)
    if state.listening and not state.draining and not child.ready:
        child.ready = True
        log.info("worker listening", extra={"pid": child.pid, "worker": child.index})
        return True
    return False


def log_exit(child: Child, cause: ExitCause, boot_error: str | None, planned: bool) -> str:
    """One log line per exit (warning when unplanned); the reason it is counted under."""
    reason = child.leaving or child.kill_reason or cause.reason
    fields = dict(cause.fields)
    if boot_error:
        fields["boot_error"] = boot_error
    if not child.index:
        fields["child"] = child.name
    extra = {"pid": child.pid, "worker": child.index or None, "reason": reason, "fields": fields}
    log.log(logging.INFO if planned else logging.WARNING, f"{child.name} exited", extra=extra)
    return reason


def kill_and_wait(pid: int) -> int:
    """SIGKILL ``pid`` and wait for it: the last resort of a stop."""
    kill(pid, signal.SIGKILL)
    try:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    except ChildProcessError:
        return -signal.SIGKILL
