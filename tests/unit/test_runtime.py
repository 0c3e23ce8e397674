"""The shared state directory: atomic state files, liveness filter, private dir."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fanout import runtime


def make_state(pid: int, index: int = 1, **changes: object) -> runtime.WorkerState:
    fields: dict[str, object] = {
        "pid": pid,
        "index": index,
        "started_at": 1700000000.25,
        "heartbeat_at": 1700000001.5,
        "listening": True,
        "draining": False,
        "clients": 12,
        "subscriptions": 30,
        "nats_connected": True,
        "nats_url": "nats://127.0.0.1:4222",
        "last_error_code": None,
        "loop_lag_s": 0.002,
        "generation": 0,
    }
    fields.update(changes)
    return runtime.WorkerState(**fields)  # type: ignore[arg-type]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return runtime.make_state_dir(tmp_path / "state")


@settings(max_examples=50, deadline=None)
@given(
    index=st.integers(1, 512),
    heartbeat=st.floats(0, 4e9, allow_nan=False),
    listening=st.booleans(),
    clients=st.integers(0, 1 << 31),
    url=st.none() | st.text(max_size=40),
    code=st.none() | st.sampled_from(["XYW004", "XYW009"]),
    generation=st.integers(0, 1 << 20),
)
def test_state_round_trips_through_the_file(
    tmp_path_factory: pytest.TempPathFactory,
    index: int,
    heartbeat: float,
    listening: bool,
    clients: int,
    url: str | None,
    code: str | None,
    generation: int,
) -> None:
    directory = runtime.make_state_dir(tmp_path_factory.mktemp("rt") / "s")
    state = make_state(
        os.getpid(),
        index,
        heartbeat_at=heartbeat,
        listening=listening,
        clients=clients,
        nats_url=url,
        last_error_code=code,
        generation=generation,
    )
    runtime.write_state(directory, state)
    assert runtime.read_states(directory) == [state]
    assert runtime.read_state(directory, os.getpid()) == state
    assert [p.name for p in directory.iterdir()] == [f"worker-{os.getpid()}.json"]


def test_torn_garbage_and_mismatched_files_are_skipped(state_dir: Path) -> None:
    me = os.getpid()
    good = make_state(me)
    runtime.write_state(state_dir, good)
    whole = runtime.state_path(state_dir, me).read_bytes()
    parent = os.getppid()
    runtime.state_path(state_dir, parent).write_bytes(whole[: len(whole) // 2])
    (state_dir / "worker-1.json").write_bytes(b"\x00\xff garbage")
    (state_dir / "worker-abc.json").write_bytes(whole)
    assert runtime.read_states(state_dir) == [good]
    runtime.state_path(state_dir, parent).write_bytes(whole)  # claims to be pid ``me``
    assert runtime.read_state(state_dir, parent) is None
    assert runtime.read_states(state_dir) == [good]


def test_dead_pids_are_ignored_and_removal_is_idempotent(state_dir: Path) -> None:
    gone = dead_pid()
    runtime.write_state(state_dir, make_state(gone, 2))
    runtime.write_state(state_dir, make_state(os.getpid(), 1))
    assert [s.pid for s in runtime.read_states(state_dir)] == [os.getpid()]
    runtime.remove_state(state_dir, os.getpid())
    runtime.remove_state(state_dir, os.getpid())
    assert runtime.read_states(state_dir) == []
    assert runtime.pid_alive(0) is False
    assert runtime.pid_alive(gone) is False
    assert runtime.pid_alive(1) is True


def test_states_are_sorted_by_index(state_dir: Path) -> None:
    runtime.write_state(state_dir, make_state(os.getpid(), 3))
    runtime.write_state(state_dir, make_state(os.getppid(), 1))
    assert [s.index for s in runtime.read_states(state_dir)] == [1, 3]


def test_state_dir_is_private_and_wiped(tmp_path: Path) -> None:
    fresh = runtime.make_state_dir()
    try:
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    finally:
        fresh.rmdir()
    base = tmp_path / "state"
    base.mkdir(mode=0o755)
    (base / "counter_123.db").write_bytes(b"x")
    (base / "worker-5.json").write_bytes(b"{}")
    made = runtime.make_state_dir(base)
    assert made == base
    assert stat.S_IMODE(base.stat().st_mode) == 0o700
    assert list(base.iterdir()) == []


@pytest.mark.parametrize("intruder", ["notes.md", "subdir"])
def test_state_dir_refuses_to_wipe_foreign_files(tmp_path: Path, intruder: str) -> None:
    base = tmp_path / "state"
    base.mkdir()
    (base / "worker-5.json").write_bytes(b"{}")
    if intruder == "subdir":
        (base / intruder).mkdir()
    else:
        (base / intruder).write_text("keep me")
    with pytest.raises(RuntimeError, match=intruder):
        runtime.make_state_dir(base)
    assert (base / intruder).exists()


def test_state_dir_refuses_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(RuntimeError, match="symlink"):
        runtime.make_state_dir(tmp_path / "link")


def test_boot_error_is_read_once(state_dir: Path) -> None:
    runtime.write_boot_error(state_dir, "  port 8080 is in use \nsecond line\n")
    assert runtime.pop_boot_error(state_dir, os.getpid()) == "port 8080 is in use"
    assert runtime.pop_boot_error(state_dir, os.getpid()) is None


def test_supervisor_state_and_restarts(state_dir: Path) -> None:
    assert runtime.read_restarts(state_dir) == {}
    state = runtime.SupervisorState(
        pid=os.getpid(),
        workers_wanted=4,
        generation=2,
        restarts={"signal": 1, "timeout": 0},
        updated_at=1700000000.5,
    )
    runtime.write_supervisor_state(state_dir, state)
    assert runtime.read_supervisor_state(state_dir) == state
    assert runtime.read_restarts(state_dir) == {"signal": 1, "timeout": 0}
    (state_dir / runtime.SUPERVISOR_FILE).write_bytes(b'{"pid": 1, "workers_')
    assert runtime.read_supervisor_state(state_dir) is None


def test_state_file_rewrites_in_place_through_one_descriptor(tmp_path: Path) -> None:
    """The heartbeat must not need a new fd (EMFILE): one open descriptor, same inode."""
    pid = os.getpid()
    state_file = runtime.StateFile(tmp_path, pid)
    try:
        state_file.write(make_state(pid, nats_url="nats://a-rather-long-host-name.example:4222"))
        inode = os.stat(runtime.state_path(tmp_path, pid)).st_ino
        fds = len(os.listdir("/proc/self/fd"))
        shorter = make_state(pid, nats_url=None, clients=3)
        state_file.write(shorter)
        assert len(os.listdir("/proc/self/fd")) == fds
        assert os.stat(runtime.state_path(tmp_path, pid)).st_ino == inode
        assert runtime.read_state(tmp_path, pid) == shorter  # padded, still valid JSON
    finally:
        state_file.close()


def test_serve_lock_is_exclusive_per_host_and_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    held = runtime.lock_port("127.0.0.1", 18080)
    try:
        other = subprocess.run(
            [
                sys.executable,
                "-c",
                "from fanout import runtime; runtime.lock_port('127.0.0.1', 18080)",
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)},
        )
        assert other.returncode == 1
        assert other.stderr.strip().splitlines()[-1] == (
            "fanout.runtime.PortTaken: port 18080 on 127.0.0.1 is already served by the "
            f"fanout supervisor pid {os.getpid()}"
        )
        os.close(runtime.lock_port("127.0.0.1", 18081))  # another port: free
    finally:
        os.close(held)
    assert stat.S_IMODE(os.stat(tmp_path / "fanout").st_mode) == 0o700
