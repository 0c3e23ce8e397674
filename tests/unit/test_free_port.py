"""Ports handed to test gateways and embedded nats-servers never come from the kernel's
ephemeral range: a port picked there can be taken by any outgoing connection's local
end before the server binds it (seen: a gateway's admin port taken, exit 2)."""

from __future__ import annotations

import socket

from fanout.embedded_nats import ephemeral_range, free_port


def test_free_ports_are_outside_the_ephemeral_range_and_bindable() -> None:
    low, high = ephemeral_range()
    seen = set()
    for _ in range(200):
        port = free_port()
        assert not low <= port <= high, port
        assert port not in seen  # one process never gets the same port twice
        seen.add(port)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_a_taken_port_is_never_handed_out() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port()))
        taken = held.getsockname()[1]
        held.listen()
        assert all(free_port() != taken for _ in range(200))
