"""Free loopback ports, for the tests and the benchmarks (no pytest here: bench/ imports it)."""

from __future__ import annotations

import contextlib
import random
import socket


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_udp_ports(count: int = 1, below: int = 32768) -> int:
    """The first of ``count`` consecutive free UDP ports on 127.0.0.1, all below ``below`` (FreeIPMI
    1.6's ipmiconsole refuses ``host:port`` with a port of 32768 or more)."""
    while True:
        base = random.randrange(20000, below - count)
        with contextlib.ExitStack() as probes:
            try:
                for port in range(base, base + count):
                    probe = probes.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                    probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return base
