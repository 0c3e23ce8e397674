"""The command line: dev keys and tokens that the gateway's own verifier accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from fanout import cli
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
    assert capsys.readouterr().out.startswith("fanout 0.1.0 (protocol v1)")


def test_token_help_says_requests_fail_closed(capsys: pytest.CaptureFixture[str]) -> None:
    """A token without ``--requests`` may make no requests: the help must not let one guess."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["token", "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "without it the token may make no requests" in help_text
