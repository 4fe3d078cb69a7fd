"""Fuzzing the IPMI over LAN parsers: malformed RMCP, ASF, IPMI 1.5, RMCP+ and IPMI frames.

Runs the real LanServer (against a real state service over NATS) on arbitrary datagrams and on
mutations of valid ones: no exception escapes, the session table stays bounded, and a real
client (ipmitool) logs in right after.
"""

from __future__ import annotations

import asyncio
import struct
import subprocess
from collections import Counter
from pathlib import Path

from conftest import free_udp_port, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu_bmc_ipmi_lan import framing
from qemu_bmc_ipmi_lan.lan_commands import lan_registry
from qemu_bmc_ipmi_lan.server import LanServer
from qemu_bmc_ipmi_lan.sessions import PENDING_CAPACITY, PENDING_PER_SOURCE
from qemu_bmc_shared import ipmi
from qemu_bmc_shared.config import IpmiConfig

OPEN_SESSION = (bytes([0x01, 0x04, 0, 0]) + struct.pack("<I", 0xA0A1A2A3) + bytes([0, 0, 0, 8, 1, 0, 0, 0])
                + bytes([1, 0, 0, 8, 1, 0, 0, 0]) + bytes([2, 0, 0, 8, 1, 0, 0, 0]))
SEEDS = [
    framing.rmcp_header(framing.CLASS_ASF) + struct.pack(">IBBBB", framing.ASF_IANA, framing.ASF_PING, 7, 0, 0),
    framing.build_v15(0, 0, 0, b"", framing.build_lan_request(0x06, 0x38, bytes([0x8E, 0x04]))),
    framing.build_v15(0, 0, 0, b"", framing.build_lan_request(0x06, 0x39, bytes([2]) + b"admin".ljust(16, b"\0"))),
    framing.build_v15(0, 0, 0, b"", framing.build_lan_request(0x06, 0x39, bytes([4]) + b"admin".ljust(16, b"\0"))),
    framing.build_v20(framing.PAYLOAD_OPEN_SESSION_REQUEST, 0, 0, OPEN_SESSION),
    framing.build_v20(framing.PAYLOAD_RAKP1, 0, 0, bytes(28) + b"admin"),
    framing.build_v20(framing.PAYLOAD_RAKP3, 0, 0, bytes(28)),
    framing.build_v20(framing.PAYLOAD_IPMI, 0, 0, framing.build_lan_request(0x06, 0x54, bytes([0x0E, 0, 0x80]))),
]


class Capture(asyncio.DatagramTransport):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []

    def sendto(self, data, addr=None) -> None:  # type: ignore[override]
        self.sent.append(bytes(data))


def mutate(seed: bytes, positions: list[tuple[int, int]], cut: int) -> bytes:
    data = bytearray(seed)
    for position, value in positions:
        data[position % len(data)] = value
    return bytes(data[:max(1, len(data) - cut)])


datagrams = (st.binary(max_size=300)
             | st.builds(mutate, st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)),
                                                                   max_size=4), st.integers(0, 12))
             | st.sampled_from(SEEDS))
#: Several source addresses, so that the pending handshakes' quotas per source are exercised.
sources = st.sampled_from([f"127.0.0.{host}" for host in range(1, 6)])


async def test_fuzzed_datagrams_never_break_the_server(nc, services, short_dir: Path):
    port = free_udp_port()
    config = write_config(short_dir, f'[vm.f1]\ncmd = ["-m", "64"]\nipmi = "127.0.0.1:{port}"\n')
    await services("state", config)
    server = LanServer("f1", nc, ipmi.load().extended(lan_registry), IpmiConfig(max_sessions=8))
    capture = Capture()
    server.connection_made(capture)
    loop = asyncio.get_running_loop()
    handled: list[int] = []

    @settings(max_examples=1500, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(datagrams, sources)
    def fuzz(datagram: bytes, source: str) -> None:
        asyncio.run_coroutine_threadsafe(server.handle(datagram, (source, 9)), loop).result(10)
        assert len(server.sessions.established) <= 8 and len(server.sessions.pending) <= PENDING_CAPACITY
        per_source = Counter(session.source for session in server.sessions.pending.values())
        assert max(per_source.values(), default=0) <= PENDING_PER_SOURCE
        handled.append(len(datagram))

    await loop.run_in_executor(None, fuzz)
    assert len(handled) >= 1500

    # the real service, fuzzed over UDP, still serves a real client afterwards
    await services("ipmi-lan", config)
    transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=("127.0.0.1", port))
    for length in range(0, 64, 3):
        transport.sendto(bytes([6, 0, 0xFF, 7]) + bytes(range(length)))
    transport.close()
    result = await asyncio.to_thread(subprocess.run, ["ipmitool", "-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p",
                                                      str(port), "-U", "admin", "-P", "password", "-N", "2", "-R",
                                                      "2", "session", "info", "active"],
                                     capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "session handle" in result.stdout.lower()
