"""The embedded nats-server as the supervisor's sidecar: started on need, restarted, stopped."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator

import msgspec
import pytest

from fanout.embedded_nats import LocalNats
from fanout.settings import Settings
from tests.helpers import wait_for


def accepts(url: str) -> bool:
    host, port = url.removeprefix("nats://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2) as conn:
            return conn.makefile("rb").readline().startswith(b"INFO {")
    except OSError:
        return False


@pytest.fixture
def sidecar() -> Iterator[LocalNats]:
    local = LocalNats()
    yield local
    local.stop()


def without_urls() -> Settings:
    settings = Settings()
    return msgspec.structs.replace(settings, nats=msgspec.structs.replace(settings.nats, urls=[]))


def test_configured_urls_start_nothing(sidecar: LocalNats) -> None:
    settings = Settings()
    configured = msgspec.structs.replace(settings.nats, urls=["nats://10.0.0.1:4222"])
    given = msgspec.structs.replace(settings, nats=configured)
    assert sidecar.settings_for_children(given) is given
    assert sidecar.server is None
    sidecar.check()  # nothing to watch


def test_children_get_one_server_started_on_need_and_restarted_when_it_dies(
    sidecar: LocalNats,
) -> None:
    first = sidecar.settings_for_children(without_urls())
    [url] = first.nats.urls
    assert url.startswith("nats://127.0.0.1:") and accepts(url)
    assert sidecar.settings_for_children(without_urls()).nats.urls == [url]  # one server
    server = sidecar.server
    assert server is not None and server.proc is not None
    killed = server.proc
    os.kill(killed.pid, signal.SIGKILL)
    wait_for(lambda: killed.poll() is not None, what="the killed nats-server to be reaped")
    assert not accepts(url)
    sidecar.check()
    assert accepts(url)  # the same url: workers reconnect on their own
    proc = server.proc
    sidecar.stop()
    assert sidecar.server is None and proc.poll() is not None
