"""The supervisor's main loop, reading top to bottom like gunicorn's ``Arbiter.run()``.

Wait for a signal or the next tick, handle queued signals (``handle_<name>``),
reap exited children, kill workers whose heartbeat stopped, step a rolling
restart, refill the wanted workers and side processes. The rules come from
:mod:`.policy`, processes from :mod:`.children`, signals from :mod:`.signals`.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from setproctitle import setproctitle

from fanout import runtime
from fanout.errors import OperatorError
from fanout.settings import Settings, load
from fanout.supervisor import children, policy
from fanout.supervisor.children import Child, ExtraTarget, Sidecar, WorkerTarget
from fanout.supervisor.signals import SignalQueue

log = logging.getLogger("fanout.supervisor")


class Halt(OperatorError):
    """The gateway cannot run; the message is the one line the operator sees (exit 2).

    Any :class:`OperatorError` that reaches the main loop (a taken port, a
    sidecar that cannot start) ends it the same way.
    """


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
        sidecar: Sidecar | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self._settings = settings
        self._child_settings = settings  # what children get (the sidecar's url filled in)
        self._config_path = config_path
        self._overrides = dict(overrides or {})
        self._extras = dict(extra_children)
        self._sidecar = sidecar or children.NoSidecar()
        count = settings.server.workers or len(os.sched_getaffinity(0))
        self._wanted: set[int] = set(range(1, count + 1))
        self._children: dict[int, Child] = {}
        self._backoff = policy.Backoffs()
        self._restarts = dict.fromkeys(policy.REASONS, 0)
        self._generation = 0
        self._boot = policy.BootWatch()
        self._stop: str | None = None  # None, "graceful" or "quick"
        self._signals = SignalQueue()
        self._forker = children.Forker(worker_target, self.state_dir, self._signals)
        self._dir_ours = False
        self._roll: policy.Roll[tuple[Settings, Settings, int]] | None = None
        self._pid = os.getpid()
        #: The public and admin ports' lock fds, held for life (SO_REUSEPORT would share both).
        self._locks: tuple[int | None, int | None] = (None, None)

    def run(self) -> int:
        """Serve until asked to stop; the exit code of `fanout serve`."""
        code = 0
        try:
            self.start()
            while self._stop is None:
                self.sleep()
                self.handle_signals()
                self.reap_children()
                if self._stop:
                    break
                self.murder_workers()
                self.manage_roll()
                self.manage_workers()
                self._sidecar.check()
        except OperatorError as halt:
            print(f"fanout: {halt}", file=sys.stderr, flush=True)
            code = 2
        except Exception:
            log.exception("supervisor failed")
            self._stop, code = "quick", 1
        finally:
            self.stop()
        return code

    def sleep(self) -> None:
        """Until a signal, the next backoff's end or the next roll step, at most one tick."""
        rolling = self._roll is not None
        self._signals.wait(policy.tick_timeout(time.monotonic(), self._backoff.values(), rolling))

    def start(self) -> None:
        setproctitle(self._title())
        try:
            self._locks = runtime.hold_ports(self._settings, self.state_dir)
            runtime.make_state_dir(self.state_dir)
        except (OSError, RuntimeError) as exc:
            raise Halt(f"cannot prepare the state directory: {exc}") from None
        self._dir_ours = True
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self.state_dir)
        self._signals.install()
        self._child_settings = self._sidecar.settings_for_children(self._settings)
        self._publish()
        workers = {"workers": len(self._wanted)}
        log.info("supervisor started", extra={"pid": self._pid, "fields": workers})
        self.manage_workers()

    def handle_signals(self) -> None:
        for sig in self._signals.pop_all():
            if sig != signal.SIGCHLD:
                log.info("signal %s", sig.name)
            getattr(self, f"handle_{sig.name[3:].lower()}")()

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
            child_settings = self._sidecar.settings_for_children(new)
        except OperatorError as exc:  # a ConfigError, or the sidecar's
            log.error("reload refused, keeping the old settings: %s", exc)
            return
        previous = (self._settings, self._child_settings, self._generation)
        self._settings, self._child_settings = new, child_settings
        self._generation += 1
        timeout = new.server.worker_timeout_s
        self._roll = policy.Roll.reload(
            self._roll, self._wanted, self._generation, timeout, previous
        )
        self._publish()
        setproctitle(self._title())
        log.info("rolling restart", extra={"fields": {"generation": self._generation}})

    def handle_ttin(self) -> None:
        if not self._stop:
            self._wanted.add(policy.index_to_add(self._wanted))
            self._publish()

    def handle_ttou(self) -> None:
        drop = None if self._stop else policy.index_to_drop(self._wanted, self._workers().values())
        if drop is not None:
            index, pid = drop
            self._wanted.discard(index)
            if pid is not None:
                children.leave(self._children[pid], "scale_down", signal.SIGTERM)
            self._publish()

    def manage_workers(self) -> None:
        """Fill every wanted worker index and side process that has none, backoff allowing."""
        if self._stop:
            return
        now = time.monotonic()
        held = {c.index for c in self._workers().values() if not c.leaving}
        for index in sorted(self._wanted - held):
            if self._backoff.allows(f"worker {index}", now):
                self._spawn_worker(index)
        running = {c.name for c in self._children.values() if not c.index}
        for name, target in self._extras.items():
            if name not in running and self._backoff.allows(name, now):
                side = self._forker.side(name, target, self._child_settings, self._generation)
                self._track(name, side)

    def murder_workers(self) -> None:
        """Kill workers whose heartbeat stopped: SIGABRT, then SIGKILL if that did not do."""
        now, timeout = time.monotonic(), self._settings.server.worker_timeout_s
        for child in self._workers().values():
            if child.beat.aborted_at is None and children.look_at(self.state_dir, child, now):
                self._boot.listened()
            children.murder(child, child.beat.verdict(now, timeout), now)

    def reap_children(self) -> None:
        for pid, code in children.reap(list(self._children)):
            self._on_exit(self._children.pop(pid), code)

    def manage_roll(self) -> None:
        """One step of a rolling restart: the new worker listens before its old one leaves."""
        roll = self._roll
        if roll is None:
            return
        actions = roll.advance(time.monotonic(), self._workers())
        for action in actions:  # grows when a fork fails: that aborts the roll
            match action:
                case policy.Retire(pid):
                    children.leave(self._children[pid], "reload", signal.SIGUSR1)
                case policy.StartNew(index):
                    new = self._spawn_worker(index)
                    actions += roll.started(new.pid if new else None, time.monotonic())
                case policy.Abort(reason, kill):
                    if kill is not None:
                        children.leave(self._children[kill], "reload_aborted", signal.SIGKILL)
                    self._settings, self._child_settings, self._generation = roll.previous
                    self._roll = None
                    self._publish()  # before the log line: whoever reads it sees the old state
                    setproctitle(self._title())
                    log.error("rolling restart aborted, old workers keep serving: %s", reason)
                case policy.Done():
                    generation = {"generation": self._generation}
                    self._roll = None
                    log.info("rolling restart done", extra={"fields": generation})

    def _spawn_worker(self, index: int) -> Child | None:
        child = self._forker.worker(self._child_settings, index, self._generation)
        return self._track(f"worker {index}", child)

    def _track(self, key: str, child: Child | None) -> Child | None:
        if child is None:  # fork failed: try again after a backoff
            self._backoff.failed(key, time.monotonic(), 0.0)
        else:
            self._children[child.pid] = child
        return child

    def _on_exit(self, child: Child, code: int) -> None:
        last, boot_error = children.bury(self.state_dir, child.pid)
        if last is not None and last.listening:  # it served, even if we had not looked yet
            self._boot.listened()
        cause = policy.describe_exit(code)
        planned = child.leaving is not None or self._stop is not None
        reason = children.log_exit(child, cause, boot_error, planned)
        if planned:
            return
        now = time.monotonic()
        key = f"worker {child.index}" if child.index else child.name
        self._backoff.failed(key, now, now - child.started)
        if child.index:
            self._restarts[reason] += 1
            self._publish()
            if self._boot.halts(len(self._wanted)):
                raise Halt(policy.halt_reason(boot_error, child.index, cause))

    def stop(self) -> None:
        """Children drain (TERM) or go at once (QUIT), then SIGKILL for laggards; clean up."""
        self._stop = self._stop or "graceful"
        quick = self._stop == "quick"
        for child in self._children.values():
            children.leave(child, "shutdown", signal.SIGQUIT if quick else signal.SIGTERM)
        graceful_s = self._settings.server.graceful_timeout_s
        deadline = time.monotonic() + policy.stop_grace(quick, graceful_s)
        while self._children and time.monotonic() < deadline:
            self._signals.wait(0.05)
            self.handle_signals()
            if not quick and self._stop == "quick":
                quick = True
                for child in self._children.values():
                    children.kill(child.pid, signal.SIGQUIT)
                deadline = min(deadline, time.monotonic() + policy.stop_grace(True, graceful_s))
            self.reap_children()
        for pid in list(self._children):
            self._on_exit(self._children.pop(pid), children.kill_and_wait(pid))
        self._sidecar.stop()
        self._signals.restore()
        if self._dir_ours:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        log.info("supervisor stopped", extra={"pid": self._pid})

    def _workers(self) -> dict[int, Child]:
        return {pid: c for pid, c in self._children.items() if c.index}

    def _title(self) -> str:
        return f"fanout supervisor :{self._settings.server.port}"

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
