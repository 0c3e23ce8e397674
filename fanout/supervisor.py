"""`fanout serve`'s supervisor: forks the workers, keeps them alive, rolls them on SIGHUP.

Shaped after gunicorn's arbiter, smaller. Signal handlers only queue the
signal (``signal.set_wakeup_fd`` writes a byte to a self-pipe so the loop's
``select`` wakes up); the main loop handles one signal at a time, reaps its
children with ``waitpid(pid, WNOHANG)``, kills workers whose heartbeat (their
state file, written from their event loop) stopped, and replaces dead workers
with exponential backoff. The supervisor opens no sockets, has no NATS client
and never exports metrics; it imports prometheus_client only to mark reaped
workers dead.

Heartbeats: a worker must write its first state file within 2 × worker_timeout_s
of its fork (boot grace) and then keep ``heartbeat_at`` changing; silence for
worker_timeout_s gets it SIGABRT, then SIGKILL 2 s later, and a replacement.
Replacements keep the dead worker's index and back off 0.1 s, doubling to 10 s,
reset once a worker has lived 30 s.

Signals: TERM/INT stop gracefully (workers get SIGTERM, SIGKILL after
graceful_timeout_s + 1 s); a second INT, or QUIT, stops at once (SIGQUIT, SIGKILL
1 s later). HUP reloads the config and rolls the workers one at a time: each
new worker must report listening within worker_timeout_s before its predecessor
gets SIGUSR1, or the roll stops and the previous settings stay in force. TTIN /
TTOU add / remove one worker (never below one; the newest leaves). Children
start with SIGINT/SIGHUP ignored (Ctrl-C reaches the whole process group) and
get SIGTERM from Linux if the supervisor dies (PR_SET_PDEATHSIG).

Exit codes: 0 after a stop that was asked for (graceful or quick: the operator
asked, it stopped); 1 on a supervisor bug; 2 when the gateway cannot start (the
port already served by another ``fanout serve``, state directory, embedded
nats-server, or no worker ever booted), with one line ``fanout: <reason>`` on
stderr. The port is locked per host:port (:func:`fanout.runtime.lock_port`)
before anything else starts.

Besides the workers' own files (see :mod:`fanout.runtime`), the supervisor
writes ``supervisor.json`` in the state directory whenever it changes::

    {"pid": 4711, "workers_wanted": 4, "generation": 2, "updated_at": 1700000000.5,
     "restarts": {"boot_error": 0, "crash": 1, "exit": 0, "signal": 2, "timeout": 0}}

``generation`` counts reloads (each worker also finds its own in the environment
variable ``FANOUT_GENERATION``, set in the child after the fork);
``restarts`` counts unplanned worker deaths by reason (``fanout_worker_restarts_total``):
``signal`` killed by a signal we did not send, ``crash`` non-zero exit,
``boot_error`` exit 3, ``timeout`` heartbeat stopped (we sent SIGABRT, then
SIGKILL), ``exit`` exit 0 unasked. Planned exits (``reload``, ``scale_down``,
``shutdown``) are logged, not counted. ``server.workers`` is read at start only:
use TTIN/TTOU to change the count of a running gateway.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import msgspec
from setproctitle import setproctitle

from fanout import runtime
from fanout.embedded_nats import EmbeddedNats
from fanout.settings import ConfigError, Settings, load

WORKER_BOOT_ERROR = 3

WorkerTarget = Callable[[Settings, int, Path], int]
ExtraTarget = Callable[[Settings], int]

log = logging.getLogger("fanout.supervisor")

_HANDLED = (
    signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
    signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD,
)  # fmt: skip
_REASONS = ("boot_error", "crash", "exit", "signal", "timeout")
_TICK_S = 0.25
_ROLL_TICK_S = 0.05
_BACKOFF_FIRST_S = 0.1
_BACKOFF_CAP_S = 10.0
_STABLE_AFTER_S = 30.0
_ABORT_GRACE_S = 2.0
_QUICK_STOP_S = 1.0
_PR_SET_PDEATHSIG = 1


class _Halt(Exception):
    """The gateway cannot run; the message is the one line the operator sees."""


@dataclass(slots=True)
class _Child:
    pid: int
    name: str  # "worker" or the side process's name
    index: int  # 1..N for workers, 0 for side processes
    generation: int
    started: float  # monotonic
    beat_seen: float  # monotonic time the heartbeat last changed (boot grace at first)
    beat_value: float = -1.0
    ready: bool = False
    leaving: str | None = None  # why we asked it to go; its exit is then planned
    kill_reason: str | None = None
    aborted_at: float | None = None
    sigkilled: bool = False


@dataclass(slots=True)
class _Backoff:
    failures: int = 0
    not_before: float = 0.0

    def failed(self, now: float, uptime: float) -> None:
        if uptime >= _STABLE_AFTER_S:
            self.failures = 0
        self.failures += 1
        self.not_before = now + min(_BACKOFF_FIRST_S * 2 ** (self.failures - 1), _BACKOFF_CAP_S)


def _describe(code: int) -> tuple[str, dict[str, int | str], str]:
    """``waitstatus_to_exitcode`` result → restart reason, log fields and words."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return "signal", {"signal": name}, f"was killed by {name}"
    reason = "boot_error" if code == WORKER_BOOT_ERROR else "crash" if code else "exit"
    return reason, {"exit_code": code}, f"exited with code {code}"


def _die_with_parent(parent: int) -> None:
    """Have Linux SIGTERM this child when the supervisor dies, even by SIGKILL: no orphans."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:
        os._exit(0)


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        *,
        worker_target: WorkerTarget,
        state_dir: Path,
        config_path: str | None,
        overrides: Mapping[str, object] | None = None,
        extra_children: Sequence[tuple[str, ExtraTarget]] = (),
    ) -> None:
        self.state_dir = Path(state_dir)
        self._settings = settings
        self._worker_settings = settings  # with the embedded NATS url filled in
        self._target = worker_target
        self._config_path = config_path
        self._overrides = dict(overrides or {})
        self._extras = dict(extra_children)
        count = settings.server.workers or len(os.sched_getaffinity(0))
        self._wanted: set[int] = set(range(1, count + 1))
        self._children: dict[int, _Child] = {}
        self._backoff: dict[str, _Backoff] = {}
        self._restarts = dict.fromkeys(_REASONS, 0)
        self._generation = 0
        self._ever_ready = False
        self._boot_failures = 0
        self._stop: str | None = None  # None, "graceful" or "quick"
        self._queue: deque[int] = deque()
        self._pipe: tuple[int, int] | None = None
        self._saved: dict[int, signal._HANDLER] = {}
        self._nats: EmbeddedNats | None = None
        self._dir_ours = False
        self._roll: list[int] = []
        self._step: tuple[_Child, _Child, float] | None = None
        self._before_roll: tuple[Settings, Settings, int] | None = None
        self._pid = os.getpid()
        self._port_lock: int | None = None  # the serve lock's fd, held for life

    def run(self) -> int:
        """Serve until asked to stop; the exit code of `fanout serve`."""
        code = 0
        try:
            self._boot()
            while self._stop is None:
                self._tick()
        except _Halt as halt:
            print(f"fanout: {halt}", file=sys.stderr, flush=True)
            code = 2
        except Exception:
            log.exception("supervisor failed")
            self._stop, code = "quick", 1
        finally:
            self._shutdown()
        return code

    # -- signals ----------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._queue.append(signum)

    def _install_signals(self) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self._pipe = (read_fd, write_fd)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for sig in _HANDLED:
            self._saved[sig] = signal.signal(sig, self._on_signal)

    def _restore_signals(self) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        if self._pipe is not None:
            signal.set_wakeup_fd(-1)
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    def _wait(self, timeout: float) -> None:
        if self._pipe is None:
            time.sleep(timeout)
            return
        readable, _, _ = select.select([self._pipe[0]], [], [], timeout)
        if readable:
            with contextlib.suppress(BlockingIOError):
                os.read(self._pipe[0], 4096)

    def _dispatch(self) -> None:
        while self._queue:
            sig = self._queue.popleft()
            name = signal.Signals(sig).name
            if sig != signal.SIGCHLD:
                log.info("signal %s", name)
            getattr(self, f"handle_{name[3:].lower()}")()

    def handle_chld(self) -> None:
        self.reap_children()

    def handle_term(self) -> None:
        self._stop = self._stop or "graceful"

    def handle_int(self) -> None:
        self._stop = "quick" if self._stop else "graceful"

    def handle_quit(self) -> None:
        self._stop = "quick"

    def handle_hup(self) -> None:
        if self._stop:
            return
        try:
            new = load(self._config_path, overrides=self._overrides)
            worker_settings = self._with_nats(new)
        except (ConfigError, RuntimeError) as exc:
            log.error("reload refused, keeping the old settings: %s", exc)
            return
        if self._before_roll is None:
            self._before_roll = (self._settings, self._worker_settings, self._generation)
        self._settings, self._worker_settings = new, worker_settings
        self._generation += 1
        self._roll = sorted(self._wanted)
        self._publish()
        setproctitle(self._title())
        log.info("rolling restart", extra={"fields": {"generation": self._generation}})

    def handle_ttin(self) -> None:
        if self._stop:
            return
        index = next(i for i in range(1, len(self._wanted) + 2) if i not in self._wanted)
        self._wanted.add(index)
        self._publish()

    def handle_ttou(self) -> None:
        if self._stop or len(self._wanted) <= 1:
            return
        live = [c for c in self._children.values() if c.index in self._wanted and not c.leaving]
        missing = self._wanted - {c.index for c in live}
        if missing:
            self._wanted.discard(max(missing))
        else:
            newest = max(live, key=lambda c: c.started)
            self._wanted.discard(newest.index)
            self._leave(newest, "scale_down", signal.SIGTERM)
        self._publish()

    # -- the loop ---------------------------------------------------------

    def _boot(self) -> None:
        setproctitle(self._title())
        server = self._settings.server
        if server.port:  # port 0: every worker gets a port of its own, nothing to share
            try:
                self._port_lock = runtime.lock_port(server.host, server.port)
            except (runtime.PortTaken, OSError) as exc:
                with contextlib.suppress(OSError):
                    self.state_dir.rmdir()  # the fresh, empty directory `fanout serve` made
                if isinstance(exc, runtime.PortTaken):
                    raise _Halt(str(exc)) from None
                raise _Halt(f"cannot take the lock of port {server.port}: {exc}") from None
        try:
            runtime.make_state_dir(self.state_dir)
        except (OSError, RuntimeError) as exc:
            raise _Halt(f"cannot prepare the state directory: {exc}") from None
        self._dir_ours = True
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self.state_dir)
        self._install_signals()
        try:
            self._worker_settings = self._with_nats(self._settings)
        except RuntimeError as exc:
            raise _Halt(f"cannot start the embedded nats-server: {exc}") from None
        self._publish()
        log.info(
            "supervisor started",
            extra={"pid": self._pid, "fields": {"workers": len(self._wanted)}},
        )
        self.manage_workers()
        self.manage_extras()

    def _tick(self) -> None:
        now = time.monotonic()
        due = [b.not_before - now for b in self._backoff.values() if b.not_before > now]
        if self._step is not None:
            due.append(_ROLL_TICK_S)  # the next old worker goes as soon as its successor listens
        self._wait(max(0.01, min([_TICK_S, *due])))
        self._dispatch()
        self.reap_children()
        if self._stop:
            return
        self.murder_workers()
        self.manage_roll()
        self.manage_workers()
        self.manage_extras()
        self._check_nats()

    def _title(self) -> str:
        return f"fanout supervisor :{self._settings.server.port}"

    def _with_nats(self, settings: Settings) -> Settings:
        """``settings`` for children: with the embedded server's url when none is configured."""
        if settings.nats.urls:
            return settings
        if self._nats is None:
            try:
                nats = EmbeddedNats()
                nats.start()
            except OSError as exc:
                raise RuntimeError(str(exc)) from None
            self._nats = nats
            log.info("embedded nats-server started", extra={"fields": {"url": nats.url}})
        nats_section = msgspec.structs.replace(settings.nats, urls=[self._nats.url])
        return msgspec.structs.replace(settings, nats=nats_section)

    def _check_nats(self) -> None:
        nats = self._nats
        if nats is None or nats.proc is None or nats.proc.poll() is None:
            return
        log.error("embedded nats-server exited; restarting it", extra={"fields": {"url": nats.url}})
        try:
            nats.start()
        except (OSError, RuntimeError) as exc:
            raise _Halt(f"the embedded nats-server died and cannot restart: {exc}") from None

    def _publish(self) -> None:
        state = runtime.SupervisorState(
            pid=self._pid,
            workers_wanted=len(self._wanted),
            generation=self._generation,
            restarts=dict(self._restarts),
            updated_at=time.time(),
        )
        try:
            runtime.write_supervisor_state(self.state_dir, state)
        except OSError as exc:
            log.error("cannot write supervisor.json: %s", exc)

    # -- children ---------------------------------------------------------

    def _fork(self, body: Callable[[], int], title: str | None) -> int | None:
        """Fork a child that runs ``body`` and exits with its result; None if fork failed."""
        sys.stdout.flush()
        sys.stderr.flush()
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
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
            self._reset_child(old_mask)
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

    def _reset_child(self, mask: Iterable[int]) -> None:
        """In a fresh child: default signal handlers, no self-pipe; INT/HUP are the supervisor's."""
        signal.set_wakeup_fd(-1)
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
        for sig in _HANDLED:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        _die_with_parent(self._pid)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _spawn_worker(self, index: int) -> _Child | None:
        settings, target, state_dir = self._worker_settings, self._target, self.state_dir
        generation = self._generation

        def body() -> int:
            os.environ["FANOUT_GENERATION"] = str(generation)
            return target(settings, index, state_dir)

        pid = self._fork(body, None)
        if pid is None:
            self._backoff.setdefault(f"worker {index}", _Backoff()).failed(time.monotonic(), 0.0)
            return None
        now = time.monotonic()
        grace = self._settings.server.worker_timeout_s
        child = _Child(pid, "worker", index, self._generation, now, beat_seen=now + grace)
        self._children[pid] = child
        log.info(
            "worker started",
            extra={"pid": pid, "worker": index, "fields": {"generation": self._generation}},
        )
        return child

    @staticmethod
    def _kill(child: _Child, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, sig)

    def _leave(self, child: _Child, why: str, sig: int) -> None:
        """Ask ``child`` to go: its exit is then planned (logged, not counted, not replaced)."""
        child.leaving = child.leaving or why
        self._kill(child, sig)

    def manage_workers(self) -> None:
        """Start a worker for every wanted index that has none, once its backoff allows."""
        if self._stop:
            return
        now = time.monotonic()
        held = {c.index for c in self._children.values() if c.index and not c.leaving}
        for index in sorted(self._wanted - held):
            backoff = self._backoff.get(f"worker {index}")
            if backoff is None or now >= backoff.not_before:
                self._spawn_worker(index)

    def manage_extras(self) -> None:
        if self._stop:
            return
        now = time.monotonic()
        running = {c.name for c in self._children.values() if not c.index}
        for name, target in self._extras.items():
            backoff = self._backoff.get(name)
            if name in running or (backoff is not None and now < backoff.not_before):
                continue
            self._spawn_extra(name, target)

    def _spawn_extra(self, name: str, target: ExtraTarget) -> None:
        settings, now = self._worker_settings, time.monotonic()
        pid = self._fork(lambda: target(settings), f"fanout {name}")
        if pid is None:
            self._backoff.setdefault(name, _Backoff()).failed(now, 0.0)
            return
        self._children[pid] = _Child(pid, name, 0, self._generation, now, beat_seen=now)
        log.info("side process started", extra={"pid": pid, "fields": {"child": name}})

    def murder_workers(self) -> None:
        """Kill workers whose heartbeat stopped: SIGABRT, then SIGKILL if that did not do."""
        now = time.monotonic()
        timeout = self._settings.server.worker_timeout_s
        for child in self._children.values():
            if not child.index or child.sigkilled:
                continue
            if child.aborted_at is not None:
                if now - child.aborted_at >= _ABORT_GRACE_S:
                    child.sigkilled = True
                    self._kill(child, signal.SIGKILL)
                continue
            state = runtime.read_state(self.state_dir, child.pid)
            if state is not None:
                if state.heartbeat_at != child.beat_value:
                    child.beat_value, child.beat_seen = state.heartbeat_at, now
                if state.listening and not state.draining and not child.ready:
                    child.ready = self._ever_ready = True
                    log.info("worker listening", extra={"pid": child.pid, "worker": child.index})
            if now - child.beat_seen > timeout:
                log.error(
                    "worker heartbeat stopped; killing it",
                    extra={"pid": child.pid, "worker": child.index, "reason": "timeout"},
                )
                child.kill_reason, child.aborted_at = "timeout", now
                self._kill(child, signal.SIGABRT)

    def reap_children(self) -> None:
        for pid in list(self._children):
            try:
                wpid, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                wpid, status = pid, 0
            if wpid:
                self._on_exit(self._children.pop(pid), os.waitstatus_to_exitcode(status))

    def _on_exit(self, child: _Child, code: int) -> None:
        last = runtime.read_state(self.state_dir, child.pid)
        if last is not None and last.listening:  # it served, even if we had not looked yet
            self._ever_ready = True
        runtime.remove_state(self.state_dir, child.pid)
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(child.pid, str(self.state_dir))  # type: ignore[no-untyped-call]
        boot_error = runtime.pop_boot_error(self.state_dir, child.pid)
        cause, fields, words = _describe(code)
        reason = child.leaving or child.kill_reason or cause
        if boot_error:
            fields["boot_error"] = boot_error
        if not child.index:
            fields["child"] = child.name
        extra = {
            "pid": child.pid,
            "worker": child.index or None,
            "reason": reason,
            "fields": fields,
        }
        planned = child.leaving is not None or self._stop is not None
        log.log(logging.INFO if planned else logging.WARNING, f"{child.name} exited", extra=extra)
        if planned:
            return
        now = time.monotonic()
        key = f"worker {child.index}" if child.index else child.name
        self._backoff.setdefault(key, _Backoff()).failed(now, now - child.started)
        if not child.index:
            return
        self._restarts[reason] += 1
        self._publish()
        if not self._ever_ready:
            self._boot_failures += 1
            if self._boot_failures >= len(self._wanted):
                why = boot_error or f"worker {child.index} {words} before it was listening"
                raise _Halt(f"workers cannot boot: {why}")

    # -- rolling restart --------------------------------------------------

    def manage_roll(self) -> None:
        """One step of a rolling restart: the new worker listens before its old one leaves."""
        if self._step is not None:
            old, new, deadline = self._step
            if new.pid not in self._children or new.leaving:
                self._abort_roll(f"new worker {new.index} exited before it was listening")
                return
            if not new.ready:
                if time.monotonic() > deadline:
                    self._leave(new, "reload_aborted", signal.SIGKILL)
                    self._abort_roll(f"new worker {new.index} was not listening in time")
                return
            if old.pid in self._children:
                self._leave(old, "reload", signal.SIGUSR1)
            self._step = None
        while self._roll:
            index = self._roll.pop(0)
            old_workers = [
                c
                for c in self._children.values()
                if c.index == index and not c.leaving and c.generation < self._generation
            ]
            if not old_workers:
                continue
            new_worker = self._spawn_worker(index)
            if new_worker is None:
                self._abort_roll(f"cannot fork a new worker {index}")
                return
            ready_by = time.monotonic() + self._settings.server.worker_timeout_s
            self._step = (old_workers[0], new_worker, ready_by)
            return
        if self._before_roll is not None:
            self._before_roll = None
            log.info("rolling restart done", extra={"fields": {"generation": self._generation}})

    def _abort_roll(self, why: str) -> None:
        log.error("rolling restart aborted, old workers keep serving: %s", why)
        if self._before_roll is not None:
            self._settings, self._worker_settings, self._generation = self._before_roll
        self._before_roll, self._roll, self._step = None, [], None
        self._publish()
        setproctitle(self._title())

    # -- stopping ---------------------------------------------------------

    def _shutdown(self) -> None:
        self._stop = self._stop or "graceful"
        quick = self._stop == "quick"
        for child in self._children.values():
            self._leave(child, "shutdown", signal.SIGQUIT if quick else signal.SIGTERM)
        grace = _QUICK_STOP_S if quick else self._settings.server.graceful_timeout_s + 1.0
        deadline = time.monotonic() + grace
        while self._children and time.monotonic() < deadline:
            self._wait(0.05)
            self._dispatch()
            if not quick and self._stop == "quick":
                quick = True
                for child in self._children.values():
                    self._kill(child, signal.SIGQUIT)
                deadline = min(deadline, time.monotonic() + _QUICK_STOP_S)
            self.reap_children()
        for pid, child in list(self._children.items()):
            self._kill(child, signal.SIGKILL)
            try:
                code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            except ChildProcessError:
                code = -signal.SIGKILL
            self._on_exit(self._children.pop(pid), code)
        if self._nats is not None:
            self._nats.stop()
            self._nats = None
        self._restore_signals()
        if self._dir_ours:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        log.info("supervisor stopped", extra={"pid": self._pid})
