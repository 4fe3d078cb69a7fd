"""The VM-wire service at the protocol level: what QEMU's ipmi-bmc-extern sends, and what it never
sends (garbage, reconnects mid-frame), from a small client in the test playing QEMU's part on an
attached machine's TCP address; the frame splitter the machine service carries a managed
machine's link with. The real QEMU and a real guest are in test_vmwire_guest.py and
test_vmwire_hardening.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import free_tcp_port, wait_for, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu_bmc_shared import bus, ipmi, subjects
from qemu_bmc_shared import vmwire as framing
from qemu_bmc_shared.messages import User, UserRef
from qemu_bmc_vmwire.server import InbandBmc

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


def attached_machine(directory: Path, port: int, name: str = "n1") -> str:
    """The config of an attached machine (its QEMU is the test's) with a VM-wire address."""
    return f'[vm.{name}]\nqmp = "{directory}/{name}-qmp.sock"\nvmwire = "127.0.0.1:{port}"\n'


@pytest.fixture
async def wire(nc, services, short_dir: Path) -> int:
    port = free_tcp_port()
    config = write_config(short_dir, attached_machine(short_dir, port))
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

    # QEMU restarts: the old connection goes, mid-frame; the new one is served, and the junk of the
    # old one does not leak into it
    qemu.writer.write(bytes([7, 0x18]))
    await qemu.writer.drain()
    qemu.writer.close()
    second = await connect_when_free(wire)
    assert await second.frame() == bytes([0x00, 0xA1])
    assert await second.frame() == bytes([0x05, 0xA1])  # the interrupt as the driver left it
    assert (await second.call(8, 0x06, 0x46, bytes([3])))[1].rstrip(b"\0") == b"maas"
    second.writer.write(bytes([framing.COMMAND_RESET, framing.COMMAND_END]))  # "the machine was reset"
    assert (await second.call(9, 0x06, 0x01))[0] == 0
    second.writer.close()


async def connect_when_free(port: int) -> Qemu:
    """A new QEMU connection, once the VM wire has let the old one go (QEMU retries every second)."""
    async def attempt() -> Qemu | None:
        qemu = await Qemu.connect(port)
        try:
            await qemu.frame()  # the BMC's version: this one holds the link
        except (AssertionError, ConnectionError):
            qemu.writer.close()
            return None
        return qemu

    return await wait_for(attempt, timeout=10, interval=0.2, message="the VM wire free for a new QEMU")


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
    bmc = InbandBmc("n1", nc, ipmi.load(), {})
    payload = st.binary(min_size=1, max_size=200)

    @settings(max_examples=200, deadline=None, database=None)
    @given(payload)
    def junk(data: bytes) -> None:  # the decoder and dispatch in-process, on every frame they find
        for frame in framing.Decoder().feed(data):
            if isinstance(frame, framing.Request):
                asyncio.run_coroutine_threadsafe(bmc.answer(frame, 0x08), loop).result(10)

    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, junk)
    qemu = await Qemu.connect(wire)
    for _ in range(3):  # version, no attention, interrupt
        await qemu.frame()
    for length in range(0, 300, 7):
        qemu.writer.write(bytes((i * 37 + length) & 0xFF for i in range(length)))
    qemu.writer.write(bytes([framing.MESSAGE_END]))
    assert (await qemu.call(1, 0x06, 0x01))[0] == 0


#: The longest frame QEMU sends (a 300-byte IPMI message, with its id and checksum), every data byte escaped.
LONGEST = request(2, 0x06, 0x45, b"\xa0" * 298)


def feed_in_chunks(feed, data: bytes, cuts: list[int]) -> list:
    out, start = [], 0
    for cut in [*sorted(cut % (len(data) + 1) for cut in cuts), len(data)]:
        out += feed(data[start:cut])
        start = cut
    return out


@settings(max_examples=1500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=700) | st.sampled_from([request(1, 0x06, 0x01), LONGEST, bytes([0xAA]),
                                                            bytes([0xA0]), bytes([0xA1]), VERSION_AND_CAPABILITIES]),
                max_size=10),
       st.lists(st.integers(min_value=0), max_size=8))
def test_splitter_splits_as_the_decoder_does(pieces: list[bytes], cuts: list[int]):
    """The machine service's splitter (frames carried whole over the bus) holds at most one
    escaped frame's worth, however the stream comes in pieces; and decoding the frames it carries
    one by one gives the frames the VM-wire service would decode from the whole stream (only
    frames longer than any QEMU sends are missing)."""
    stream = b"".join(pieces)
    splitter = framing.FrameSplitter()
    held = []

    def feed(data: bytes) -> list[bytes]:
        frames = splitter.feed(data)
        held.append(len(splitter.frame))
        return frames

    frames = feed_in_chunks(feed, stream, cuts)
    assert max(held) <= framing.MAX_WIRE_FRAME
    assert all(frame[-1] in (framing.MESSAGE_END, framing.COMMAND_END) for frame in frames)
    assert all(len(frame) <= framing.MAX_WIRE_FRAME for frame in frames)
    whole = framing.Decoder().feed(stream)
    carried = [decoded for frame in frames for decoded in framing.Decoder().feed(frame)]
    if not splitter.dropped:
        assert carried == whole
    remaining = iter(whole)
    assert all(any(decoded == other for other in remaining) for decoded in carried)  # in order, a subsequence
    if any(stream[at - 1:at] in (b"", b"\xa0", b"\xa1") for at in range(len(stream)) if stream.startswith(LONGEST, at)):
        assert framing.Request(2, 0x06, 0, 0x45, b"\xa0" * 298) in carried
