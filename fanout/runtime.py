"""The private state directory the supervisor and its workers share.

It is also prometheus-client's ``PROMETHEUS_MULTIPROC_DIR``. Files in it:

- ``worker-<pid>.json``: one :class:`WorkerState` per worker, rewritten in
  place (:class:`StateFile`, no new fd) from the worker's event loop every
  ``heartbeat_interval_s``. That
  write is the heartbeat: a blocked loop stops writing, and the supervisor
  notices. Any worker reads all of them to answer /healthz for the gateway.
- ``boot-error-<pid>.txt``: why a worker could not boot (it then exits 3).
- ``supervisor.json``: :class:`SupervisorState`, written by the supervisor.
- ``*.db``: prometheus-client's multiprocess files.

Apart from that directory, ``fanout serve`` holds one lock file per host:port
(:func:`lock_port`): SO_REUSEPORT would let a second supervisor on the same
port join the first one's listeners without a word.

Every other write goes to a temporary name first and is renamed into place, so
a reader sees a whole old file or a whole new one; torn or foreign files are
skipped (a torn worker file is read again first), never fatal.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import tempfile
from pathlib import Path

import msgspec

from fanout.errors import OperatorError
from fanout.settings import Settings

SUPERVISOR_FILE = "supervisor.json"
#: A worker's exit code when it cannot start (after :func:`write_boot_error`); the
#: supervisor counts it as ``boot_error`` and stops when no worker ever booted.
WORKER_BOOT_ERROR = 3
#: A stopping worker drains its clients for ``server.graceful_timeout_s``, then has
#: this long to exit before the supervisor SIGKILLs it.
EXIT_SLACK_S = 1.0
_WORKER_PREFIX = "worker-"
_BOOT_ERROR_PREFIX = "boot-error-"
#: What may be wiped at start: only files of ours (a misconfigured path must not cost data).
_OWN_SUFFIXES = (".json", ".db", ".txt", ".tmp")
#: Reads of a state file before it counts as torn (a worker rewrites it in place).
_READ_TRIES = 3


class WorkerState(msgspec.Struct, kw_only=True):
    """One worker's view of itself; ``heartbeat_at`` is wall-clock ``time.time()``."""

    pid: int
    index: int
    started_at: float
    heartbeat_at: float
    listening: bool
    draining: bool
    clients: int
    subscriptions: int
    nats_connected: bool
    nats_url: str | None
    last_error_code: str | None
    loop_lag_s: float
    generation: int
    shedding: bool = False
    #: For the live view (``fanout top``, ``/admin``): running totals, and the rates the
    #: worker measured between its last two heartbeats.
    forwarded_total: int = 0
    dropped_total: int = 0
    forwarded_per_s: float = 0.0
    dropped_per_s: float = 0.0
    outbox_max: int = 0
    rss_bytes: int = 0
    open_fds: int = 0


class SupervisorState(msgspec.Struct, kw_only=True):
    """What only the supervisor knows; workers export it (restart counter, wanted count)."""

    pid: int
    workers_wanted: int
    generation: int
    restarts: dict[str, int]
    updated_at: float


_encode = msgspec.json.Encoder().encode
_decode_worker = msgspec.json.Decoder(WorkerState).decode
_decode_supervisor = msgspec.json.Decoder(SupervisorState).decode


def http_shutdown_timeout(graceful_timeout_s: float) -> float:
    """aiohttp's wait for in-flight HTTP requests, which comes after the WebSocket drain.

    Half the exit slack (less with a shorter graceful timeout), never aiohttp's
    default 60 s: a worker that drained then exits before the supervisor's SIGKILL.
    """
    return min(graceful_timeout_s, EXIT_SLACK_S) / 2


def make_state_dir(base: str | os.PathLike[str] | None = None) -> Path:
    """A fresh, empty directory with mode 0700: ``base`` wiped and recreated, or a new temp dir.

    Refuses (RuntimeError) to wipe a directory holding anything but our own files,
    so a wrong path in a config file cannot delete someone's data.
    """
    if base is None:
        return Path(tempfile.mkdtemp(prefix="fanout-"))
    path = Path(base)
    if path.is_symlink():
        raise RuntimeError(f"{path} is a symlink; refusing to use it as the state directory")
    if path.exists():
        foreign = [
            entry.name
            for entry in path.iterdir()
            if entry.is_symlink() or not entry.is_file() or not entry.name.endswith(_OWN_SUFFIXES)
        ]
        if foreign:
            raise RuntimeError(
                f"{path} holds files that are not fanout's ({foreign[0]}); not wiping"
            )
        shutil.rmtree(path)
    path.mkdir(mode=0o700, parents=True)
    path.chmod(0o700)
    return path


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def state_path(state_dir: Path, pid: int) -> Path:
    return state_dir / f"{_WORKER_PREFIX}{pid}.json"


def write_state(state_dir: Path, state: WorkerState) -> None:
    _write_atomic(state_path(state_dir, state.pid), _encode(state))


class StateFile:
    """A worker's own state file, opened once: the heartbeat must never need a new fd.

    With the fd table full (EMFILE) an atomic write-and-rename cannot even open
    its temporary file, and a worker that stops beating is killed by the
    supervisor. So the file is rewritten in place through the one descriptor
    opened at start; shorter contents are padded with spaces (valid JSON) so
    the file never shrinks. A reader that catches a write half done sees
    invalid JSON and reads again (:func:`read_state`).
    """

    def __init__(self, state_dir: Path, pid: int) -> None:
        self._fd = os.open(
            state_path(state_dir, pid), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
        )
        self._size = 0

    def write(self, state: WorkerState) -> None:
        data = _encode(state)
        if len(data) < self._size:
            data = data.ljust(self._size)
        os.pwrite(self._fd, data, 0)
        self._size = len(data)

    def close(self) -> None:
        os.close(self._fd)


def read_state(state_dir: Path, pid: int) -> WorkerState | None:
    """The state file of ``pid``, or None when it is missing, torn or not that pid's.

    A worker rewrites its file in place (:class:`StateFile`): a read that
    overlaps a write may be torn, so a torn read is retried a few times.
    """
    path = state_path(state_dir, pid)
    for _ in range(_READ_TRIES):
        try:
            state = _decode_worker(path.read_bytes())
        except OSError:
            return None
        except msgspec.DecodeError:
            continue
        return state if state.pid == pid else None
    return None


def read_states(state_dir: Path) -> list[WorkerState]:
    """Every readable state file whose process is alive, by worker index."""
    states = []
    for path in state_dir.glob(f"{_WORKER_PREFIX}*.json"):
        pid_text = path.name[len(_WORKER_PREFIX) : -len(".json")]
        if not pid_text.isdigit():
            continue
        state = read_state(state_dir, int(pid_text))
        if state is not None and pid_alive(state.pid):
            states.append(state)
    return sorted(states, key=lambda s: (s.index, s.started_at))


def remove_state(state_dir: Path, pid: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        state_path(state_dir, pid).unlink()


def write_boot_error(state_dir: Path, reason: str) -> None:
    """Called by a worker just before it exits with :data:`WORKER_BOOT_ERROR`."""
    _write_atomic(state_dir / f"{_BOOT_ERROR_PREFIX}{os.getpid()}.txt", reason.encode())


def pop_boot_error(state_dir: Path, pid: int) -> str | None:
    """The boot error ``pid`` left behind (first line, stripped), removing the file."""
    path = state_dir / f"{_BOOT_ERROR_PREFIX}{pid}.txt"
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    path.unlink(missing_ok=True)
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else None


def write_supervisor_state(state_dir: Path, state: SupervisorState) -> None:
    _write_atomic(state_dir / SUPERVISOR_FILE, _encode(state))


def read_supervisor_state(state_dir: Path) -> SupervisorState | None:
    try:
        return _decode_supervisor((state_dir / SUPERVISOR_FILE).read_bytes())
    except (OSError, msgspec.DecodeError):
        return None


def read_restarts(state_dir: Path) -> dict[str, int]:
    """Worker restarts by reason since the supervisor started (empty if unknown)."""
    state = read_supervisor_state(state_dir)
    return dict(state.restarts) if state is not None else {}


class PortTaken(OperatorError):
    """Another ``fanout serve`` holds this host:port; the message names it and its pid."""


def lock_dir() -> Path:
    """Where serve locks live: per user, in ``$XDG_RUNTIME_DIR`` or else ``/tmp``.

    Not ``$TMPDIR``: every ``fanout serve`` of this user must find the same
    file, whatever its environment.
    """
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime_dir) / "fanout" if runtime_dir else Path(f"/tmp/fanout-{os.getuid()}")


def hold_ports(settings: Settings, fresh_dir: Path) -> tuple[int | None, int | None]:
    """The public and the admin port's serve locks; PortTaken names the holder.

    On refusal ``fresh_dir`` (the empty state directory ``fanout serve`` made) goes.
    """
    server, admin = settings.server, settings.admin
    try:
        return hold_port(server.host, server.port), hold_port(admin.host, admin.port, "admin.port")
    except PortTaken:
        with contextlib.suppress(OSError):
            fresh_dir.rmdir()
        raise


def hold_port(host: str, port: int, setting: str = "") -> int | None:
    """The serve lock of a fixed port (None for port 0: ephemeral public ports, admin off).

    ``setting`` (``admin.port``) prefixes the message when the port is not the public one.
    """
    if not port:
        return None
    prefix = f"{setting}: " if setting else ""
    try:
        return lock_port(host, port)
    except PortTaken as exc:
        raise PortTaken(f"{prefix}{exc}") from None
    except OSError as exc:
        raise PortTaken(f"{prefix}cannot take the lock of port {port}: {exc}") from None


def lock_port(host: str, port: int) -> int:
    """Take the serve lock of ``host:port`` for this process and its children; its fd.

    ``flock`` is released by the kernel when the last holder exits (forked
    workers inherit it: while one still serves the port, it stays taken).
    PortTaken names the holder's pid; OSError when the lock cannot be made.
    """
    directory = lock_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise OSError(f"{directory} is not a directory of this user")
    path = directory / f"serve-{host}-{port}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise PortTaken(
            f"port {port} on {host} is already served by the fanout supervisor pid {holder}"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
