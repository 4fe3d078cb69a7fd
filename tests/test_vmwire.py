"""The VM-wire service at the protocol level: what QEMU's ipmi-bmc-extern sends, and what it never
sends (garbage, reconnects mid-frame), from a small client in the test playing QEMU's part. The
real QEMU and a real guest are in test_vmwire_guest.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import free_tcp_port, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu_bmc_shared import bus, ipmi, subjects
from qemu_bmc_shared.messages import User, UserRef
from qemu_bmc_vmwire import framing
from qemu_bmc_vmwire.server import VmWireEndpoint

VERSION_AND_CAPABILITIES = bytes([0xFF, 0x01, 0xA1, 0x08, 0x3F, 0xA1])  # what QEMU sends on connect



def request(message_id: int, netfn: int, cmd: int, data: bytes = b"") -> bytes:
    body = bytes([message_id, netfn << 2, cmd]) + data
    return framing.escape(body + bytes([framing.checksum(body)])) + bytes([framing.MESSAGE_END])


class Qemu:
    """The QEMU end of the wire."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.decoder = reader, writer, framing.Decoder()
        self.pending: list[bytes] = []

    @classmethod
    async def connect(cls, port: int) -> Qemu:
        qemu = cls(*await asyncio.open_connection("127.0.0.1", port))
        qemu.writer.write(VERSION_AND_CAPABILITIES)
        return qemu

    async def frame(self) -> bytes:
        """The next unescaped frame from the BMC, with its end marker."""
        while not self.pending:
            data = await asyncio.wait_for(self.reader.read(4096), 5)
            assert data, "the BMC closed the connection"
            frame = bytearray()
            escaped = False
            for byte in data:
                if byte == framing.ESCAPE:
                    escaped = True
                    continue
                if byte in (framing.MESSAGE_END, framing.COMMAND_END) and not escaped:
                    self.pending.append(bytes(frame) + bytes([byte]))
                    frame.clear()
                    continue
                frame.append(byte & ~0x10 if escaped else byte)
                escaped = False
        return self.pending.pop(0)

    async def call(self, message_id: int, netfn: int, cmd: int, data: bytes = b"") -> tuple[int, bytes]:
        self.writer.write(request(message_id, netfn, cmd, data))
        reply = await self.frame()
        assert reply[-1] == framing.MESSAGE_END and sum(reply[:-1]) & 0xFF == 0, reply.hex()
        assert reply[0] == message_id and reply[1] == (netfn | 1) << 2 and reply[2] == cmd, reply.hex()
        return reply[3], reply[4:-2]


@pytest.fixture
async def wire(nc, services, short_dir: Path) -> int:
    port = free_tcp_port()
    config = write_config(short_dir, f'[vm.n1]\ncmd = ["-m", "64"]\nipmi = "127.0.0.1:6230"\n'
                                     f'vmwire = "127.0.0.1:{port}"\n')
    await services("state", config)
    await services("vmwire", config)
    return port


async def test_requests_garbage_and_reconnects(nc, wire: int):
    qemu = await Qemu.connect(wire)
    assert await qemu.frame() == bytes([0xFF, 0x01, 0xA1])  # the BMC's version
    assert await qemu.frame() == bytes([0x00, 0xA1])  # no attention
    assert await qemu.frame() == bytes([0x06, 0xA1])  # interrupt off until the guest's driver enables it
    completion, device = await qemu.call(1, 0x06, 0x01)  # Get Device ID
    assert completion == 0 and device[0] == 0x20 and device[4] == 0x02
    assert await qemu.call(2, 0x06, 0x31) == (0, b"\x00")  # Get Message Flags
    assert (await qemu.call(3, 0x06, 0x33))[0] == 0x80  # Get Message: empty
    # the driver turns the message interrupt on: QEMU is told to raise the KCS interrupt
    assert await qemu.call(10, 0x06, 0x2E, b"\x09") == (0, b"")
    assert await qemu.frame() == bytes([0x05, 0xA1])

    # garbage: a bad checksum, a stray escape before the end, an overlong frame, a lone end marker
    body = bytes([4, 0x06 << 2, 0x01])
    qemu.writer.write(body + bytes([0x00, framing.MESSAGE_END]))
    qemu.writer.write(bytes([5, 0x18, 0x01, framing.ESCAPE, framing.MESSAGE_END]))
    qemu.writer.write(bytes(range(0x10, 0x90)) * 4 + bytes([framing.MESSAGE_END, framing.MESSAGE_END]))
    qemu.writer.write(bytes([framing.COMMAND_END]))
    # the next good frame is answered, and nothing was answered for the garbage
    assert (await qemu.call(6, 0x06, 0x01))[0] == 0

    # an escaped byte in the data: user name with 0xA0..0xAA is refused (0xCC); a good name is set
    assert (await qemu.call(0xA0, 0x06, 0x45, bytes([3]) + b"\xa0\xaa".ljust(16, b"\0")))[0] == 0xCC
    assert (await qemu.call(0xAA, 0x06, 0x45, bytes([3]) + b"maas".ljust(16, b"\0")))[0] == 0
    user = await bus.request(nc, "n1", subjects.USERS_GET, UserRef(slot=3), User)
    assert user.name == "maas"  # the state the LAN front-end reads too

    # QEMU reconnects (guest reboot, QEMU restart): the new connection is served, mid-frame junk
    # of the old one does not leak into it
    qemu.writer.write(bytes([7, 0x18]))
    second = await Qemu.connect(wire)
    assert await second.frame() == bytes([0xFF, 0x01, 0xA1])
    assert await second.frame() == bytes([0x00, 0xA1])
    assert await second.frame() == bytes([0x05, 0xA1])  # the interrupt as the driver left it
    assert (await second.call(8, 0x06, 0x46, bytes([3])))[1].rstrip(b"\0") == b"maas"
    second.writer.write(bytes([framing.COMMAND_RESET, framing.COMMAND_END]))  # "the machine was reset"
    assert (await second.call(9, 0x06, 0x01))[0] == 0
    second.writer.close()


@settings(max_examples=1500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=80) | st.sampled_from([request(1, 0x06, 0x01), bytes([0xAA]), bytes([0xA0]),
                                                           bytes([0xA1]), VERSION_AND_CAPABILITIES]), max_size=12))
def test_decoder_never_desynchronises(chunks: list[bytes]):
    """Whatever came before, after an end marker a good request decodes exactly."""
    decoder = framing.Decoder()
    for chunk in chunks:
        decoder.feed(chunk)
        assert len(decoder.frame) <= framing.MAX_FRAME
    decoder.feed(bytes([framing.MESSAGE_END]))
    assert decoder.feed(request(0x42, 0x06, 0x01, b"\xa0\xa1\xaa")) == [
        framing.Request(0x42, 0x06, 0, 0x01, b"\xa0\xa1\xaa")]


async def test_fuzzed_stream_to_the_live_service(nc, wire: int):
    """Random bytes over the real socket, then a good request is answered; the service lives on."""
    endpoint = VmWireEndpoint("n1", nc, ipmi.load(), {})
    payload = st.binary(min_size=1, max_size=200)

    @settings(max_examples=200, deadline=None, database=None)
    @given(payload)
    def junk(data: bytes) -> None:  # the decoder and dispatch in-process, on every frame they find
        for frame in framing.Decoder().feed(data):
            if isinstance(frame, framing.Request):
                asyncio.run_coroutine_threadsafe(endpoint.answer(frame), loop).result(10)

    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, junk)
    qemu = await Qemu.connect(wire)
    for _ in range(3):  # version, no attention, interrupt
        await qemu.frame()
    for length in range(0, 300, 7):
        qemu.writer.write(bytes((i * 37 + length) & 0xFF for i in range(length)))
    qemu.writer.write(bytes([framing.MESSAGE_END]))
    assert (await qemu.call(1, 0x06, 0x01))[0] == 0
