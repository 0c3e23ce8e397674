"""The supervisor's rules without a fork: backoff, heartbeat verdict, boot-halt, scaling, the roll.

Time is a number the test chooses (a scripted clock); workers are plain records.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from fanout import runtime
from fanout.supervisor import policy
from fanout.supervisor.policy import (
    Abort,
    Backoff,
    Backoffs,
    BootWatch,
    Done,
    Heartbeat,
    Retire,
    Roll,
    RollAction,
    RollPhase,
    StartNew,
    Verdict,
)


@dataclass
class W:
    """A worker as the policy sees it."""

    pid: int
    index: int
    generation: int = 0
    started: float = 0.0
    ready: bool = True
    leaving: str | None = None


# -- backoff -----------------------------------------------------------------------------------


def test_backoff_doubles_from_a_tenth_of_a_second_up_to_ten() -> None:
    backoff, delays = Backoff(), []
    for _ in range(10):
        backoff.failed(now=100.0, uptime=1.0)
        delays.append(round(backoff.not_before - 100.0, 6))
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0]


@pytest.mark.parametrize(
    ("uptime", "delay"), [(0.0, 1.6), (29.999, 1.6), (30.0, 0.1), (3600.0, 0.1)]
)
def test_backoff_starts_afresh_after_thirty_seconds_of_life(uptime: float, delay: float) -> None:
    backoff = Backoff()
    for _ in range(4):
        backoff.failed(now=0.0, uptime=0.5)
    assert backoff.not_before == pytest.approx(0.8)
    backoff.failed(now=50.0, uptime=uptime)
    assert backoff.not_before - 50.0 == pytest.approx(delay)


def test_backoffs_allow_a_slot_once_its_delay_is_over() -> None:
    backoffs = Backoffs()
    assert backoffs.allows("worker 1", 0.0)  # never failed
    backoffs.failed("worker 1", 10.0, 0.0)
    assert [backoffs.allows("worker 1", t) for t in (10.0, 10.099, 10.1)] == [False, False, True]
    assert backoffs.allows("worker 2", 10.0)


@pytest.mark.parametrize(
    ("not_befores", "rolling", "timeout"),
    [
        ([], False, 0.25),
        ([], True, 0.05),
        ([10.1], False, 0.1),
        ([9.0, 10.2, 13.0], False, 0.2),  # a past one is ignored, the soonest wins
        ([10.001], False, 0.01),  # never a busy loop
        ([10.1], True, 0.05),
    ],
)
def test_the_loop_sleeps_until_the_next_backoff_at_most_one_tick(
    not_befores: list[float], rolling: bool, timeout: float
) -> None:
    backoffs = [Backoff(1, t) for t in not_befores]
    assert policy.tick_timeout(10.0, backoffs, rolling) == pytest.approx(timeout)


@pytest.mark.parametrize("graceful", [0.0, 0.2, 1.0, 2.5, 10.0, 60.0])
def test_a_draining_worker_finishes_before_the_supervisor_kills_it(graceful: float) -> None:
    worker_needs = graceful + runtime.http_shutdown_timeout(graceful)
    assert worker_needs < policy.stop_grace(False, graceful) == graceful + 1.0
    assert policy.stop_grace(True, graceful) == 1.0


# -- exits -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason", "fields", "words"),
    [
        (-signal.SIGKILL, "signal", {"signal": "SIGKILL"}, "was killed by SIGKILL"),
        (-signal.SIGSEGV, "signal", {"signal": "SIGSEGV"}, "was killed by SIGSEGV"),
        (-200, "signal", {"signal": "signal 200"}, "was killed by signal 200"),
        (0, "exit", {"exit_code": 0}, "exited with code 0"),
        (1, "crash", {"exit_code": 1}, "exited with code 1"),
        (3, "boot_error", {"exit_code": 3}, "exited with code 3"),
        (70, "crash", {"exit_code": 70}, "exited with code 70"),
    ],
)
def test_exit_codes_are_named(
    code: int, reason: str, fields: dict[str, object], words: str
) -> None:
    assert policy.describe_exit(code) == policy.ExitCause(reason, fields, words)  # type: ignore[arg-type]
    assert reason in policy.REASONS


# -- heartbeat ---------------------------------------------------------------------------------


def test_a_worker_gets_a_boot_grace_then_must_keep_beating() -> None:
    timeout = 1.0
    beat = Heartbeat(seen=0.0 + timeout)  # forked at t=0
    assert beat.verdict(2.0, timeout) is Verdict.ALIVE  # 2 x timeout: still in grace
    beat.observe(1000.5, now=1.5)  # first state file
    assert [beat.verdict(t, timeout) for t in (2.5, 2.501)] == [Verdict.ALIVE, Verdict.ABORT]
    beat.observe(1000.5, now=2.4)  # the same value again is no heartbeat
    assert beat.verdict(2.501, timeout) is Verdict.ABORT
    beat.observe(1001.0, now=2.4)
    assert beat.verdict(3.4, timeout) is Verdict.ALIVE


def test_a_silent_worker_is_never_given_a_first_state_file_past_its_grace() -> None:
    beat = Heartbeat(seen=5.0 + 1.0)
    assert [beat.verdict(t, 1.0) for t in (6.9, 7.0, 7.01)] == [
        Verdict.ALIVE,
        Verdict.ALIVE,
        Verdict.ABORT,
    ]


def test_sigabrt_then_sigkill_after_two_seconds_then_nothing() -> None:
    beat = Heartbeat(seen=0.0, aborted_at=10.0)
    verdicts = [beat.verdict(t, 1.0) for t in (10.0, 11.99, 12.0)]
    assert verdicts == [Verdict.WAIT, Verdict.WAIT, Verdict.KILL]
    beat.killed = True
    assert beat.verdict(100.0, 1.0) is Verdict.WAIT


# -- boot-halt ---------------------------------------------------------------------------------


@pytest.mark.parametrize("wanted", [1, 2, 3, 4])
def test_as_many_deaths_as_wanted_workers_before_any_listened_halt(wanted: int) -> None:
    watch = BootWatch()
    assert [watch.halts(wanted) for _ in range(wanted)] == [False] * (wanted - 1) + [True]


@pytest.mark.parametrize(("wanted", "deaths_before"), itertools.product([1, 2, 3], [0, 1, 2]))
def test_once_a_worker_listened_deaths_are_restarts(wanted: int, deaths_before: int) -> None:
    watch = BootWatch()
    for _ in range(min(deaths_before, wanted - 1)):
        assert not watch.halts(wanted)
    watch.listened()
    assert not any(watch.halts(wanted) for _ in range(10))


def test_the_halt_line_prefers_the_workers_own_reason() -> None:
    cause = policy.describe_exit(-signal.SIGKILL)
    own = policy.halt_reason("port 8080 is in use", 2, cause)
    assert own == "workers cannot boot: port 8080 is in use"
    assert policy.halt_reason(None, 2, cause) == (
        "workers cannot boot: worker 2 was killed by SIGKILL before it was listening"
    )


# -- scaling -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("wanted", "added"), [({1}, 2), ({1, 2, 3}, 4), ({1, 3}, 2), ({2, 3}, 1)])
def test_ttin_takes_the_lowest_free_index(wanted: set[int], added: int) -> None:
    assert policy.index_to_add(wanted) == added


def test_ttou_never_goes_below_one_worker() -> None:
    assert policy.index_to_drop({1}, [W(11, 1)]) is None


def test_ttou_drops_a_missing_worker_first_else_the_newest() -> None:
    live = [W(11, 1, started=5.0), W(12, 2, started=9.0), W(13, 3, started=7.0)]
    assert policy.index_to_drop({1, 2, 3}, live) == (2, 12)
    assert policy.index_to_drop({1, 2, 3, 4}, live) == (4, None)  # 4 backs off: no process
    leaving = [W(11, 1, started=5.0), W(12, 2, started=9.0, leaving="reload")]
    assert policy.index_to_drop({1, 2}, leaving) == (2, None)  # 2's worker is already going


# -- rolling restart ---------------------------------------------------------------------------

OUTCOMES = ("ready", "exits", "slow", "no_fork")


def drive(outcomes: Sequence[str]) -> tuple[list[RollAction], Roll[None]]:
    """A rolling restart of len(outcomes) workers, each new one behaving as its outcome says.

    Plays the arbiter: applies each action to a process table, then lets a second pass.
    """
    workers = {100 + i: W(100 + i, i) for i in range(1, len(outcomes) + 1)}
    roll = Roll.of(range(1, len(outcomes) + 1), generation=1, timeout_s=5.0, previous=None)
    done: list[RollAction] = []
    now, new_pid = 0.0, 200
    for _ in range(100):
        actions = roll.advance(now, workers)
        for action in actions:
            done.append(action)
            if isinstance(action, Retire):
                workers[action.pid].leaving = "reload"
            elif isinstance(action, StartNew):
                if outcomes[action.index - 1] == "no_fork":
                    actions += roll.started(None, now)
                    continue
                new_pid += 1
                workers[new_pid] = W(new_pid, action.index, generation=1, ready=False)
                actions += roll.started(new_pid, now)
            elif isinstance(action, Abort | Done):
                return done, roll
        now += 1.0
        for pid, w in list(workers.items()):
            if w.generation == 1 and not w.ready:
                outcome = outcomes[w.index - 1]
                if outcome == "ready":
                    w.ready = True
                elif outcome == "exits":
                    del workers[pid]
    raise AssertionError("the roll never ended")


@pytest.mark.parametrize(
    "outcomes",
    [o for n in (1, 2, 3) for o in itertools.product(OUTCOMES, repeat=n)],
    ids="-".join,
)
def test_rolling_restart_replaces_one_at_a_time_and_stops_at_the_first_failure(
    outcomes: tuple[str, ...],
) -> None:
    done, roll = drive(outcomes)
    expected: list[RollAction] = []
    for index, outcome in enumerate(outcomes, start=1):
        expected.append(StartNew(index))
        new_pid = 200 + index
        if outcome == "ready":
            expected.append(Retire(100 + index))  # only once its successor listens
            continue
        reason = {
            "exits": f"new worker {index} exited before it was listening",
            "slow": f"new worker {index} was not listening in time",
            "no_fork": f"cannot fork a new worker {index}",
        }[outcome]
        expected.append(Abort(reason, kill=new_pid if outcome == "slow" else None))
        assert done == expected
        assert roll.phase is RollPhase.ABORTED
        return
    assert done == [*expected, Done()]
    assert roll.phase is RollPhase.DONE


def test_a_new_worker_has_until_its_deadline_to_listen() -> None:
    workers = {11: W(11, 1)}
    roll = Roll.of([1], generation=1, timeout_s=5.0, previous=None)
    assert roll.advance(10.0, workers) == [StartNew(1)]
    workers[21] = W(21, 1, generation=1, ready=False)
    assert roll.started(21, 10.0) == []
    assert roll.phase is RollPhase.WAITING
    assert roll.advance(15.0, workers) == []  # at the deadline: still waiting
    assert roll.advance(15.01, workers) == [Abort("new worker 1 was not listening in time", 21)]


def test_indexes_without_an_old_worker_are_skipped() -> None:
    # worker 2 is backing off (no process) and worker 3 already runs the new generation
    workers = {11: W(11, 1), 33: W(33, 3, generation=1), 44: W(44, 4, leaving="scale_down")}
    roll = Roll.of([1, 2, 3, 4], generation=1, timeout_s=5.0, previous=None)
    assert roll.advance(0.0, workers) == [StartNew(1)]
    workers[21] = W(21, 1, generation=1)
    roll.started(21, 0.0)
    assert roll.advance(0.1, workers) == [Retire(11), Done()]


def test_an_old_worker_gone_meanwhile_is_not_retired() -> None:
    workers = {11: W(11, 1), 12: W(12, 2)}
    roll = Roll.of([1, 2], generation=1, timeout_s=5.0, previous=None)
    roll.advance(0.0, workers)
    workers[21] = W(21, 1, generation=1)
    roll.started(21, 0.0)
    del workers[11]  # it crashed while its successor was booting
    assert roll.advance(0.1, workers) == [StartNew(2)]


def test_a_reload_starts_a_roll_or_restarts_the_one_under_way_keeping_its_previous() -> None:
    first = Roll.reload(None, [2, 1], generation=1, timeout_s=5.0, previous="gen0")
    assert (first.generation, list(first.pending), first.previous) == (1, [1, 2], "gen0")
    first.pending.clear()
    again = Roll.reload(first, [1, 2], generation=2, timeout_s=9.0, previous="gen1")
    assert again is first
    assert (again.generation, list(again.pending), again.previous) == (2, [1, 2], "gen0")
    assert again.timeout_s == 5.0


def test_a_reload_during_a_roll_rolls_every_index_again_to_the_new_generation() -> None:
    workers = {11: W(11, 1), 12: W(12, 2)}
    roll = Roll.of([1, 2], generation=1, timeout_s=5.0, previous=None)
    roll.advance(0.0, workers)
    workers[21] = W(21, 1, generation=1, ready=False)
    roll.started(21, 0.0)
    Roll.reload(roll, [1, 2], generation=2, timeout_s=5.0, previous=None)  # SIGHUP while 21 boots
    assert roll.phase is RollPhase.WAITING
    workers[21].ready = True
    assert roll.advance(1.0, workers) == [Retire(11), StartNew(1)]  # 21 is generation 1 < 2
    workers[11].leaving = "reload"
    workers[31] = W(31, 1, generation=2)
    roll.started(31, 1.0)
    assert roll.advance(2.0, workers) == [Retire(21), StartNew(2)]
