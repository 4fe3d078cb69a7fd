"""Serial over LAN packets real consoles never send: tampered, replayed, out-of-range sequence
numbers (against the real services over UDP), and random SOL payloads fuzzed into the SOL payload
handler of an in-process LanServer (against a real state service and a real, powered-off machine).

The machine stays off: SOL activates without a running machine, and what SOL types reaches the
bus as ``console.in`` requests, which the test watches (alongside the machine service) to tell
what was typed and what was dropped.
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

from conftest import free_udp_port, no_exception_logged, wait_for, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu_bmc_ipmi_lan import crypto, framing, sol
from qemu_bmc_ipmi_lan.client import RmcpPlusClient
from qemu_bmc_ipmi_lan.lan_commands import lan_registry
from qemu_bmc_ipmi_lan.server import LanServer
from qemu_bmc_shared import bus, ipmi, subjects
from qemu_bmc_shared.config import IpmiConfig
from qemu_bmc_shared.messages import ConsoleInput, ConsoleOutput
from test_ipmi_lan_fuzz import Capture

USER, PASSWORD = "admin", "s3cret-Pass"
ACTIVATE_SOL = bytes([0x01, 0x01, 0xC0, 0, 0, 0])
ACTIVATION_STATUS = bytes([0x01])


def sol_packet(client: RmcpPlusClient, payload: bytes, sequence: int | None = None) -> bytes:
    """A SOL payload in the session, encrypted and signed as ``request_packet`` does an IPMI one;
    ``sequence`` (the RMCP+ session sequence number) defaults to the client's next."""
    if sequence is None:
        client.sequence += 1
        sequence = client.sequence
    keys = client.keys
    encrypted = keys.confidentiality != crypto.CONFIDENTIALITY_NONE
    integrity = (keys.integrity_length, keys.sign) if keys.integrity else None
    return framing.build_v20(framing.PAYLOAD_SOL, client.bmc_id, sequence,
                             keys.encrypt(payload) if encrypted else payload, encrypted=encrypted,
                             integrity=integrity)


def sol_payload_of(client: RmcpPlusClient, reply: bytes) -> bytes:
    """The (verified, decrypted) SOL payload of a BMC packet."""
    packet = framing.parse_v20(framing.split_rmcp(reply)[1], client.keys.integrity_length)
    assert packet.payload_type == framing.PAYLOAD_SOL, packet
    assert client.keys.verify(packet.signed, packet.auth_code)
    payload = client.keys.decrypt(packet.payload) if packet.encrypted else packet.payload
    assert payload is not None
    return payload


async def typed_on(nc, machine: str) -> list[bytes]:
    """What reaches the machine's serial port input on the bus, as it comes."""
    typed: list[bytes] = []

    async def watch(msg) -> None:
        typed.append(bus.decode(msg.data, ConsoleInput).data)

    await nc.subscribe(subjects.for_machine(machine, subjects.CONSOLE_IN), cb=watch)
    await nc.flush()
    return typed


async def test_tampered_replayed_and_odd_sol_packets(nc, services, short_dir: Path):
    port = free_udp_port()
    config = write_config(short_dir, f'[vm.n1]\ncmd = ["-m", "64"]\nipmi = "127.0.0.1:{port}"\n')
    await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD})
    await services("machine", config, "--stop-vms-on-exit")
    lan = await services("ipmi-lan", config)
    typed = await typed_on(nc, "n1")

    with no_exception_logged(lan.log):
        async with RmcpPlusClient("127.0.0.1", port, USER, PASSWORD, timeout=1.0) as client:
            await client.open()
            code, data = await client.request(0x06, 0x48, ACTIVATE_SOL)  # the machine is off: SOL still activates
            assert code == 0, data.hex()
            assert struct.unpack("<HH", data[4:8]) == (sol.MAX_PAYLOAD, sol.MAX_PAYLOAD)

            # a tampered integrity code: dropped, nothing typed
            tampered = bytearray(sol_packet(client, sol.packet(1, 0, 0, 0, b"TAMPERED")))
            tampered[-1] ^= 0x01
            assert await client.exchange(bytes(tampered)) is None
            # a flipped bit in the encrypted payload (the code no longer matches): dropped too
            flipped = bytearray(sol_packet(client, sol.packet(1, 0, 0, 0, b"FLIPPED")))
            flipped[20] ^= 0x80
            assert await client.exchange(bytes(flipped)) is None

            # a good packet: typed and acked (sequence 1, all characters accepted)
            good = sol_packet(client, sol.packet(1, 0, 0, 0, b"A"))
            reply = await client.exchange(good)
            assert reply is not None
            assert sol_payload_of(client, reply) == sol.packet(0, 1, 1, 0)
            await wait_for(lambda: typed == [b"A"], timeout=5, message=f"'A' typed, not {typed}")

            # the same datagram again (same RMCP+ sequence number): a replay, dropped and not typed
            assert await client.exchange(good) is None
            # the same SOL payload under a new, valid RMCP+ sequence number: a SOL retransmission,
            # acked again but not typed twice
            reply = await client.exchange(sol_packet(client, sol.packet(1, 0, 0, 0, b"A")))
            assert reply is not None and sol_payload_of(client, reply) == sol.packet(0, 1, 1, 0)

            # SOL sequence 0 with characters (an ack-only packet must carry none): not acked, not typed
            assert await client.exchange(sol_packet(client, sol.packet(0, 0, 0, 0, b"ZERO"))) is None
            # shorter than the SOL header: dropped
            for short in (b"", b"\x02", b"\x02\x00\x00"):
                assert await client.exchange(sol_packet(client, short)) is None
            # an ack of a packet the BMC never sent, a nack, a flush: no crash, no answer
            assert await client.exchange(sol_packet(client, bytes([0, 9, 200, sol.OP_NACK | 0x3F]))) is None
            # SOL sequence numbers 16 and up (reserved upper nibble set): whatever happens, no crash
            # and any answer is a well-formed SOL ack
            for sequence in (0x10, 0x1F, 0xF3, 0xFF):
                reply = await client.exchange(sol_packet(client, bytes([sequence, 0, 0, 0]) + b"."), timeout=0.5)
                if reply is not None:
                    ack = sol_payload_of(client, reply)
                    assert len(ack) == 4 and ack[0] == 0 and ack[1] <= 15, ack.hex()
            # an oversized SOL payload (more than the maximum the BMC announced): only that much is
            # accepted, and the ack says so
            reply = await client.exchange(sol_packet(client, sol.packet(4, 0, 0, 0, b"x" * 600)), timeout=0.5)
            assert reply is not None and sol_payload_of(client, reply) == sol.packet(0, 4, sol.MAX_DATA, 0)
            assert b"TAMPERED" not in b"".join(typed) and b"FLIPPED" not in b"".join(typed)
            assert b"ZERO" not in b"".join(typed)
            assert typed.count(b"A") == 1

            # a good packet after all that is acked and typed, and the session still answers IPMI
            count = len(typed)
            reply = await client.exchange(sol_packet(client, sol.packet(5, 0, 0, 0, b"OK")))
            assert reply is not None and sol_payload_of(client, reply) == sol.packet(0, 5, 2, 0)
            await wait_for(lambda: b"OK" in typed[count:], timeout=5, message=f"'OK' typed, not {typed}")
            code, data = await client.request(0x06, 0x4A, ACTIVATION_STATUS)  # Get Payload Activation Status
            assert code == 0 and data[:2] == b"\x01\x01", data.hex()  # still active
            assert (await client.request(0x00, 0x01))[0] == 0  # Get Chassis Status
            # Deactivate Payload: the console first hears SOL is deactivating (status bit 4), then the answer
            deactivating = await client.exchange(client.request_packet(0x06, 0x49, ACTIVATE_SOL[:2] + bytes(4)))
            assert deactivating is not None and sol_payload_of(client, deactivating)[3] & sol.STATUS_DEACTIVATING
            answer = await asyncio.wait_for(client.queue.get(), 2)
            assert client.response_of(answer)[0] == 0
            await client.close()
    assert lan.process is not None and lan.process.returncode is None


class InProcessClient(RmcpPlusClient):
    """The RMCP+ client, its datagrams handed straight to an in-process LanServer."""

    def __init__(self, server: LanServer, capture: Capture) -> None:
        super().__init__("127.0.0.1", 623, USER, PASSWORD)
        self.server, self.capture = server, capture

    async def exchange(self, packet: bytes, timeout: float | None = None) -> bytes | None:
        """The server's answer: of the packets it sends meanwhile, the first of the request's
        payload type (SOL packets of the SOL session's own come and go at any time)."""
        self.capture.sent.clear()
        await self.server.handle(packet, ("127.0.0.1", 9))
        kind = framing.parse_v20(framing.split_rmcp(packet)[1], 0).payload_type
        for sent in self.capture.sent:
            if (framing.parse_v20(framing.split_rmcp(sent)[1], 0).payload_type == framing.PAYLOAD_SOL) == (
                    kind == framing.PAYLOAD_SOL):
                return sent
        return None


def sol_header(sequence: int, acked: int, accepted: int, operation: int, data: bytes) -> bytes:
    return bytes([sequence, acked, accepted, operation]) + data


sol_payloads = (st.binary(max_size=300)
                | st.builds(sol_header, st.integers(0, 255), st.integers(0, 255), st.integers(0, 255),
                            st.integers(0, 255), st.binary(max_size=260))
                | st.builds(sol_header, st.integers(0, 16), st.integers(0, 16), st.integers(0, 255),
                            st.sampled_from([0, sol.OP_NACK, sol.OP_FLUSH_OUTBOUND, 0xFF]), st.binary(max_size=8)))


async def test_fuzzed_sol_payloads_never_break_the_sol_session(nc, services, short_dir: Path):
    port = free_udp_port()
    config = write_config(short_dir, f'[vm.f1]\ncmd = ["-m", "64"]\nipmi = "127.0.0.1:{port}"\n')
    await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD})
    await services("machine", config, "--stop-vms-on-exit")  # answers console.in (nothing typed while off)
    server = LanServer("f1", nc, ipmi.load().extended(lan_registry), IpmiConfig(max_sessions=8))
    capture = Capture()
    server.connection_made(capture)
    client = InProcessClient(server, capture)
    await client.open()
    code, data = await client.request(0x06, 0x48, ACTIVATE_SOL)
    assert code == 0, data.hex()
    session = server.sol
    assert session is not None and session.alive()
    # serial output waiting for the console, so acks, nacks and flushes have something to act on
    await bus.publish(nc, "f1", subjects.CONSOLE_OUT, ConsoleOutput(machine="f1", data=b"boot " * 4000, end=20000))
    await wait_for(lambda: session.end == 20000, timeout=5, message="console output buffered")

    capture.sent.clear()  # the answer to Activate Payload
    loop = asyncio.get_running_loop()
    address = ("127.0.0.1", 9)
    handled: list[int] = []

    @settings(max_examples=500, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(sol_payloads, st.booleans())
    def fuzz(payload: bytes, framed: bool) -> None:
        if framed:  # the whole way: encrypted, signed, through LanServer.handle
            coroutine = client.exchange(sol_packet(client, payload))
        else:  # straight into the SOL payload handler, as decrypted
            coroutine = session.received(payload, address)
        asyncio.run_coroutine_threadsafe(coroutine, loop).result(15)  # an exception escaping fails here
        assert server.sol is session and not session.closed and session.alive()
        assert len(session.buffer) <= sol.MAX_BUFFERED
        assert 0 <= session.sequence <= 15
        assert session.in_flight is None or (1 <= session.in_flight[0] <= 15
                                             and session.in_flight[1] <= sol.MAX_DATA)
        assert session.last_inbound is None or (1 <= session.last_inbound[0] <= 15
                                                and 0 <= session.last_inbound[1] <= 300)
        assert len(server.sessions.established) <= 8
        sent, capture.sent[:] = list(capture.sent), []
        for packet in sent:  # what the BMC sends back are SOL packets of at most the announced size
            assert len(sol_payload_of(client, packet)) <= sol.MAX_PAYLOAD
        handled.append(len(payload))

    await loop.run_in_executor(None, fuzz)
    assert len(handled) >= 500

    # the session still serves IPMI, and SOL deactivates cleanly
    code, data = await client.request(0x06, 0x4A, ACTIVATION_STATUS)
    assert code == 0 and data[:2] == b"\x01\x01", data.hex()
    code, _ = await client.request(0x06, 0x49, ACTIVATE_SOL[:2] + bytes(4))
    assert code == 0 and server.sol is None and session.closed
    await server.close()
