"""The JWKS parser both fetchers share, and the service fetcher's refusal of non-HTTP URLs."""

from __future__ import annotations

import pytest

from fanout.core.jwks import JwksError, parse_jwks
from fanout.service.jwks import download


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>", "response is not JSON"),
        (b"[]", "response is not a JSON object"),
        (b'{"keys": []}', "no usable signature key: empty"),
    ],
)
def test_unusable_documents_are_refused_with_a_reason(body: bytes, message: str) -> None:
    with pytest.raises(JwksError) as err:
        parse_jwks(body)
    assert str(err.value) == message


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://idp.example/jwks.json"])
def test_the_service_fetcher_only_speaks_http(url: str) -> None:
    with pytest.raises(JwksError) as err:
        download(url, 1.0)
    assert str(err.value) == f"not an http(s) URL: {url}"
