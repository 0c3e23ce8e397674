"""A JWKS document's bytes -> a :class:`~fanout.core.auth.KeySet`, shared by every fetcher.

The gateway's worker fetches with aiohttp (:mod:`fanout.worker.jwks`), a
backend service with the standard library (:mod:`fanout.service.jwks`); both
accept and refuse exactly the same documents because both parse here.
"""

from __future__ import annotations

import json

from fanout.core.auth import KeySet
from fanout.errors import Code, OperatorError

#: Largest JWKS document accepted; real ones are a few KiB.
MAX_JWKS_BYTES = 1 << 20


class JwksError(OperatorError):
    """A JWKS fetch that produced no usable key set; the message is logged (``XYW005``)."""

    CODE = Code.TOKEN_INVALID


def parse_jwks(body: bytes) -> KeySet:
    """The usable keys of a JWKS document; :class:`JwksError` when there is none."""
    try:
        document = json.loads(body)
    except ValueError:
        raise JwksError("response is not JSON") from None
    except RecursionError:
        raise JwksError("response is nested too deeply") from None
    if not isinstance(document, dict):
        raise JwksError("response is not a JSON object")
    try:
        keys = KeySet.from_jwks(document)
    except ValueError as exc:
        raise JwksError(str(exc)) from None
    if not len(keys):
        raise JwksError("no usable signature key: " + "; ".join(keys.skipped or ("empty",)))
    return keys
