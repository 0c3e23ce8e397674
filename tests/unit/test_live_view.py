"""The live view's JSON (``/admin/state.json``), ``fanout top``'s table, and the worker's rates."""

from __future__ import annotations

import io

from fanout import top
from fanout.runtime import SupervisorState, WorkerState
from fanout.worker.admin import live_view
from fanout.worker.main import Rates

NOW = 1_000_000.0


def state(pid: int, index: int, **fields: object) -> WorkerState:
    values: dict[str, object] = {
        "pid": pid,
        "index": index,
        "started_at": NOW - 60,
        "heartbeat_at": NOW - 0.5,
        "listening": True,
        "draining": False,
        "clients": 10,
        "subscriptions": 30,
        "nats_connected": True,
        "nats_url": "nats://127.0.0.1:4222",
        "last_error_code": None,
        "loop_lag_s": 0.002,
        "generation": 0,
    }
    values.update(fields)
    return WorkerState(**values)  # type: ignore[arg-type]


SUPERVISOR = SupervisorState(
    pid=1, workers_wanted=2, generation=0, restarts={"signal": 1, "crash": 0}, updated_at=NOW
)


def test_totals_add_up_the_workers() -> None:
    states = [
        state(
            11,
            1,
            forwarded_per_s=100.0,
            dropped_per_s=1.5,
            outbox_max=7,
            rss_bytes=100,
            open_fds=20,
        ),
        state(
            12,
            2,
            clients=5,
            subscriptions=6,
            forwarded_per_s=50.0,
            outbox_max=3,
            rss_bytes=300,
            open_fds=30,
            nats_connected=False,
            loop_lag_s=0.25,
        ),
    ]
    view = live_view(states, SUPERVISOR, 1.0, NOW)
    assert view["totals"] == {
        "workers": 2,
        "clients": 15,
        "subscriptions": 36,
        "deliveriesPerSecond": 150.0,
        "dropsPerSecond": 1.5,
        "outboxMax": 7,
        "loopLagSeconds": 0.25,
        "rssBytes": 400,
        "openFds": 50,
        "natsConnected": 1,
    }
    assert [w["nats"] for w in view["workers"]] == ["connected", "down"]
    assert (view["status"], view["workersWanted"], view["restarts"]) == (
        "degraded",
        2,
        {"signal": 1},
    )


def test_no_worker_and_no_supervisor_file_is_still_an_answer() -> None:
    view = live_view([], None, 1.0, NOW)
    assert view["workers"] == [] and view["workersWanted"] is None and view["restarts"] == {}
    assert view["totals"]["workers"] == 0 and view["status"] == "degraded"


def test_rates_are_the_difference_between_two_heartbeats() -> None:
    rates = Rates()
    rates.measure(100, 4, 10.0)
    assert (rates.forwarded, rates.dropped) == (0.0, 0.0)  # one reading: no rate yet
    rates.measure(300, 5, 12.0)
    assert (rates.forwarded, rates.dropped) == (100.0, 0.5)
    rates.measure(300, 5, 13.0)
    assert (rates.forwarded, rates.dropped) == (0.0, 0.0)


def test_top_table_has_a_row_per_worker_and_totals() -> None:
    view = live_view(
        [state(11, 1, rss_bytes=50 << 20), state(12, 2, draining=True)], SUPERVISOR, 1.0, NOW
    )
    lines = top.render(view).splitlines()
    assert lines[0].startswith(f"fanout {view['version']}  status ok  workers 2/2  restarts 1")
    assert lines[2].split() == [
        "WORKER",
        "PID",
        "CLIENTS",
        "SUBS",
        "DELIV/S",
        "DROPS/S",
        "OUTBOX",
        "LAG",
        "ms",
        "RSS",
        "FDS",
        "NATS",
    ]
    assert lines[3].split()[:2] == ["1", "11"] and "50.0 MiB" in lines[3]
    assert lines[4].split()[-1] == "connected,draining"
    assert lines[5].split()[0] == "all" and lines[5].endswith("2/2 connected")


def test_top_once_without_a_listener_exits_1() -> None:
    out, err = io.StringIO(), io.StringIO()
    assert (
        top.run(
            "http://127.0.0.1:9/admin/state.json",
            once=True,
            as_json=True,
            interval=1.0,
            out=out,
            err=err,
        )
        == 1
    )
    assert out.getvalue() == ""
    assert err.getvalue().startswith(
        "fanout top: cannot read the admin listener: http://127.0.0.1:9/"
    )
