"""The test servers' ports (tests/support.free_port): outside the kernel's ephemeral range, so a
server restarted on its port never finds it taken by an outgoing connection, and never repeated."""

from __future__ import annotations

import socket

from tests.support import _ephemeral_ports_start, free_port


def test_ports_are_below_the_ephemeral_range_distinct_and_bindable() -> None:
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(1024 < port < _ephemeral_ports_start() for port in ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))
