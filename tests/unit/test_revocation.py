"""The jti denylist file."""

from __future__ import annotations

from pathlib import Path

import pytest

from fanout.worker.revocation import Denylist, DenylistError


def test_load_ignores_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "deny.txt"
    path.write_text("# revoked after incident 7\n\n  abc-1  \nabc-2 # stolen laptop\n")
    deny = Denylist.load(str(path))
    assert deny.ids == frozenset({"abc-1", "abc-2"})
    assert "abc-1" in deny and "abc-3" not in deny and None not in deny
    assert len(deny) == 2


def test_empty_default_denies_nothing() -> None:
    assert "anything" not in Denylist()


@pytest.mark.parametrize(
    ("content", "message"),
    [("ok\ntwo words\n", "deny.txt:2: not a token id"), ("x" * 257, "deny.txt:1: not a token id")],
)
def test_bad_lines_are_refused_with_their_number(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "deny.txt"
    path.write_text(content)
    with pytest.raises(DenylistError, match=message):
        Denylist.load(str(path))


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(DenylistError, match=r"cannot read .*missing\.txt: No such file"):
        Denylist.load(str(tmp_path / "missing.txt"))
    binary = tmp_path / "bin"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DenylistError, match="not UTF-8"):
        Denylist.load(str(binary))
