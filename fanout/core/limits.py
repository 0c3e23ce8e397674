"""Admission rules for new connections (sans-I/O): who the client is and whether it may connect.

Owns: the client address behind trusted proxies (``X-Forwarded-For``), the key
per-address limits count by (an IPv6 client owns a whole /64, so it is counted
as one), the per-address handshake rate, the connection cap kept below the
file-descriptor limit, and load shedding on event-loop lag or RSS. The worker
feeds in headers, clock readings and measurements; nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Sequence

from fanout.core.ratelimit import KeyedRateLimiter

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Handshake-rate buckets kept at most (one per client address key); the oldest go first.
MAX_TRACKED_ADDRESSES = 65_536


def parse_networks(specs: Iterable[str]) -> tuple[Network, ...]:
    """``["10.0.0.0/8", "127.0.0.1"]`` → networks; ValueError names the bad entry."""
    out: list[Network] = []
    for spec in specs:
        try:
            out.append(ipaddress.ip_network(spec.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{spec!r} is not an IP address or CIDR") from None
    return tuple(out)


def _address(text: str) -> Address | None:
    """An IP from a peer name or a forwarded hop (``[v6]:port`` and ``v4:port`` tolerated)."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _trusted(ip: Address, trusted: Sequence[Network]) -> bool:
    return any(ip.version == net.version and ip in net for net in trusted)


def client_address(
    peer: str, forwarded_for: Sequence[str], trusted: Sequence[Network]
) -> tuple[str, bool]:
    """``(client address, via_proxy)`` for a connection from ``peer``.

    ``X-Forwarded-For`` is believed only when the peer itself is a trusted
    proxy. The hops are read right to left (each proxy appends the address it
    saw) and the first one that is not a trusted proxy is the client; what is
    left of it was written by the client and is ignored. A malformed hop stops
    the walk at the last address a trusted proxy vouched for.
    """
    ip = _address(peer)
    if ip is None:
        return peer, False
    if not trusted or not _trusted(ip, trusted):
        return str(ip), False
    hops = [hop for value in forwarded_for for hop in value.split(",")]
    client = ip
    for hop in reversed(hops):
        hop_ip = _address(hop)
        if hop_ip is None:
            break
        client = hop_ip
        if not _trusted(hop_ip, trusted):
            break
    return str(client), True


def address_key(address: str) -> str:
    """What per-address limits count by: the IPv4 address, or the IPv6 /64."""
    ip = _address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return address if ip is None else str(ip)


class HandshakeRate:
    """New handshakes per address key, on the one keyed bucket map; a rate of 0 is off."""

    __slots__ = ("limiter",)

    def __init__(self, rate: float, burst: float, max_tracked: int = MAX_TRACKED_ADDRESSES):
        self.limiter = KeyedRateLimiter(rate, burst, max_tracked) if rate > 0 else None

    def __len__(self) -> int:
        return 0 if self.limiter is None else len(self.limiter)

    def allow(self, key: str, now: float) -> float:
        """0.0 when a handshake from ``key`` may go ahead, else seconds until it may."""
        if self.limiter is None:
            return 0.0
        wait = self.limiter.check(key, now)
        return 0.0 if wait is None else wait

    def prune(self, now: float) -> None:
        """Forget addresses whose bucket is full again (the gateway's periodic sweep)."""
        if self.limiter is not None:
            self.limiter.prune(now)


def connection_cap(configured: int, nofile_soft: int, headroom: int) -> int:
    """The WebSocket connection cap that keeps the worker below its file-descriptor limit.

    ``nofile_soft`` < 0 means unlimited. Never below 1: a worker that can hold
    no client at all is a configuration error the operator sees in the log.
    """
    if nofile_soft < 0:
        return configured
    return max(1, min(configured, nofile_soft - headroom))


def retry_after_header(seconds: float) -> tuple[tuple[str, str], ...]:
    """``Retry-After`` in whole seconds, at least 1 (the header has no fractions)."""
    return (("Retry-After", str(max(1, math.ceil(seconds)))),)


class LoadShedder:
    """Decides whether the worker sheds new handshakes, from loop lag and RSS samples.

    Starts shedding as soon as a sample passes a threshold; stops only when
    both are back below ``recover`` × threshold, so the state does not flap
    with every sample. A threshold of 0 is off.
    """

    __slots__ = ("lag_s", "reason", "recover", "rss_bytes", "shedding")

    def __init__(self, lag_s: float, rss_bytes: int, recover: float = 0.8) -> None:
        self.lag_s = lag_s
        self.rss_bytes = rss_bytes
        self.recover = recover
        self.shedding = False
        self.reason = ""

    def update(self, lag_s: float, rss_bytes: int) -> bool:
        """Feed one sample; True when the shedding state changed."""
        lag_over = self.lag_s > 0 and lag_s > self.lag_s
        rss_over = self.rss_bytes > 0 and rss_bytes > self.rss_bytes
        if lag_over or rss_over:
            self.reason = (
                f"event loop lag {lag_s:.3f}s over {self.lag_s}s"
                if lag_over
                else f"RSS {rss_bytes} bytes over {self.rss_bytes}"
            )
            changed = not self.shedding
            self.shedding = True
            return changed
        if not self.shedding:
            return False
        lag_ok = self.lag_s <= 0 or lag_s <= self.lag_s * self.recover
        rss_ok = self.rss_bytes <= 0 or rss_bytes <= self.rss_bytes * self.recover
        if lag_ok and rss_ok:
            self.shedding = False
            self.reason = ""
            return True
        return False
