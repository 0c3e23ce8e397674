"""Logs of a real `fanout serve`: debug connection lines, repeated NATS failures summarised."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fanout.devtoken import make_token
from fanout.embedded_nats import EmbeddedNats, free_port
from tests.conftest import Gateway
from tests.helpers import wait_for
from tests.integration.wsclient import WsClient, raw_handshake

Line = dict[str, Any]


def json_lines(gw: Gateway) -> list[Line]:
    out = []
    for text in gw.logs().splitlines():
        if text.startswith("{"):
            out.append(json.loads(text))
    return out


def logged(gw: Gateway, enough: Callable[[list[Line]], bool], what: str) -> list[Line]:
    """The gateway's JSON log lines once ``enough`` holds of them; the whole log if never."""

    def lines() -> list[Line]:
        found = json_lines(gw)
        return found if enough(found) else []

    try:
        return wait_for(lines, 30.0, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{gw.logs()}") from None


async def test_debug_shows_each_connection_opened_and_closed(
    nats_server: EmbeddedNats, keypair: tuple[Path, Path], make_gateway: Any
) -> None:
    private, public = keypair
    gw: Gateway = make_gateway(
        "--workers",
        "1",
        "--log-level",
        "debug",
        NATS_URLS=nats_server.url,
        JWT_PUBLIC_KEY=str(public),
        FANOUT_LOG_FORMAT="json",
    )
    token = make_token(
        private_key_pem=private.read_bytes(), sub="alice", subjects=["xy.md.>"], ttl_s=600
    )
    client = await WsClient.connect(gw.ws, token)
    assert (await client.subscribe("xy.md.a"))["op"] == "ack"
    await client.close()
    sock, head = raw_handshake(gw.port, token=token)
    assert head.startswith(b"HTTP/1.1 101")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a reset, no close frame: 1006

    def conn_lines(lines: list[Line]) -> list[Line]:
        return [x for x in lines if x["msg"] in ("connection opened", "connection closed")]

    found = conn_lines(
        logged(gw, lambda lines: len(conn_lines(lines)) >= 4, "two connections opened and closed")
    )
    assert [x["msg"] for x in found] == ["connection opened", "connection closed"] * 2
    for line in found:
        assert line["level"] == "debug" and line["worker"] == 1
        assert (line["peer"], line["principal"]) == ("127.0.0.1", "alice")
        assert isinstance(line["duration_s"], float) and line["duration_s"] >= 0
    first_open, first_close, second_open, second_close = found
    assert first_open["logger"] == "fanout.handshake" and "close_code" not in first_open
    assert first_close["conn"] == first_open["conn"] != second_open["conn"]
    assert (first_close["logger"], first_close["close_code"], first_close["reason"]) == (
        "fanout.conn",
        1000,
        "by client",
    )
    assert (second_close["conn"], second_close["close_code"]) == (second_open["conn"], 1006)
    assert second_close["reason"]


def test_unreachable_nats_logs_a_bounded_number_of_lines_and_a_summary(
    make_gateway: Any,
) -> None:
    gw: Gateway = make_gateway(
        "--workers",
        "1",
        wait_ready=False,
        NATS_URLS=f"nats://127.0.0.1:{free_port()}",
        FANOUT_WS_AUTH_REQUIRED="false",
        FANOUT_NATS_RECONNECT_WAIT_S="0.1",
        FANOUT_LOG_FORMAT="json",
    )
    # The worker says it is ready only after nats.connect_timeout_s + 1 s of failures.
    logged(gw, lambda lines: any(x["msg"] == "worker ready" for x in lines), "worker ready")
    assert gw.stop() == 0
    lines = [x for x in json_lines(gw) if x["logger"] == "fanout.nats"]
    failed = [x for x in lines if x["msg"] == "NATS connect failed"]
    summaries = [x for x in lines if x["msg"].startswith("NATS connect failed … repeated ")]
    assert len(failed) == 1 and failed[0]["code"] == "XYW004"
    assert summaries and all(x["code"] == "XYW004" for x in summaries)
    repeated = sum(x["repeated"] for x in summaries)
    assert repeated >= 5  # ≥ 2 s of attempts every 0.1 s, in a handful of lines
    for x in summaries:
        assert (
            x["msg"] == f"NATS connect failed … repeated {x['repeated']} times in {x['seconds']} s"
        )
    assert len(lines) <= 8
