"""The revocation hook: a denylist of token ids (``jti``) read from a file.

A worker reads the file once at start. SIGHUP makes the supervisor roll the
workers one at a time; each new worker reads the file again, and the clients
of the old one reconnect (1012) through the new list, so a revoked token is
off the gateway once the roll is done. An unreadable file stops the worker
from booting (the roll then keeps the old workers): a revocation list that
silently failed to load would be worse than none.
"""

from __future__ import annotations

from pathlib import Path

from fanout.errors import OperatorError

#: A jti longer than this is not one we issued; such lines are refused, not truncated.
MAX_JTI_BYTES = 256


class DenylistError(OperatorError):
    """The denylist file cannot be used; the message names the line or the OS error."""


class Denylist:
    """Revoked ``jti`` values: one per line, ``#`` starts a comment, blank lines ignored."""

    __slots__ = ("ids", "path")

    def __init__(self, ids: frozenset[str] = frozenset(), path: str | None = None) -> None:
        self.ids = ids
        self.path = path

    @classmethod
    def load(cls, path: str) -> Denylist:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise DenylistError(f"cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise DenylistError(f"{path} is not UTF-8 text") from None
        ids: set[str] = set()
        for number, line in enumerate(text.splitlines(), 1):
            jti = line.partition("#")[0].strip()
            if not jti:
                continue
            if len(jti.encode()) > MAX_JTI_BYTES or any(c.isspace() for c in jti):
                raise DenylistError(f"{path}:{number}: not a token id")
            ids.add(jti)
        return cls(frozenset(ids), path)

    def __contains__(self, jti: object) -> bool:
        return jti in self.ids

    def __len__(self) -> int:
        return len(self.ids)
