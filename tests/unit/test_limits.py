"""Admission rules: client address behind proxies, per-address keys, handshake rate, fd cap,
load shedding."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fanout.core.limits import (
    HandshakeRate,
    LoadShedder,
    address_key,
    client_address,
    connection_cap,
    parse_networks,
    retry_after_header,
)

PROXIES = parse_networks(["10.0.0.0/8", "fd00::/8", "127.0.0.2"])
ipv4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
public_v4 = ipv4.filter(lambda a: ipaddress.ip_address(a) not in ipaddress.ip_network("10.0.0.0/8"))


def test_parse_networks_names_the_bad_entry() -> None:
    with pytest.raises(ValueError, match=r"'10\.0\.0\.300'"):
        parse_networks(["10.0.0.0/8", "10.0.0.300"])


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("203.0.113.9", ["1.2.3.4"], ("203.0.113.9", False)),  # untrusted peer: header ignored
        ("10.1.1.1", [], ("10.1.1.1", True)),  # trusted proxy, no header: the proxy itself
        ("10.1.1.1", ["198.51.100.7"], ("198.51.100.7", True)),
        ("10.1.1.1", ["6.6.6.6, 198.51.100.7"], ("198.51.100.7", True)),  # spoofed left hop
        ("10.1.1.1", ["198.51.100.7, 10.2.2.2"], ("198.51.100.7", True)),  # two proxies
        ("10.1.1.1", ["6.6.6.6", "198.51.100.7"], ("198.51.100.7", True)),  # two header lines
        ("10.1.1.1", ["10.3.3.3, 10.2.2.2"], ("10.3.3.3", True)),  # all trusted: leftmost
        ("10.1.1.1", ["198.51.100.7, garbage"], ("10.1.1.1", True)),  # malformed stops the walk
        ("10.1.1.1", ["[2001:db8::1]:443"], ("2001:db8::1", True)),
        ("10.1.1.1", ["198.51.100.7:5555"], ("198.51.100.7", True)),
        ("::ffff:10.1.1.1", ["198.51.100.7"], ("198.51.100.7", True)),  # v4-mapped peer
        ("127.0.0.2", ["192.0.2.1"], ("192.0.2.1", True)),
        ("?", ["192.0.2.1"], ("?", False)),
    ],
)
def test_client_address(peer: str, xff: list[str], expected: tuple[str, bool]) -> None:
    assert client_address(peer, xff, PROXIES) == expected


@given(peer=ipv4, hops=st.lists(ipv4, max_size=5))
def test_without_trusted_proxies_the_header_never_counts(peer: str, hops: list[str]) -> None:
    assert client_address(peer, [", ".join(hops)], ()) == (peer, False)


@given(spoofed=st.lists(st.text(max_size=20), max_size=5), real=public_v4)
def test_nothing_left_of_the_real_hop_matters(spoofed: list[str], real: str) -> None:
    """Whatever a client writes itself, the address the trusted proxy appended wins."""
    header = ", ".join([*(s.replace(",", "") for s in spoofed), real])
    assert client_address("10.0.0.1", [header], PROXIES) == (real, True)


def test_address_key_groups_ipv6_by_64() -> None:
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::9")
    assert address_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("198.51.100.7") == "198.51.100.7"
    assert address_key("not-an-ip") == "not-an-ip"


def test_handshake_rate_burst_then_refill() -> None:
    rate = HandshakeRate(rate=2.0, burst=3.0)
    assert [rate.allow("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rate.allow("a", 0.0) == pytest.approx(0.5)
    assert rate.allow("b", 0.0) == 0.0  # another address has its own budget
    assert rate.allow("a", 0.5) == 0.0
    assert rate.allow("a", 0.5) > 0


def test_handshake_rate_off_and_bounded_memory() -> None:
    assert HandshakeRate(rate=0.0, burst=1.0).allow("a", 0.0) == 0.0
    rate = HandshakeRate(rate=1.0, burst=1.0, max_tracked=100)
    for i in range(1000):
        rate.allow(f"10.0.{i // 250}.{i % 250}", 0.0)
    assert len(rate) <= 100
    rate.prune(10.0)  # every bucket is full again
    assert len(rate) == 0


def test_connection_cap_stays_below_the_fd_limit() -> None:
    assert connection_cap(10_000, 1024, 128) == 896
    assert connection_cap(500, 1024, 128) == 500
    assert connection_cap(10_000, -1, 128) == 10_000
    assert connection_cap(10_000, 100, 128) == 1


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert retry_after_header(0.01) == (("Retry-After", "1"),)
    assert retry_after_header(2.2) == (("Retry-After", "3"),)


def test_load_shedder_hysteresis() -> None:
    shed = LoadShedder(lag_s=0.5, rss_bytes=1000)
    assert shed.update(0.1, 500) is False and not shed.shedding
    assert shed.update(0.6, 500) is True and shed.shedding
    assert "loop lag" in shed.reason
    assert shed.update(0.45, 500) is False and shed.shedding  # above 80 % of the threshold
    assert shed.update(0.3, 500) is True and not shed.shedding
    assert shed.update(0.0, 1001) is True and "RSS" in shed.reason
    assert shed.update(0.0, 900) is False and shed.shedding
    assert shed.update(0.0, 800) is True and not shed.shedding


def test_load_shedder_off() -> None:
    shed = LoadShedder(lag_s=0.0, rss_bytes=0)
    assert shed.update(100.0, 1 << 40) is False and not shed.shedding


def test_handshake_rate_keeps_the_busiest_address_when_full() -> None:
    """Eviction is least-recently-used: new addresses cannot wipe the debt of one still knocking."""
    rate = HandshakeRate(rate=1.0, burst=1.0, max_tracked=2)
    assert rate.allow("a", 0.0) == 0.0
    assert rate.allow("b", 0.0) == 0.0
    assert rate.allow("a", 0.0) > 0  # "a" is now the most recent
    assert rate.allow("c", 0.0) == 0.0  # evicts "b", not "a"
    assert rate.allow("a", 0.0) > 0
