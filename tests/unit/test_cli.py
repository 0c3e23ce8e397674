"""The command line: dev keys and tokens that the gateway's own verifier accepts."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import pytest

from fanout import cli, settings
from fanout.core.acl import SubjectAcl
from fanout.core.auth import KeySet, TokenVerifier


def test_keygen_then_token_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["keygen", "--out", str(tmp_path), "--kind", "ec"]) == 0
    assert (tmp_path / "private.pem").stat().st_mode & 0o777 == 0o600
    capsys.readouterr()
    code = cli.main(
        [
            "token",
            "--sub",
            "alice",
            "--subjects",
            "xy.md.*, orders.{sub}.>",
            "--ttl",
            "15m",
            "--key",
            str(tmp_path / "private.pem"),
            "--kid",
            "k1",
        ]
    )
    assert code == 0
    token = capsys.readouterr().out.strip()
    keys = KeySet.from_pem(str(tmp_path / "public.pem"))
    verifier = TokenVerifier(algorithms=["ES256"], issuer=None, audience=None)
    assert verifier.header(token) == ("ES256", "k1")
    principal = verifier.verify(token, keys.find("k1"))  # type: ignore[arg-type]
    assert principal.sub == "alice"
    assert principal.claims["subjects"] == ["xy.md.*", "orders.{sub}.>"]
    assert principal.expires_at is not None


def test_token_with_bad_ttl_or_key_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["token", "--sub", "a", "--ttl", "forever", "--key", "/nonexistent"]) == 2
    assert "fanout token:" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["version"]) == 0
    assert capsys.readouterr().out == "fanout 0.1.0 (protocol v1.2)\n"


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_flag(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main([flag])
    assert done.value.code == 0
    assert capsys.readouterr().out == "fanout 0.1.0 (protocol v1.2)\n"


def test_one_protocol_version_constant_and_welcome_carries_its_major() -> None:
    import fanout
    from fanout.core import protocol

    assert not hasattr(fanout, "PROTOCOL_VERSION")
    assert protocol.PROTOCOL_VERSION == "1.2"
    limits = protocol.Limits(max_subs=1, max_frame_bytes=16, max_inbound_per_s=1.0)
    assert protocol.welcome("c1", None, limits).startswith(b'{"op":"welcome","v":1,')


def test_every_serve_option_has_help() -> None:
    serve = next(
        a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction)
    ).choices["serve"]
    missing = [a.dest for a in serve._actions if not a.help]
    assert missing == []


def token_claims(capsys: pytest.CaptureFixture[str], public: Path) -> dict[str, object]:
    token = capsys.readouterr().out.strip()
    key = KeySet.from_pem(str(public)).find(None)
    assert key is not None
    verifier = TokenVerifier(algorithms=["RS256"], issuer=None, audience=None)
    return dict(verifier.verify(token, key).claims)


def test_token_without_subjects_omits_the_claim_so_the_whitelist_applies(
    keypair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["token", "--sub", "alice", "--key", str(keypair[0])]) == 0
    claims = token_claims(capsys, keypair[1])
    assert "subjects" not in claims and "requests" not in claims
    acl = SubjectAcl.from_claims(settings.Ws().subject_whitelist, claims, "subjects")
    assert acl.check("xy.md.btc") is None
    assert acl.check("other.x") is not None


def test_token_ttl_help_examples_and_default_fit_the_default_max_lifetime(
    keypair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from fanout.devtoken import parse_ttl

    token = next(
        a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction)
    ).choices["token"]
    ttl = next(a for a in token._actions if a.dest == "ttl")
    examples = re.findall(r"\b[0-9]+[smhd]\b", ttl.help or "")
    assert len(examples) >= 3
    cap = settings.Jwt().max_lifetime_s
    assert all(parse_ttl(e) <= cap for e in [*examples, ttl.default]), examples
    largest = max(examples, key=parse_ttl)
    assert cli.main(["token", "--sub", "a", "--ttl", largest, "--key", str(keypair[0])]) == 0
    claims = token_claims(capsys, keypair[1])
    assert claims["exp"] - claims["iat"] == parse_ttl(largest)  # type: ignore[operator]


def test_token_longer_than_the_default_max_lifetime_warns(
    keypair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["token", "--sub", "a", "--ttl", "2d", "--key", str(keypair[0])]) == 0
    out = capsys.readouterr()
    assert out.out.count(".") == 2
    assert out.err == (
        "fanout token: warning: --ttl 2d (172800 s) is longer than the gateway's default"
        " jwt.max_lifetime_s (86400 s): it refuses this token unless that is raised\n"
    )


def test_keygen_refuses_to_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["keygen", "--out", str(tmp_path), "--kind", "ed25519"]) == 0
    before = (tmp_path / "private.pem").read_bytes(), (tmp_path / "public.pem").read_bytes()
    capsys.readouterr()
    assert cli.main(["keygen", "--out", str(tmp_path), "--kind", "ed25519"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"fanout keygen: {tmp_path / 'private.pem'} exists; use --force to replace the key pair\n"
    )
    after = (tmp_path / "private.pem").read_bytes(), (tmp_path / "public.pem").read_bytes()
    assert after == before
    (tmp_path / "private.pem").unlink()
    assert cli.main(["keygen", "--out", str(tmp_path)]) == 2
    assert "public.pem exists" in capsys.readouterr().err
    assert cli.main(["keygen", "--out", str(tmp_path), "--kind", "ed25519", "--force"]) == 0
    assert (tmp_path / "public.pem").read_bytes() != before[1]
    assert (tmp_path / "private.pem").stat().st_mode & 0o777 == 0o600


# -- check-config: secrets, files, environment ----------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith(("FANOUT_", "NATS_", "JWT_", "WS_")):
            monkeypatch.delenv(name)
    return monkeypatch


def test_check_config_redacts_url_credentials(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("NATS_URLS", "nats://gw:nats-pw@a:4222,nats://t0ken@b:4222")
    clean_env.setenv("JWT_JWKS_URL", "https://svc:jwks-pw@id.example/jwks.json")
    assert cli.main(["check-config"]) == 0
    out = capsys.readouterr().out
    effective = json.loads(out)
    assert effective["nats"]["urls"] == ["nats://<redacted>@a:4222", "nats://<redacted>@b:4222"]
    assert effective["jwt"]["jwks_url"] == "https://<redacted>@id.example/jwks.json"
    for secret in ("nats-pw", "t0ken", "jwks-pw"):
        assert secret not in out


def test_check_config_refuses_a_missing_key_file_naming_setting_and_path(
    clean_env: pytest.MonkeyPatch,
    keypair: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    clean_env.setenv("JWT_PUBLIC_KEY", str(keypair[1]))
    clean_env.setenv("FANOUT_TLS_CERT", str(keypair[1]))
    clean_env.setenv("FANOUT_TLS_KEY", str(tmp_path / "privkey.pem"))
    with pytest.raises(SystemExit) as done:
        cli.main(["check-config"])
    assert done.value.code == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == (
        f"fanout: invalid config: tls.key: cannot read {tmp_path / 'privkey.pem'}:"
        " No such file or directory (from FANOUT_TLS_KEY)\n"
    )


def test_check_config_warns_about_foreign_fanout_variables(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("FANOUT_LOCUST_KEY", "/somewhere/private.pem")
    assert cli.main(["check-config", "--demo"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["demo"]["enabled"] is True
    assert out.err == "fanout: warning: FANOUT_LOCUST_KEY is not a fanout setting; ignored\n"
    clean_env.setenv("FANOUT_SERVER_PROT", "9000")
    with pytest.raises(SystemExit) as done:
        cli.main(["check-config", "--demo"])
    assert done.value.code == 2
    assert capsys.readouterr().err.endswith(
        "fanout: invalid config: FANOUT_SERVER_PROT: no setting server.prot"
        " (did you mean server.port?)\n"
    )


def test_token_help_says_requests_fail_closed(capsys: pytest.CaptureFixture[str]) -> None:
    """A token without ``--requests`` may make no requests: the help must not let one guess."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["token", "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "without it the token may make no requests" in help_text


def test_log_format_from_env_then_flag_and_a_wrong_one_lists_the_values(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def effective(*argv: str) -> str:
        return cli.load_settings(cli.parser().parse_args(["serve", "--demo", *argv])).log.format

    assert effective() == "auto"
    clean_env.setenv("FANOUT_LOG_FORMAT", "text")
    assert effective() == "text"
    assert effective("--log-format", "json") == "json"
    clean_env.setenv("FANOUT_LOG_FORMAT", "yaml")
    with pytest.raises(SystemExit) as done:
        cli.main(["check-config", "--demo"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fanout: invalid config: log.format: ") and "auto, json, text" in err


def test_admin_port_from_env_then_flag_and_0_is_off(clean_env: pytest.MonkeyPatch) -> None:
    def admin(*argv: str) -> tuple[str, int]:
        cfg = cli.load_settings(cli.parser().parse_args(["serve", "--demo", *argv]))
        return cfg.admin.host, cfg.admin.port

    assert admin() == ("127.0.0.1", 9090)
    clean_env.setenv("FANOUT_ADMIN_PORT", "9191")
    clean_env.setenv("FANOUT_ADMIN_HOST", "10.0.0.5")
    assert admin() == ("10.0.0.5", 9191)
    assert admin("--admin-port", "0") == ("10.0.0.5", 0)


def test_top_with_the_admin_listener_off_exits_2(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No JWT key configured: ``top`` only needs admin.*, not the client-auth settings."""
    clean_env.setenv("FANOUT_ADMIN_PORT", "0")
    assert cli.main(["top", "--once"]) == 2
    assert capsys.readouterr().err == "fanout top: admin.port is 0 (the admin listener is off)\n"
