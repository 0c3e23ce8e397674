"""Hostile frames on a live connection: subject injection, malformed frames, floods.

A request the gateway can answer gets an ``error`` frame with the exact code
(and the op's ``id`` when it could be read) and the connection stays; bytes
that break RFC 6455 or a limit get the exact close code. After every case the
neighbour must still have every message. Cases and answers: docs/security.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.conftest import Gateway
from tests.security.hostile import (
    Neighbour,
    Signer,
    client_frame,
    close_code,
    connect_raw,
    fresh_ip,
    open_ws,
    read_json,
    text,
    upgrade_request,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

MIB = 1 << 20


def sub(subject: str, op_id: int = 7) -> list[bytes]:
    return [text({"op": "sub", "id": op_id, "subject": subject})]


# -- subject protocol injection: error XYW002, connection stays ----------------------------
SUBJECTS = {
    "CRLF injection": "xy.md.a\r\nSUB xy.> 99",
    "bare LF": "xy.md.a\nPUB evil 1",
    "tab": "xy.md.a\tb",
    "space": "xy.md.a b",
    "NUL": "xy.md.a\x00b",
    "U+2028 line separator": "xy.md.a\u2028b",
    "U+0085 next line": "xy.md.a\u0085b",
    "U+00A0 no-break space": "xy.md.a\u00a0b",
    "U+200B zero-width space": "xy.md.a\u200bb",
    "empty token": "xy..md",
    "trailing dot": "xy.md.",
    "leading dot": ".xy.md.a",
    "'>' in the middle": "xy.md.>.a",
    "'*' inside a token": "xy.md.a*",
    "full wildcard below the whitelist": "xy.md.>",
    "outside the whitelist": "orders.secret",
    "parent of the whitelist": "xy.md",
    "257-byte subject": "xy.md." + "a" * 251,
    "64 KiB subject": "xy.md." + "a" * 65_536,
}


@pytest.mark.parametrize("name", list(SUBJECTS), ids=list(SUBJECTS))
async def test_subject_injection(
    name: str, gw: Gateway, signer: Signer, neighbour: Neighbour
) -> None:
    ws = await open_ws(gw.port, signer)
    try:
        ws.writer.write(sub(SUBJECTS[name])[0])
        [error] = await read_json(ws.reader)
        assert (error["op"], error["code"], error["id"]) == ("error", "XYW002", 7), error
        ws.writer.write(text({"op": "sub", "id": 8, "subject": "xy.md.fine"}))
        assert await read_json(ws.reader) == [{"op": "ack", "id": 8}]
    finally:
        ws.close()
    await neighbour.check()


async def test_unsub_of_an_injected_subject_is_a_harmless_ack(
    gw: Gateway, signer: Signer, neighbour: Neighbour
) -> None:
    ws = await open_ws(gw.port, signer)
    try:
        ws.writer.write(text({"op": "unsub", "id": 3, "subject": "xy.md.a\r\nUNSUB 1"}))
        assert await read_json(ws.reader) == [{"op": "ack", "id": 3}]
    finally:
        ws.close()
    await neighbour.check()


# -- frames and floods ---------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """``frames()`` → the bytes to send; then either an error frame or a close code."""

    frames: Callable[[], list[bytes]]
    error: tuple[str, int | None] | None = None  # (code, id) of the error frame
    close: int | None = None


def raw(payload: bytes, opcode: int = 0x1) -> Callable[[], list[bytes]]:
    return lambda: [client_frame(opcode, payload)]


def many(frame: Callable[[int], bytes], count: int) -> Callable[[], list[bytes]]:
    return lambda: [b"".join(frame(i) for i in range(count))]


def fragmented(payload: bytes, parts: int) -> Callable[[], list[bytes]]:
    def build() -> list[bytes]:
        size = -(-len(payload) // parts)
        chunks = [payload[i : i + size] for i in range(0, len(payload), size)]
        out = [
            client_frame(0x1 if i == 0 else 0x0, c, fin=i == len(chunks) - 1)
            for i, c in enumerate(chunks)
        ]
        return [b"".join(out)]

    return build


def batch(ops: list[dict[str, object]]) -> bytes:
    return client_frame(0x1, json.dumps(ops, separators=(",", ":")).encode())


SUBS_1000 = [{"op": "sub", "id": i, "subject": f"xy.md.many.{i}"} for i in range(1, 1001)]

FRAMES = {
    "invalid JSON": Case(raw(b"{not json"), error=("XYW008", None)),
    "JSON scalar": Case(raw(b"42"), error=("XYW008", None)),
    "unknown op": Case(raw(b'{"op":"launch","id":4}'), error=("XYW008", 4)),
    "unknown field": Case(raw(b'{"op":"ping","id":4,"admin":true}'), error=("XYW008", 4)),
    "wrong type (subject a number)": Case(
        raw(b'{"op":"sub","id":4,"subject":12}'), error=("XYW008", 4)
    ),
    "id is a string": Case(raw(b'{"op":"ping","id":"4"}'), error=("XYW008", None)),
    "id beyond 2^53": Case(raw(b'{"op":"ping","id":9007199254740993}'), error=("XYW008", None)),
    "empty batch": Case(raw(b"[]"), error=("XYW008", None)),
    "batch of 1001 ops": Case(
        lambda: [batch([{"op": "ping", "id": i} for i in range(1001)])], error=("XYW008", None)
    ),
    "deeply nested JSON (100k levels)": Case(
        raw(b"[" * 100_000 + b"]" * 100_000), error=("XYW008", None)
    ),
    "nested value inside an op": Case(
        raw(b'{"op":"sub","id":4,"subject":' + b"[" * 5000 + b"]" * 5000 + b"}"),
        error=("XYW008", None),
    ),
    "binary frame": Case(raw(b"\x00\x01\x02", opcode=0x2), close=1003),
    "invalid UTF-8": Case(raw(b'{"op":"ping","id":1,"x":"\xc3\x28"}'), close=1007),
    "1 MiB + 1 frame": Case(raw(b"x" * (MIB + 1)), close=1009),
    "1 MiB + 1 over two fragments": Case(fragmented(b"x" * (MIB + 1), 2), close=1009),
    "unmasked frame": Case(lambda: [client_frame(0x1, b"{}", masked=False)], close=1002),
    "reserved bits set": Case(lambda: [client_frame(0x1, b"{}", rsv=4)], close=1002),
    "control frame over 125 bytes": Case(raw(b"p" * 126, opcode=0x9), close=1002),
    "fragmented control frame": Case(lambda: [client_frame(0x9, b"p", fin=False)], close=1002),
    "continuation without a start": Case(raw(b"{}", opcode=0x0), close=1002),
    "new message inside a fragmented one": Case(
        lambda: [client_frame(0x1, b"[", fin=False) + client_frame(0x1, b"{}")], close=1002
    ),
    "unknown opcode 0x3": Case(raw(b"{}", opcode=0x3), close=1002),
    "close code 999": Case(raw((999).to_bytes(2, "big"), opcode=0x8), close=1002),
    "close payload of one byte": Case(raw(b"\x03", opcode=0x8), close=1002),
    # floods: every op, batch element and control frame spends the inbound budget
    "ping op flood (1100 frames)": Case(
        many(lambda i: text({"op": "ping", "id": i}), 1100), close=1008
    ),
    "WebSocket ping flood (1100)": Case(many(lambda i: client_frame(0x9, b"hi"), 1100), close=1008),
    "unsolicited pong flood (1100)": Case(
        many(lambda i: client_frame(0xA, b"hi"), 1100), close=1008
    ),
    "1 MiB message in 1024 fragments counts once": Case(
        fragmented(b'{"op":"ping","id":1,"pad":"' + b"x" * (MIB - 29) + b'"}', 1024),
        error=("XYW008", 1),
    ),
    "invalid UTF-8 in the first fragment": Case(
        lambda: [client_frame(0x1, b'{"op":"ping","id":1,"x":"\xc3\x28', fin=False)], close=1007
    ),
    "fragmented flood (1100 one-byte fragments)": Case(
        fragmented(b'{"op":"ping","id":1,"pad":"' + b"x" * 1071 + b'"}', 1100), close=1008
    ),
    "sub/unsub storm (600 pairs)": Case(
        many(
            lambda i: text(
                {"op": "sub" if i % 2 == 0 else "unsub", "id": i, "subject": "xy.md.storm"}
            ),
            1200,
        ),
        close=1008,
    ),
    "10k subscriptions in 10 batches": Case(
        lambda: [
            b"".join(
                batch(
                    [
                        {"op": "sub", "id": n * 1000 + i, "subject": f"xy.md.k.{n}.{i}"}
                        for i in range(1000)
                    ]
                )
                for n in range(10)
            )
        ],
        close=1008,
    ),
}


@pytest.mark.parametrize("name", list(FRAMES), ids=list(FRAMES))
async def test_hostile_frame(name: str, gw: Gateway, signer: Signer, neighbour: Neighbour) -> None:
    case = FRAMES[name]
    ws = await open_ws(gw.port, signer)
    try:
        for chunk in case.frames():
            ws.writer.write(chunk)
        if case.close is not None:
            assert await close_code(ws.reader) == case.close
        else:
            assert case.error is not None
            errors = await read_json(ws.reader)
            assert [(e["op"], e["code"], e["id"]) for e in errors] == [("error", *case.error)]
            ws.writer.write(text({"op": "ping", "id": 99}))
            assert await read_json(ws.reader) == [{"op": "pong", "id": 99}]
    finally:
        ws.close()
    await neighbour.check()


async def test_bad_element_in_a_batch_costs_only_that_element(
    gw: Gateway, signer: Signer, neighbour: Neighbour
) -> None:
    ws = await open_ws(gw.port, signer)
    try:
        ws.writer.write(
            client_frame(0x1, b'[{"op":"ping","id":1},{"op":"nope","id":2},{"op":"ping","id":3}]')
        )
        replies = await read_json(ws.reader)
        assert [(r["op"], r["id"]) for r in replies] == [("pong", 1), ("error", 2), ("pong", 3)]
        assert replies[1]["code"] == "XYW008"
    finally:
        ws.close()
    await neighbour.check()


async def test_subscription_cap_answers_xyw007_and_keeps_the_connection(
    gw: Gateway, signer: Signer, neighbour: Neighbour
) -> None:
    ws = await open_ws(gw.port, signer)
    try:
        ws.writer.write(batch(SUBS_1000))
        acks = await read_json(ws.reader)
        assert acks == [{"op": "ack", "id": i} for i in range(1, 1001)]
        await asyncio.sleep(0.1)  # waits on the refill (100 ops/s): room for the next op
        ws.writer.write(text({"op": "sub", "id": 1001, "subject": "xy.md.one.more"}))
        [error] = await read_json(ws.reader)
        assert (error["code"], error["id"]) == ("XYW007", 1001)
        ws.writer.write(text({"op": "ping", "id": 1002}))
        assert await read_json(ws.reader) == [{"op": "pong", "id": 1002}]
    finally:
        ws.close()
    await neighbour.check()


async def test_frames_before_a_malformed_one_are_answered_before_the_close(
    gw: Gateway, signer: Signer, neighbour: Neighbour
) -> None:
    ws = await open_ws(gw.port, signer)
    try:
        ws.writer.write(
            text({"op": "sub", "id": 7, "subject": "xy.md.before.garbage"})
            + client_frame(0x1, b"{}", rsv=4)
        )
        assert await read_json(ws.reader) == [{"op": "ack", "id": 7}]
        assert await close_code(ws.reader) == 1002
    finally:
        ws.close()
    await neighbour.check()


async def test_a_client_still_flooding_pings_reads_1008(
    gw: Gateway, signer: Signer, neighbour: Neighbour
) -> None:
    """The close frame reaches a client that is still sending when the limit trips.

    The client reads slowly (small receive buffer, reads only after its flood), so the
    1008 is still queued in the gateway when the limit trips: closing the socket then,
    with the client's pings unread, would send a TCP reset that discards it.
    """
    reader, writer = await connect_raw(gw.port, rcvbuf=4096)
    try:
        writer.write(upgrade_request(gw.port, token=signer.token(), xff=fresh_ip()))
        await reader.readuntil(b"\r\n\r\n")
        await read_json(reader)  # welcome
        chunk = b"".join(client_frame(0x9, b"p" * 125) for _ in range(10))
        with contextlib.suppress(ConnectionError, TimeoutError):
            for _ in range(300):  # 3000 pings: the limit (burst 1000) trips a third of the way
                writer.write(chunk)
                async with asyncio.timeout(5):
                    await writer.drain()
        assert await close_code(reader, timeout=20) == 1008
    finally:
        writer.transport.abort()
    await neighbour.check()
