"""A TCP relay on 127.0.0.1 between a worker and its nats-server that a test cuts and restores.

Stopping a nats-server drops every client's link at once and leaves the moment
the worker gets back to chance (its reconnect timer against the server's
start). Through a relay the worker's link is down for exactly as long as the
test wants, while the test keeps publishing to the real server directly: "what
was published while the link was down" is deterministic.
"""

from __future__ import annotations

import asyncio
import contextlib

from fanout.embedded_nats import free_port

#: Bytes read per hop.
CHUNK = 65536


class Relay:
    """Accepts on ``port`` and pipes each connection to ``127.0.0.1:target`` and back."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen (again, on the same port after :meth:`cut`)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def cut(self) -> None:
        """Drop every relayed connection and refuse new ones until :meth:`start`."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await src.read(CHUNK):
                dst.write(data)
                await dst.drain()
        dst.close()
        self._writers.discard(dst)
