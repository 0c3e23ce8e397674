"""Token lifetime on an in-process worker: ``expiring`` then 4005 on the scripted wall clock,
``auth`` renewal and its refusals, the denylist at the handshake (no processes, no waiting)."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization

from fanout.core.auth import AuthError, KeySet
from fanout.errors import Close
from fanout.worker.revocation import Denylist
from tests.inproc import Client, InProc, make_settings

LEAD_S = 60
LEEWAY_S = 5


def worker(keypair: tuple[Path, Path], **overrides: Any) -> InProc:
    public = str(keypair[1])
    settings = make_settings(
        **{
            "jwt.public_key": public,
            "jwt.expiring_lead_s": LEAD_S,
            "jwt.leeway_s": LEEWAY_S,
            **overrides,
        }
    )
    w = InProc(settings, KeySet.from_pem(public))
    w.hub.nats_up = True
    return w


@functools.cache
def signing_key(path: Path) -> Any:
    """Loaded once: loading an RSA key checks it, which costs more than a test here."""
    return serialization.load_pem_private_key(path.read_bytes(), None)


def tok(
    keypair: tuple[Path, Path],
    sub: str,
    ttl: int,
    subjects: list[str] | None = None,
    now: float | None = None,
    **extra: Any,
) -> str:
    iat = int(time.time() if now is None else now)
    claims = {
        "sub": sub,
        "subjects": ["xy.md.>"] if subjects is None else subjects,
        "iat": iat,
        "exp": iat + ttl,
        **extra,
    }
    return pyjwt.encode(claims, signing_key(keypair[0]), "RS256")


def exp_of(token: str) -> int:
    exp = pyjwt.decode(token, options={"verify_signature": False})["exp"]
    assert isinstance(exp, int)
    return exp


def until(w: InProc, wall: float) -> None:
    """Advance the scripted wall clock to ``wall``, then run the sweep."""
    w.clock.advance(wall - w.clock.wall())
    w.sweep()


async def op(w: InProc, client: Client, frame: dict[str, Any]) -> list[dict[str, Any]]:
    """Send one op and return what came back once the loop ran (``auth`` runs in a task)."""
    client.send(frame)
    await w.turn()
    return client.received()


async def test_expiring_notice_at_the_lead_then_4005_at_exp_plus_leeway(
    keypair: tuple[Path, Path],
) -> None:
    w = worker(keypair)
    token = tok(keypair, "short", ttl=600)
    exp = exp_of(token)
    client = await w.connect(token)
    assert client.received()[0]["expires_at"] == exp
    until(w, exp - LEAD_S - 1)
    assert client.received() == []
    until(w, exp - LEAD_S + 1)
    assert client.received() == [{"op": "expiring", "expires_at": exp}]
    until(w, exp - 1)
    assert client.received() == [], "the notice is sent once"
    until(w, exp + LEEWAY_S - 1)
    client.frames()
    assert client.close_code is None, "the leeway holds past exp"
    until(w, exp + LEEWAY_S)
    client.frames()
    assert client.close_code == Close.TOKEN_EXPIRED


async def test_auth_renews_and_reapplies_the_acl(keypair: tuple[Path, Path]) -> None:
    w = worker(keypair)
    old = tok(keypair, "renew", ttl=120)
    client = await w.connect(old)
    client.received()
    client.send(
        {"op": "sub", "id": 1, "subject": "xy.md.keep.x"},
        {"op": "sub", "id": 2, "subject": "xy.md.lose.x"},
    )
    assert client.received() == [{"op": "ack", "id": 1}, {"op": "ack", "id": 2}]
    fresh = tok(keypair, "renew", ttl=600, subjects=["xy.md.keep.>"])
    assert await op(w, client, {"op": "auth", "id": 3, "token": fresh}) == [
        {"op": "unsubscribed", "subject": "xy.md.lose.x", "code": "XYW002"},
        {"op": "ack", "id": 3, "expires_at": exp_of(fresh)},
    ]
    assert list(client.conn.subs) == ["xy.md.keep.x"]
    until(w, exp_of(old) + LEEWAY_S + 1)
    client.frames()
    assert client.close_code is None, "the new token rules"
    denied = await op(w, client, {"op": "sub", "id": 5, "subject": "xy.md.lose.y"})
    assert [(f["op"], f["code"]) for f in denied] == [("error", "XYW002")]


async def test_renewal_inside_the_lead_time_is_not_nagged_every_second(
    keypair: tuple[Path, Path],
) -> None:
    w = worker(keypair)
    client = await w.connect(tok(keypair, "nag", ttl=30))
    client.received()
    w.sweep()
    assert [f["op"] for f in client.received()] == ["expiring"]
    renewed = tok(keypair, "nag", ttl=40)
    assert (await op(w, client, {"op": "auth", "id": 1, "token": renewed}))[0]["op"] == "ack"
    for _ in range(int(exp_of(renewed) + LEEWAY_S - w.clock.wall()) + 1):
        w.clock.advance(1)
        w.sweep()
        assert [f for f in client.received() if f.get("op") == "expiring"] == []
    client.frames()
    assert client.close_code == Close.TOKEN_EXPIRED


@pytest.mark.parametrize("case", ["different sub", "expired token", "revoked jti", "garbage"])
async def test_refused_auth_keeps_the_old_token(case: str, keypair: tuple[Path, Path]) -> None:
    w = worker(keypair)
    w.gateway.denylist = Denylist(frozenset({"revoked-1"}))
    client = await w.connect(tok(keypair, "alice", ttl=600))
    client.received()
    new = {
        "different sub": tok(keypair, "mallory", ttl=600),
        "expired token": tok(keypair, "alice", ttl=60, now=time.time() - 600),
        "revoked jti": tok(keypair, "alice", ttl=600, jti="revoked-1"),
        "garbage": "not-a-token",
    }[case]
    [reply] = await op(w, client, {"op": "auth", "id": 9, "token": new})
    assert (reply["op"], reply["code"], reply["id"]) == ("error", "XYW005", 9)
    assert client.conn.principal is not None and client.conn.principal.sub == "alice"
    assert await op(w, client, {"op": "sub", "id": 11, "subject": "xy.md.still"}) == [
        {"op": "ack", "id": 11}
    ]


async def test_anonymous_may_authenticate_once(keypair: tuple[Path, Path]) -> None:
    w = worker(keypair, **{"ws.auth_required": False})
    client = await w.connect()
    assert client.received()[0]["expires_at"] is None
    first = tok(keypair, "carol", ttl=600)
    assert await op(w, client, {"op": "auth", "id": 1, "token": first}) == [
        {"op": "ack", "id": 1, "expires_at": exp_of(first)}
    ]
    [other] = await op(w, client, {"op": "auth", "id": 2, "token": tok(keypair, "dave", ttl=600)})
    assert (other["code"], other["id"]) == ("XYW005", 2)
    again = tok(keypair, "carol", ttl=900)
    [ack] = await op(w, client, {"op": "auth", "id": 3, "token": again})
    assert ack == {"op": "ack", "id": 3, "expires_at": exp_of(again)}
    assert w.gateway.per_principal == {"carol": 1}


async def test_revoked_jti_and_missing_token_are_refused_at_the_handshake(
    keypair: tuple[Path, Path],
) -> None:
    w = worker(keypair)
    w.gateway.denylist = Denylist(frozenset({"revoked-1"}))
    with pytest.raises(AuthError) as revoked:
        await w.connect(tok(keypair, "alice", ttl=600, jti="revoked-1"))
    assert (revoked.value.status, revoked.value.code, revoked.value.message) == (
        401,
        "XYW005",
        "token revoked",
    )
    with pytest.raises(AuthError) as missing:
        await w.connect()
    assert (missing.value.status, missing.value.code) == (401, "XYW001")
    assert w.hub.connections == set()
