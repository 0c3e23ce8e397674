"""TLS everywhere, for real: WSS terminated by the gateway, NATS over mTLS with NKey or creds.

A throwaway CA signs the nats-server's, the gateway's and the clients'
certificates; nats-server runs ``deploy/nats/nats-server.conf`` itself (TLS
``verify: true``, the gateway's least-privilege NKey user). Broken TLS or
credentials must stop the gateway at boot with one line naming the setting
(exit 2), and no secret may reach any output.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nkeys  # type: ignore[import-untyped]
import pytest
from nats.aio.client import Client as NatsClient

from fanout.devtoken import make_token
from fanout.embedded_nats import EmbeddedNats
from fanout.settings import Nats
from fanout.worker.nats_auth import NatsAuthError
from fanout.worker.nats_link import NatsLink
from tests.conftest import ROOT, Gateway, launch_gateway
from tests.helpers import async_wait_for, wait_for
from tests.integration import pki
from tests.integration.wsclient import WsClient, wait_for_interest

pytestmark = pytest.mark.slow  # boots a dozen gateways, some of them on purpose broken

DEPLOY = ROOT / "deploy" / "nats"


@dataclass(frozen=True)
class Pki:
    ca: pki.Pem
    server: pki.Pem
    client: pki.Pem
    other_ca: pki.Pem
    stranger: pki.Pem  # a client certificate signed by the other CA
    gateway_user: pki.NKey
    publisher: pki.NKey
    seed_file: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = pki.make_ca(d)
    other = pki.make_ca(d / "other", "other CA")
    gateway_user = pki.new_nkey(nkeys.PREFIX_BYTE_USER)
    seed_file = d / "gateway.nk"
    seed_file.write_text(gateway_user.seed + "\n")
    seed_file.chmod(0o600)
    return Pki(
        ca=ca,
        server=pki.issue(ca, d, "server"),
        client=pki.issue(ca, d, "client", client=True),
        other_ca=other,
        stranger=pki.issue(other, d / "other", "stranger", client=True),
        gateway_user=gateway_user,
        publisher=pki.new_nkey(nkeys.PREFIX_BYTE_USER),
        seed_file=seed_file,
    )


@pytest.fixture(scope="module")
def nats_tls(certs: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    """nats-server running the deploy config, forced to TLS 1.3; its variables come from the env.

    With TLS 1.3 the server checks the client certificate after the handshake
    has completed on the client's side: a refused certificate shows only on
    the first read (alert, broken pipe or reset). Forcing 1.3 makes the tests
    exercise that path on every machine.
    """
    conf_dir = tmp_path_factory.mktemp("nats-conf")
    for name in ("nats-server.conf", "gateway-account.conf"):
        shutil.copy(DEPLOY / name, conf_dir / name)
    conf = conf_dir / "nats-server.conf"
    deploy_tls = "tls {\n"
    assert conf.read_text().count(deploy_tls) == 1
    conf.write_text(conf.read_text().replace(deploy_tls, deploy_tls + '  min_version: "1.3"\n'))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NATS_SERVER_CERT", str(certs.server.cert))
        mp.setenv("NATS_SERVER_KEY", str(certs.server.key))
        mp.setenv("NATS_CLIENT_CA", str(certs.ca.cert))
        mp.setenv("FANOUT_GATEWAY_NKEY", certs.gateway_user.public)
        mp.setenv("MARKET_PUBLISHER_NKEY", certs.publisher.public)
        server = EmbeddedNats(extra_args=["-c", str(conf_dir / "nats-server.conf")])
        server.start()
    try:
        yield server
    finally:
        server.stop()


def client_tls(certs: Pki, client: pki.Pem | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca.cert))
    if client is not None:
        ctx.load_cert_chain(str(client.cert), str(client.key))
    return ctx


@pytest.fixture
async def publisher(nats_tls: EmbeddedNats, certs: Pki) -> AsyncIterator[NatsClient]:
    nc = await nats.connect(
        f"tls://127.0.0.1:{nats_tls.port}",
        tls=client_tls(certs, certs.client),
        nkeys_seed_str=certs.publisher.seed,
    )
    yield nc
    await nc.close()


def gateway_env(certs: Pki, nats_port: int, public_key: Path, **extra: str) -> dict[str, Any]:
    env: dict[str, Any] = {
        "NATS_URLS": f"tls://127.0.0.1:{nats_port}",
        "NATS_TLS_CA": str(certs.ca.cert),
        "NATS_TLS_CERT": str(certs.client.cert),
        "NATS_TLS_KEY": str(certs.client.key),
        "NATS_NKEY_SEED": str(certs.seed_file),
        "JWT_PUBLIC_KEY": str(public_key),
        "FANOUT_TLS_CERT": str(certs.server.cert),
        "FANOUT_TLS_KEY": str(certs.server.key),
        "FANOUT_SERVER_HANDSHAKE_TIMEOUT_S": "2",
    }
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def wss_gateway(
    certs: Pki,
    nats_tls: EmbeddedNats,
    keypair: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Gateway]:
    env = gateway_env(certs, nats_tls.port, keypair[1])
    gw = launch_gateway(tmp_path_factory.mktemp("gw"), "--workers", "1", start=False, **env)
    start_over_tls(gw, certs)
    yield gw
    gw.stop()


def start_over_tls(gw: Gateway, certs: Pki, timeout: float = 20.0) -> None:
    """Like the conftest start(), but polls /readyz over https with our CA."""
    assert gw.log_path is not None
    gw.proc = subprocess.Popen(
        [sys.executable, "-m", "fanout.cli", "serve", *gw.args],
        env=gw.env,
        stdout=gw.log_path.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    proc = gw.proc

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited {proc.returncode}:\n{gw.logs()}")
        return https_status(gw.port, "/readyz", certs) == 200

    wait_for(ready, timeout, "the gateway ready over https")


def https_status(port: int, path: str, certs: Pki) -> int | None:
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=2) as raw,
            client_tls(certs).wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            head = tls.recv(4096)
            return int(head.split(b" ", 2)[1])
    except (OSError, ValueError, IndexError):
        return None


def token(keypair: tuple[Path, Path], sub: str = "tls-user") -> str:
    return make_token(
        private_key_pem=keypair[0].read_bytes(), sub=sub, subjects=["xy.md.>"], ttl_s=600
    )


async def test_wss_to_mtls_nats_with_nkey_end_to_end(
    wss_gateway: Gateway,
    certs: Pki,
    keypair: tuple[Path, Path],
    publisher: NatsClient,
) -> None:
    url = f"wss://localhost:{wss_gateway.port}/ws"
    client = await WsClient.connect(url, token(keypair), ssl=client_tls(certs))
    try:
        assert (await client.recv())["op"] == "welcome"
        assert await client.subscribe("xy.md.tls.a") == {"op": "ack", "id": 1}
        await wait_for_interest(publisher, client, "xy.md.tls.a")
        for i in range(20):
            await publisher.publish("xy.md.tls.a", f'{{"i":{i}}}'.encode())
        got = [
            (await client.expect(lambda f: f.get("op") == "msg" and "i" in f["data"]))["data"]["i"]
            for _ in range(20)
        ]
        assert got == list(range(20))
    finally:
        await client.close()
    assert https_status(wss_gateway.port, "/healthz", certs) == 200
    logs = wss_gateway.logs()
    assert certs.gateway_user.seed not in logs
    assert '"msg":"NATS connected"' in logs


def test_wss_refuses_old_tls_and_weak_ciphers(wss_gateway: Gateway, certs: Pki) -> None:
    def handshake(ctx: ssl.SSLContext) -> tuple[str | None, str | None]:
        with (
            socket.create_connection(("127.0.0.1", wss_gateway.port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            cipher = tls.cipher()
            return tls.version(), cipher[0] if cipher else None

    modern = client_tls(certs)
    version, cipher = handshake(modern)
    assert version == "TLSv1.3"
    tls12 = client_tls(certs)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    version, cipher = handshake(tls12)
    assert version == "TLSv1.2"
    assert (
        cipher is not None
        and cipher.startswith("ECDHE-")
        and ("GCM" in cipher or "CHACHA" in cipher)
    )
    cbc = client_tls(certs)
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA")
    with pytest.raises(ssl.SSLError):
        handshake(cbc)
    old = client_tls(certs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError):
        handshake(old)


def test_wss_silent_tls_client_cut_at_handshake_timeout(wss_gateway: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", wss_gateway.port), timeout=30) as raw:
        # no ClientHello from us: the server gives up and closes (a hang raises TimeoutError)
        assert raw.recv(1) == b""


# -- operator mode: creds (JWT chain) ------------------------------------------------------
def operator_chain(tmp: Path) -> tuple[str, dict[str, str], Path, Path]:
    """operator JWT, {account: account JWT}, the gateway's creds file, a publisher's."""
    operator = pki.new_nkey(nkeys.PREFIX_BYTE_OPERATOR)
    account = pki.new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    op_jwt = pki.nats_jwt(operator, operator.public, "op", {"type": "operator", "version": 2})
    unlimited = {
        "subs": -1,
        "conn": -1,
        "leaf": -1,
        "imports": -1,
        "exports": -1,
        "data": -1,
        "payload": -1,
        "wildcards": True,
    }
    acct_jwt = pki.nats_jwt(
        operator, account.public, "MARKET", {"type": "account", "version": 2, "limits": unlimited}
    )
    files = []
    for name, perms in (
        ("gateway", {"sub": {"allow": ["xy.md.>", "_INBOX.>"]}, "pub": {"allow": ["svc.>"]}}),
        ("publisher", {"pub": {"allow": ["xy.md.>"]}, "sub": {"deny": [">"]}}),
    ):
        user = pki.new_nkey(nkeys.PREFIX_BYTE_USER)
        user_jwt = pki.nats_jwt(
            account,
            user.public,
            name,
            {"type": "user", "version": 2, "subs": -1, "data": -1, "payload": -1, **perms},
        )
        files.append(pki.creds_file(tmp / f"{name}.creds", user_jwt, user))
    return op_jwt, {account.public: acct_jwt}, files[0], files[1]


async def test_nats_creds_from_an_operator_chain(
    tmp_path: Path, keypair: tuple[Path, Path], make_gateway: object
) -> None:
    op_jwt, accounts, gateway_creds, publisher_creds = operator_chain(tmp_path)
    preload = "\n".join(f"  {pub}: {jwt}" for pub, jwt in accounts.items())
    server = EmbeddedNats(
        config_text=f"operator: {op_jwt}\nresolver: MEMORY\nresolver_preload: {{\n{preload}\n}}\n"
    )
    server.start()
    try:
        gw = make_gateway(  # type: ignore[operator]
            "--workers",
            "1",
            NATS_URLS=server.url,
            NATS_CREDS=str(gateway_creds),
            JWT_PUBLIC_KEY=str(keypair[1]),
        )
        nc = await nats.connect(server.url, user_credentials=str(publisher_creds))
        client = await WsClient.connect(gw.ws, token(keypair, "creds-user"))
        try:
            assert await client.subscribe("xy.md.creds") == {"op": "ack", "id": 1}
            await wait_for_interest(nc, client, "xy.md.creds")
            await nc.publish("xy.md.creds", b'{"ok":1}')
            frame = await client.expect(lambda f: f.get("data") == {"ok": 1})
            assert frame["subject"] == "xy.md.creds"
        finally:
            await client.close()
            await nc.close()
        secret = gateway_creds.read_text().split("-----BEGIN USER NKEY SEED-----\n")[1][:58]
        assert secret not in gw.logs()
    finally:
        server.stop()


# -- boot errors name the setting, never the secret ----------------------------------------
def boot(env: dict[str, Any], tmp: Path) -> subprocess.CompletedProcess[str]:
    gw = launch_gateway(tmp, "--workers", "1", start=False, **env)
    return subprocess.run(
        [sys.executable, "-m", "fanout.cli", "serve", *gw.args],
        env=gw.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


BOOT, CONFIG = "fanout: workers cannot boot: ", "fanout: invalid config: "
#: case -> (what, how the one summary line starts, what it says). A file or seed that cannot
#: be read is a config error found before any worker forks; what NATS answers is a boot error.
BROKEN = {
    "CA that did not sign the server": (
        "other_ca",
        BOOT,
        "nats.tls_ca: the NATS server's certificate",
    ),
    "client certificate from another CA": (
        "stranger",
        BOOT,
        "nats.tls_cert: the NATS server refused",
    ),
    "no client certificate": ("no_client_cert", BOOT, "nats.tls_cert: the NATS server refused"),
    "CA file missing": ("missing_ca", CONFIG, "nats.tls_ca: cannot read"),
    "seed of an unknown user": ("wrong_seed", BOOT, "nats.nkey_seed: the NATS server rejected"),
    "seed that is no seed": ("garbage_seed", CONFIG, "nats.nkey_seed: neither a readable file"),
    "WSS key that does not match": ("wss_key", BOOT, "tls.cert/tls.key: not a certificate"),
}


@pytest.mark.parametrize("case", list(BROKEN), ids=list(BROKEN))
def test_broken_tls_or_credentials_stop_the_boot_naming_the_setting(
    case: str, certs: Pki, nats_tls: EmbeddedNats, keypair: tuple[Path, Path], tmp_path: Path
) -> None:
    what, prefix, expected = BROKEN[case]
    stranger_seed = pki.new_nkey(nkeys.PREFIX_BYTE_USER).seed
    env = gateway_env(certs, nats_tls.port, keypair[1], NATS_NKEY_SEED=certs.gateway_user.seed)
    if what == "other_ca":
        env["NATS_TLS_CA"] = str(certs.other_ca.cert)
    elif what == "stranger":
        env["NATS_TLS_CERT"], env["NATS_TLS_KEY"] = (
            str(certs.stranger.cert),
            str(certs.stranger.key),
        )
    elif what == "no_client_cert":
        del env["NATS_TLS_CERT"], env["NATS_TLS_KEY"]
    elif what == "missing_ca":
        env["NATS_TLS_CA"] = str(tmp_path / "nope.pem")
    elif what == "wrong_seed":
        env["NATS_NKEY_SEED"] = stranger_seed
    elif what == "garbage_seed":
        env["NATS_NKEY_SEED"] = "SUnot-a-seed-at-all"
    elif what == "wss_key":
        env["FANOUT_TLS_KEY"] = str(certs.client.key)
    out = boot(env, tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    summary = [line for line in out.stderr.splitlines() if line.startswith("fanout: ")]
    assert len(summary) == 1, out.stderr[-2000:]
    assert summary[0].startswith(prefix), summary
    assert expected in summary[0], summary
    everything = out.stdout + out.stderr
    for secret in (certs.gateway_user.seed, stranger_seed, certs.client.key.read_text()[40:80]):
        assert secret not in everything


#: Our client certificate -> the alert a TLS 1.3 nats-server answers it with.
CLIENT_CERT = {
    "from another CA": ("stranger", "TLSV1_ALERT_UNKNOWN_CA"),
    "none": (None, "TLSV13_ALERT_CERTIFICATE_REQUIRED"),
}


@pytest.mark.parametrize("client", list(CLIENT_CERT), ids=list(CLIENT_CERT))
async def test_connection_lost_at_boot_is_classified_by_the_servers_alert(
    client: str, certs: Pki, nats_tls: EmbeddedNats
) -> None:
    """TLS 1.3: nats-py may see only a broken pipe; the link asks the server what it meant."""
    which, alert = CLIENT_CERT[client]
    pem = certs.stranger if which else None
    cfg = Nats(
        urls=[f"tls://127.0.0.1:{nats_tls.port}"],
        tls_ca=str(certs.ca.cert),
        tls_cert=str(pem.cert) if pem else None,
        tls_key=str(pem.key) if pem else None,
        nkey_seed=certs.gateway_user.seed,
        connect_timeout_s=1.0,
    )
    link = NatsLink(cfg, lambda pattern, msg: None, lambda up: None)
    with pytest.raises(NatsAuthError) as refused:
        await link._on_error(BrokenPipeError(32, "Broken pipe"))
    assert str(refused.value) == (
        f"nats.tls_cert: the NATS server refused the client certificate ({alert})"
    )


async def test_connection_lost_with_an_accepted_certificate_is_retried(
    certs: Pki, nats_tls: EmbeddedNats
) -> None:
    cfg = Nats(
        urls=[f"tls://127.0.0.1:{nats_tls.port}"],
        tls_ca=str(certs.ca.cert),
        tls_cert=str(certs.client.cert),
        tls_key=str(certs.client.key),
        nkey_seed=certs.gateway_user.seed,
        connect_timeout_s=1.0,
    )
    link = NatsLink(cfg, lambda pattern, msg: None, lambda up: None)
    await link._on_error(BrokenPipeError(32, "Broken pipe"))  # logged; nats-py retries


async def test_deploy_account_gives_the_gateway_least_privilege(
    nats_tls: EmbeddedNats, certs: Pki
) -> None:
    """The gateway's own NATS user cannot publish market data nor subscribe outside xy.md."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    nc = await nats.connect(
        f"tls://127.0.0.1:{nats_tls.port}",
        tls=client_tls(certs, certs.client),
        nkeys_seed_str=certs.gateway_user.seed,
        error_cb=on_error,
        allow_reconnect=False,
    )
    try:
        await nc.subscribe("xy.md.allowed")
        await nc.flush()
        assert errors == []
        await nc.subscribe("orders.secret.>")
        await nc.publish("xy.md.tick.fake", b"{}")
        await nc.flush()
        await async_wait_for(lambda: len(errors) >= 2, 10, "two permission errors")
        assert any("subscription" in e and "orders.secret.>" in e for e in errors), errors
        assert any("publish" in e and "xy.md.tick.fake" in e for e in errors), errors
        assert all("permissions violation" in e for e in errors), errors
    finally:
        await nc.close()
