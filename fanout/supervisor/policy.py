"""The supervisor's decisions, without processes, signals or clocks of its own.

Every rule the arbiter follows lives here as data and small pure functions
that take ``now`` (monotonic seconds) as an argument: restart backoff, the
heartbeat verdict, the boot-halt rule, scaling, and the rolling restart as an
explicit state machine. The arbiter (:mod:`fanout.supervisor.arbiter`) only
looks at processes, asks here what to do, and does it; so these rules are
tested with a scripted clock and no fork (``tests/unit/test_supervisor_policy.py``).
"""

from __future__ import annotations

import signal
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, Protocol, TypeVar

from fanout.runtime import EXIT_SLACK_S, WORKER_BOOT_ERROR

#: Unplanned worker deaths, by reason (``fanout_worker_restarts_total``).
REASONS = ("boot_error", "crash", "exit", "signal", "timeout")
#: The main loop's longest sleep, and its sleep while a rolling restart waits for a worker.
TICK_S = 0.25
ROLL_TICK_S = 0.05
BACKOFF_FIRST_S = 0.1
BACKOFF_CAP_S = 10.0
#: A child that lived this long was healthy: its next death starts the backoff afresh.
STABLE_AFTER_S = 30.0
#: A stuck worker gets SIGABRT (a traceback), then SIGKILL this much later.
ABORT_GRACE_S = 2.0
#: After SIGQUIT (quick stop) children get this long before SIGKILL.
QUICK_STOP_S = 1.0


# -- restart backoff ---------------------------------------------------------------------------


@dataclass(slots=True)
class Backoff:
    """When one slot (a worker index, a side process) may be refilled after failures."""

    failures: int = 0
    not_before: float = 0.0

    def failed(self, now: float, uptime: float) -> None:
        """A death after ``uptime`` s: 0.1 s, doubling to 10 s; reset after 30 s of life."""
        if uptime >= STABLE_AFTER_S:
            self.failures = 0
        self.failures += 1
        self.not_before = now + min(BACKOFF_FIRST_S * 2 ** (self.failures - 1), BACKOFF_CAP_S)

    def allows(self, now: float) -> bool:
        return now >= self.not_before


class Backoffs(dict[str, Backoff]):
    """One :class:`Backoff` per slot: ``"worker <index>"`` or a side process's name."""

    def failed(self, key: str, now: float, uptime: float) -> None:
        self.setdefault(key, Backoff()).failed(now, uptime)

    def allows(self, key: str, now: float) -> bool:
        backoff = self.get(key)
        return backoff is None or backoff.allows(now)


def tick_timeout(now: float, backoffs: Iterable[Backoff], rolling: bool) -> float:
    """How long the main loop may sleep: until the next backoff expires, at most one tick."""
    due = [b.not_before - now for b in backoffs if b.not_before > now]
    if rolling:
        due.append(ROLL_TICK_S)  # the next old worker goes as soon as its successor listens
    return max(0.01, min([TICK_S, *due]))


def stop_grace(quick: bool, graceful_timeout_s: float) -> float:
    """How long stopping children get before SIGKILL: they drain first, then exit."""
    return QUICK_STOP_S if quick else graceful_timeout_s + EXIT_SLACK_S


# -- why a child exited ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExitCause:
    reason: str  # one of REASONS
    fields: dict[str, int | str]  # for the log line
    words: str  # for the operator: "was killed by SIGKILL", "exited with code 1"


def describe_exit(code: int) -> ExitCause:
    """``os.waitstatus_to_exitcode`` result -> restart reason, log fields and words."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return ExitCause("signal", {"signal": name}, f"was killed by {name}")
    reason = "boot_error" if code == WORKER_BOOT_ERROR else "crash" if code else "exit"
    return ExitCause(reason, {"exit_code": code}, f"exited with code {code}")


# -- heartbeats --------------------------------------------------------------------------------


class Verdict(Enum):
    ALIVE = "alive"
    ABORT = "abort"  # heartbeat stopped: SIGABRT now
    KILL = "kill"  # SIGABRT did not do: SIGKILL now
    WAIT = "wait"  # already being killed


@dataclass(slots=True)
class Heartbeat:
    """A worker's heartbeat as the supervisor sees it: when its value last changed.

    ``seen`` starts at fork time + worker_timeout_s: the boot grace, so a worker
    has 2 x worker_timeout_s to write its first state file.
    """

    seen: float
    value: float = -1.0
    aborted_at: float | None = None
    killed: bool = False

    def observe(self, value: float, now: float) -> None:
        if value != self.value:
            self.value, self.seen = value, now

    def verdict(self, now: float, timeout_s: float) -> Verdict:
        if self.killed:
            return Verdict.WAIT
        if self.aborted_at is not None:
            return Verdict.KILL if now - self.aborted_at >= ABORT_GRACE_S else Verdict.WAIT
        return Verdict.ABORT if now - self.seen > timeout_s else Verdict.ALIVE


# -- the boot-halt rule ------------------------------------------------------------------------


@dataclass(slots=True)
class BootWatch:
    """Stop (exit 2) when no worker can boot, rather than crash-looping forever.

    Until some worker has listened, every unplanned worker death counts; as
    many as there are wanted workers halt the gateway. Once any worker has
    listened, deaths are restarts, never a halt.
    """

    ever_ready: bool = False
    failures: int = 0

    def listened(self) -> None:
        self.ever_ready = True

    def halts(self, wanted: int) -> bool:
        """Record one unplanned worker death; True when the gateway must stop."""
        if self.ever_ready:
            return False
        self.failures += 1
        return self.failures >= wanted


def halt_reason(boot_error: str | None, index: int, cause: ExitCause) -> str:
    """The one line ``fanout: ...`` on stderr: the worker's own reason when it left one."""
    return "workers cannot boot: " + (
        boot_error or f"worker {index} {cause.words} before it was listening"
    )


# -- scaling (TTIN / TTOU) ---------------------------------------------------------------------


class WorkerView(Protocol):
    """What the policy needs to know of a live worker process."""

    @property
    def pid(self) -> int: ...
    @property
    def index(self) -> int: ...
    @property
    def generation(self) -> int: ...
    @property
    def started(self) -> float: ...
    @property
    def ready(self) -> bool: ...
    @property
    def leaving(self) -> str | None: ...


def index_to_add(wanted: set[int]) -> int:
    """TTIN: the lowest free index."""
    return next(i for i in range(1, len(wanted) + 2) if i not in wanted)


def index_to_drop(wanted: set[int], workers: Iterable[WorkerView]) -> tuple[int, int | None] | None:
    """TTOU: (index no longer wanted, pid to stop or None); None when only one is left.

    A wanted index without a worker (one backing off) goes first, else the newest worker.
    """
    if len(wanted) <= 1:
        return None
    live = [w for w in workers if w.index in wanted and not w.leaving]
    missing = wanted - {w.index for w in live}
    if missing:
        return max(missing), None
    newest = max(live, key=lambda w: w.started)
    return newest.index, newest.pid


# -- the rolling restart -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartNew:
    index: int


@dataclass(frozen=True, slots=True)
class Retire:
    pid: int  # the old worker, now that its successor listens: SIGUSR1


@dataclass(frozen=True, slots=True)
class Abort:
    reason: str
    kill: int | None = None  # a successor that never listened: SIGKILL


@dataclass(frozen=True, slots=True)
class Done:
    pass


RollAction = StartNew | Retire | Abort | Done
T = TypeVar("T")


class RollPhase(Enum):
    NEXT = "next"  # choose the next index that still has an old worker
    STARTING = "starting"  # StartNew returned; the arbiter reports the fork
    WAITING = "waiting"  # the new worker must listen before its deadline
    DONE = "done"
    ABORTED = "aborted"


@dataclass(slots=True)
class Roll(Generic[T]):
    """One rolling restart to ``generation``: per index, a new worker listens before the old goes.

    NEXT -> STARTING -(started)-> WAITING -(new listens)-> Retire old -> NEXT ... -> DONE.
    A new worker that dies, leaves or does not listen within ``timeout_s``
    ABORTS the roll, and so does a failed fork: the arbiter then restores
    ``previous`` (what was in force before the reload). :meth:`advance`
    returns what to do now, in order.
    """

    generation: int
    timeout_s: float
    previous: T
    pending: deque[int] = field(default_factory=deque)
    phase: RollPhase = RollPhase.NEXT
    index: int = 0
    old_pid: int = 0
    new_pid: int = 0
    deadline: float = 0.0

    @classmethod
    def of(cls, indexes: Iterable[int], generation: int, timeout_s: float, previous: T) -> Roll[T]:
        return cls(generation, timeout_s, previous, deque(sorted(indexes)))

    def again(self, indexes: Iterable[int], generation: int) -> None:
        """A reload during a roll: every index again, to the new generation; a wait goes on."""
        self.generation, self.pending = generation, deque(sorted(indexes))

    @classmethod
    def reload(
        cls,
        roll: Roll[T] | None,
        indexes: Iterable[int],
        generation: int,
        timeout_s: float,
        previous: T,
    ) -> Roll[T]:
        """The roll a reload (SIGHUP) asks for: a new one, or the one under way :meth:`again`
        (it keeps the ``previous`` of its start: an abort restores what ran before any reload)."""
        if roll is None:
            return cls.of(indexes, generation, timeout_s, previous)
        roll.again(indexes, generation)
        return roll

    def advance(self, now: float, workers: Mapping[int, WorkerView]) -> list[RollAction]:
        """The next actions, given the live workers by pid (the arbiter's view right now)."""
        actions: list[RollAction] = []
        if self.phase is RollPhase.WAITING:
            new = workers.get(self.new_pid)
            if new is None or new.leaving:
                return self._abort(f"new worker {self.index} exited before it was listening")
            if not new.ready:
                if now > self.deadline:
                    reason = f"new worker {self.index} was not listening in time"
                    return self._abort(reason, kill=self.new_pid)
                return []
            if self.old_pid in workers:
                actions.append(Retire(self.old_pid))
            self.phase = RollPhase.NEXT
        if self.phase is not RollPhase.NEXT:
            return actions
        retired = {a.pid for a in actions if isinstance(a, Retire)}  # leaving from now on
        while self.pending:
            index = self.pending.popleft()
            old = [
                w.pid
                for w in workers.values()
                if w.index == index
                and not w.leaving
                and w.pid not in retired
                and w.generation < self.generation
            ]
            if old:
                self.phase, self.index, self.old_pid = RollPhase.STARTING, index, old[0]
                actions.append(StartNew(index))
                return actions
        self.phase = RollPhase.DONE
        actions.append(Done())
        return actions

    def started(self, new_pid: int | None, now: float) -> list[RollAction]:
        """The arbiter forked the StartNew worker (``None``: the fork failed)."""
        if new_pid is None:
            return self._abort(f"cannot fork a new worker {self.index}")
        self.phase, self.new_pid, self.deadline = RollPhase.WAITING, new_pid, now + self.timeout_s
        return []

    def _abort(self, reason: str, kill: int | None = None) -> list[RollAction]:
        self.phase = RollPhase.ABORTED
        self.pending.clear()
        return [Abort(reason, kill)]
