"""The supervisor's signals: handlers only enqueue; the main loop handles them one at a time.

``signal.set_wakeup_fd`` writes a byte to a self-pipe on every signal, so the
loop's ``select`` wakes up at once instead of at its next tick. Nothing runs
in a signal handler but ``deque.append``: no logging, no I/O, no re-entrancy.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections import deque
from collections.abc import Iterator
from types import FrameType

#: Every signal the supervisor handles; blocked around fork, reset in every child.
HANDLED = (
    signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
    signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD,
)  # fmt: skip


class SignalQueue:
    """SIG_QUEUE: signals received and not yet handled, and the self-pipe that wakes the loop."""

    def __init__(self) -> None:
        self._queue: deque[int] = deque()
        self._pipe: tuple[int, int] | None = None
        self._saved: dict[int, signal._HANDLER] = {}

    def install(self) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self._pipe = (read_fd, write_fd)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for sig in HANDLED:
            self._saved[sig] = signal.signal(sig, self._enqueue)

    def _enqueue(self, signum: int, frame: FrameType | None) -> None:
        self._queue.append(signum)

    def restore(self) -> None:
        """The handlers from before :meth:`install`; the self-pipe closed."""
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()
        if self._pipe is not None:
            signal.set_wakeup_fd(-1)
            self.close_pipe()

    def close_pipe(self) -> None:
        """In a fresh child: the parent's self-pipe is none of its business."""
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    def wait(self, timeout: float) -> None:
        """Sleep up to ``timeout`` s, less if a signal arrives."""
        if self._pipe is None:
            time.sleep(timeout)
            return
        readable, _, _ = select.select([self._pipe[0]], [], [], timeout)
        if readable:
            with contextlib.suppress(BlockingIOError):
                os.read(self._pipe[0], 4096)

    def pop_all(self) -> Iterator[signal.Signals]:
        """The queued signals in arrival order, including any that arrive meanwhile."""
        while self._queue:
            yield signal.Signals(self._queue.popleft())
