"""The VNC side of the graphical console: shared/qemu_bmc_shared/rfb.py against a real QEMU's VNC
server, with a standard VNC client (vncdotool's ``vncdo``) as the viewer, and the IPMI over LAN
service's ``vnc = "host:port"`` listener over the bus.

The unit-level tests give :func:`serve_viewer` a stream straight to QEMU's ``-vnc unix:PATH``
socket (:class:`RecordingStream`, which also records every byte QEMU was sent); the guest is a boot
sector that copies each key it reads from the keyboard (BIOS int 16h) to COM1, so a key that
reached QEMU is seen in the serial log."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import serial_log, write_config
from guest_images import KEY_GUEST_READY, boot_sector_vm, key_echo_disk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from ports import free_tcp_port
from qemu_bmc_ipmi_lan import vnc
from qemu_bmc_shared import rfb
from qemu_bmc_shared.config import ConfigError, parse
from waiting import wait_for

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU")

VNCDO = str(Path(sys.executable).parent / "vncdo")
PASSWORD = "s3cret"



class QemuDisplay:
    """A QEMU (TCG) with a VGA display on ``-vnc unix:PATH`` running the key-echo guest."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "vnc.sock"
        self.serial = directory / "serial.log"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> QemuDisplay:
        disk = key_echo_disk(self.directory)
        self.process = await asyncio.create_subprocess_exec(
            "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "64", "-display", "none", "-vga", "std",
            "-vnc", f"unix:{self.socket}", "-serial", f"file:{self.serial}", "-monitor", "none",
            "-drive", f"file={disk},format=raw,if=ide", "-nic", "none",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        await wait_for(lambda: KEY_GUEST_READY in self.serial_text(), timeout=60, message="the guest's ready line")
        return self

    def serial_text(self) -> str:
        return self.serial.read_text(errors="replace") if self.serial.exists() else ""

    async def stop(self) -> None:
        if self.process and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


class RecordingStream:
    """A stream (the KvmStream interface) straight to QEMU's VNC socket, recording what it writes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.written = bytearray()
        self.received = 0
        self.closed = False

    @classmethod
    async def open(cls, path: Path) -> RecordingStream:
        return cls(*await asyncio.open_unix_connection(str(path)))

    async def read(self) -> bytes:
        data = await self.reader.read(65536)
        self.received += len(data)
        return data

    async def write(self, data: bytes) -> None:
        self.written += data
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        self.closed = True
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


class ViewerServer:
    """A TCP server that serves each connection with :func:`rfb.serve_viewer` on a new RecordingStream."""

    def __init__(self, display: QemuDisplay, *, password: str | None, control: bool = True) -> None:
        self.display, self.password, self.control = display, password, control
        self.streams: list[RecordingStream] = []
        self.outcomes: list[BaseException | None] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _open(self) -> RecordingStream:
        stream = await RecordingStream.open(self.display.socket)
        self.streams.append(stream)
        return stream

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        outcome: BaseException | None = None
        try:
            await rfb.serve_viewer(reader, writer, self._open, password=self.password, control=self.control)
        except Exception as exc:
            outcome = exc
        finally:
            self.outcomes.append(outcome)
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def display(short_dir: Path) -> AsyncIterator[QemuDisplay]:
    qemu = QemuDisplay(short_dir)
    try:
        yield await qemu.start()
    finally:
        await qemu.stop()


@pytest.fixture
async def viewer_server(display: QemuDisplay) -> AsyncIterator[Callable[..., Awaitable[tuple[ViewerServer, int]]]]:
    servers: list[ViewerServer] = []

    async def start(**options: Any) -> tuple[ViewerServer, int]:
        server = ViewerServer(display, **{"password": PASSWORD, **options})
        servers.append(server)
        return server, await server.start()

    yield start
    for server in servers:
        await server.close()


async def vncdo(port: int, password: str, *actions: str, host: str = "127.0.0.1") -> tuple[int, str]:
    """Run vncdotool's command line client; its exit status and output."""
    process = await asyncio.create_subprocess_exec(VNCDO, "-s", f"{host}::{port}", "-p", password, "-t", "60",
                                                   *actions, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.STDOUT)
    output, _ = await process.communicate()
    return process.returncode or 0, output.decode(errors="replace")


def banner_rows_vary(png: Path) -> bool:
    """The top of the screen (where SeaBIOS prints its banner) is not one colour."""
    image = Image.open(png).convert("L")
    top = image.crop((0, 0, image.width, min(64, image.height)))
    low, high = top.getextrema()
    return high > low


class RawViewer:
    """A minimal RFB 3.8 client (the test's own): handshake, then raw messages and server bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.width = self.height = 0

    @classmethod
    async def connect(cls, port: int, password: str | None) -> RawViewer:
        viewer = cls(*await asyncio.open_connection("127.0.0.1", port))
        assert await viewer.reader.readexactly(12) == rfb.VERSION
        viewer.writer.write(rfb.VERSION)
        count = (await viewer.reader.readexactly(1))[0]
        kinds = await viewer.reader.readexactly(count)
        kind = rfb.SECURITY_NONE if password is None else rfb.SECURITY_VNC_AUTH
        assert kinds == bytes([kind])
        viewer.writer.write(bytes([kind]))
        if password is not None:
            challenge = await viewer.reader.readexactly(16)
            viewer.writer.write(rfb.vnc_auth_response(password, challenge))
        assert await viewer.reader.readexactly(4) == bytes(4)
        viewer.writer.write(b"\x00")  # ClientInit, not shared: QEMU must still be asked for a shared session
        head = await viewer.reader.readexactly(24)
        viewer.width, viewer.height, name_length = struct.unpack("!HH16xI", head)
        await viewer.reader.readexactly(name_length)
        return viewer

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def update_request(self, incremental: bool = False) -> bytes:
        return struct.pack("!BBHHHH", 3, incremental, 0, 0, self.width, self.height)

    async def framebuffer_update(self) -> int:
        """Ask for the whole screen (raw encoding) and read the update; the number of rectangles."""
        self.send(struct.pack("!BxHi", 2, 1, 0) + self.update_request())
        kind, count = struct.unpack("!BxH", await self.reader.readexactly(4))
        assert kind == 0
        for _ in range(count):
            _, _, width, height, encoding = struct.unpack("!HHHHi", await self.reader.readexactly(12))
            assert encoding == 0
            await self.reader.readexactly(width * height * 4)
        return count

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def key_event(keysym: int, down: bool) -> bytes:
    return struct.pack("!BB2xI", 4, down, keysym)


# ---------------------------------------------------------------- serve_viewer, straight to QEMU


async def test_standard_client_captures_the_screen_and_types(viewer_server: Any, display: QemuDisplay,
                                                            tmp_path: Path) -> None:
    """vncdo authenticates with the password, captures a frame with SeaBIOS's banner on it, and a
    key it sends reaches the guest (echoed on the serial port)."""
    _, port = await viewer_server()
    png = tmp_path / "screen.png"
    status, output = await vncdo(port, PASSWORD, "key", "x", "capture", str(png))  # the key, then a frame back
    assert status == 0, output
    assert banner_rows_vary(png)
    await wait_for(lambda: display.serial_text().endswith("x"), timeout=30, message="the key on the serial port")


async def test_wrong_password_is_refused(viewer_server: Any, tmp_path: Path) -> None:
    """A wrong password: SecurityResult failed with a reason (RFC 6143 §7.1.3); QEMU is never reached."""
    server, port = await viewer_server()
    status, output = await vncdo(port, "wrong", "capture", str(tmp_path / "never.png"))
    assert status != 0
    assert "authentication failed" in output
    viewer_reader, viewer_writer = await asyncio.open_connection("127.0.0.1", port)
    assert await viewer_reader.readexactly(12) == rfb.VERSION
    viewer_writer.write(rfb.VERSION)
    assert await viewer_reader.readexactly(2) == bytes([1, rfb.SECURITY_VNC_AUTH])
    viewer_writer.write(bytes([rfb.SECURITY_VNC_AUTH]))
    challenge = await viewer_reader.readexactly(16)
    viewer_writer.write(rfb.vnc_auth_response("nope", challenge))
    result, length = struct.unpack("!II", await viewer_reader.readexactly(8))
    assert result == 1
    assert await viewer_reader.readexactly(length) == b"authentication failed"
    assert await viewer_reader.read() == b""
    viewer_writer.close()
    assert server.streams == []


async def test_two_viewers_at_once(viewer_server: Any, tmp_path: Path) -> None:
    """One viewer stays connected (asking for an exclusive session) while vncdo captures a frame;
    both get frames."""
    server, port = await viewer_server()
    first = await RawViewer.connect(port, PASSWORD)
    assert await first.framebuffer_update() >= 1
    png = tmp_path / "second.png"
    status, output = await vncdo(port, PASSWORD, "capture", str(png))
    assert status == 0, output
    assert banner_rows_vary(png)
    assert await first.framebuffer_update() >= 1
    assert server.streams[0].written.startswith(rfb.VERSION + b"\x01\x01")  # security None, then shared
    await first.close()


async def test_view_only_viewer_cannot_type(viewer_server: Any, display: QemuDisplay) -> None:
    """control=False: keys, pointer and clipboard are dropped before QEMU; frames still flow; a
    viewer with control types into the same guest."""
    watcher, port = await viewer_server(control=False)
    viewer = await RawViewer.connect(port, PASSWORD)
    for keysym in (ord("q"), 0xFFE3):
        viewer.send(key_event(keysym, True) + key_event(keysym, False))
    viewer.send(struct.pack("!BBHH", 5, 1, 10, 10) + struct.pack("!B3xi", 6, 2) + b"hi")
    viewer.send(struct.pack("!BBHII", 255, 0, 1, ord("q"), 0x10) + struct.pack("!BBHII", 255, 0, 0, ord("q"), 0x10))
    assert await viewer.framebuffer_update() >= 1
    written = bytes(watcher.streams[0].written)
    handshake = rfb.VERSION + b"\x01\x01"
    assert written == handshake + struct.pack("!BxHi", 2, 1, 0) + viewer.update_request()
    _, control_port = await viewer_server()
    typist = await RawViewer.connect(control_port, PASSWORD)
    typist.send(key_event(ord("k"), True) + key_event(ord("k"), False))
    await wait_for(lambda: display.serial_text().endswith("k"), timeout=30, message="the key of the viewer in control")
    assert "q" not in display.serial_text().removeprefix(KEY_GUEST_READY)
    await viewer.close()
    await typist.close()


# ---------------------------------------------------------------- fuzzing the relay

def _pixel_format(bits: int, depth: int) -> bytes:
    return struct.pack("!BBBBHHHBBB3x", bits, depth, 0, 1, 255, 255, 255, 16, 8, 0)


VALID_MESSAGES = st.one_of(
    st.tuples(st.sampled_from([(32, 24), (16, 16), (8, 8)])).map(
        lambda t: bytes([0, 0, 0, 0]) + _pixel_format(*t[0])),
    st.lists(st.sampled_from([0, 1, 5, 16, -223, -258, -239]), max_size=8).map(
        lambda encodings: struct.pack(f"!BxH{len(encodings)}i", 2, len(encodings), *encodings)),
    st.tuples(st.booleans(), st.integers(0, 800), st.integers(0, 600), st.integers(0, 800), st.integers(0, 600)).map(
        lambda t: struct.pack("!BBHHHH", 3, *t)),
    st.tuples(st.booleans(), st.integers(0, 0xFFFF)).map(lambda t: struct.pack("!BB2xI", 4, *t)),
    st.tuples(st.integers(0, 255), st.integers(0, 1000), st.integers(0, 1000)).map(
        lambda t: struct.pack("!BBHH", 5, *t)),
    st.binary(max_size=64).map(lambda text: struct.pack("!B3xi", 6, len(text)) + text),
    st.tuples(st.booleans(), st.integers(0, 0xFFFF), st.integers(0, 0x7F)).map(
        lambda t: struct.pack("!BBHII", 255, 0, *t)),
    st.tuples(st.integers(320, 1024), st.integers(200, 768)).map(  # SetDesktopSize, one screen
        lambda t: struct.pack("!BxHHBx", 251, *t, 1) + struct.pack("!IHHHHI", 0, 0, 0, *t, 0)),
)
MALFORMED = st.one_of(
    st.binary(min_size=1, max_size=64).filter(lambda data: data[0] not in (0, 2, 3, 4, 5, 6, 251, 255)),
    st.just(struct.pack("!BxH", 2, rfb.MAX_ENCODINGS + 1) + bytes(4 * (rfb.MAX_ENCODINGS + 1))),
    st.just(struct.pack("!B3xi", 6, rfb.MAX_CUT_TEXT + 1)),
    st.just(struct.pack("!B3xi", 6, -rfb.MAX_CUT_TEXT - 1)),
    st.just(bytes([0, 0, 0, 0]) + _pixel_format(24, 24)),
    st.just(struct.pack("!BBHII", 255, 1, 0, 0, 0)),
    st.just(struct.pack("!BB2xI", 4, 7, 0x61)),
    st.just(struct.pack("!BBHHHH", 3, 2, 0, 0, 1, 1)),
    st.just(struct.pack("!BxHHBx", 251, 800, 600, rfb.MAX_SCREENS + 1)),
)

ENDINGS = st.one_of(
    MALFORMED.map(lambda data: ("malformed", data)),
    VALID_MESSAGES.flatmap(lambda message: st.integers(1, len(message) - 1).map(
        lambda cut: ("truncated", message[:cut]))),
)


def canonical(message: bytes, control: bool) -> bytes:
    """What QEMU is to get for one of VALID_MESSAGES (the test's own reading of RFC 6143 §7.5)."""
    if message[0] in (4, 5, 6, 251, 255) and not control:
        return b""
    return message  # VALID_MESSAGES are built with zero padding and no audio encoding


async def test_fuzzed_messages_never_reach_qemu(display: QemuDisplay) -> None:
    """Well-formed messages, then a malformed one (or garbage), or a message cut short by the viewer
    going: QEMU gets exactly the well-formed ones (view-only: without keys, pointer and clipboard),
    the viewer is disconnected, and another viewer connected all along keeps getting frames."""
    servers = {control: ViewerServer(display, password=None, control=control) for control in (True, False)}
    ports = {control: await server.start() for control, server in servers.items()}
    bystander = await RawViewer.connect(ports[False], None)
    loop = asyncio.get_running_loop()
    examples: list[int] = []

    async def one(valid: list[bytes], ending: tuple[str, bytes], control: bool) -> None:
        server = servers[control]
        streams, outcomes = len(server.streams), len(server.outcomes)
        fuzzer = await RawViewer.connect(ports[control], None)
        kind, tail = ending
        fuzzer.send(b"".join(valid) + tail)
        if kind == "truncated":
            fuzzer.writer.write_eof()
        with contextlib.suppress(ConnectionError):
            while await fuzzer.reader.read(1 << 16):  # frames QEMU sends for the update requests, then the end
                pass
        await fuzzer.close()
        await wait_for(lambda: len(server.outcomes) > outcomes, timeout=30, message="the fuzzer's session to end")
        if kind == "malformed":
            assert isinstance(server.outcomes[-1], rfb.RfbError), server.outcomes[-1]
        else:  # the viewer went in the middle of a message: a normal end, the part is not passed on
            assert server.outcomes[-1] is None, server.outcomes[-1]
        stream = server.streams[streams]
        await wait_for(lambda: stream.closed, timeout=30, message="the fuzzer's stream closed")
        assert bytes(stream.written) == rfb.VERSION + b"\x01\x01" + b"".join(canonical(m, control) for m in valid)
        assert await bystander.framebuffer_update() >= 1

    @settings(max_examples=200, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(valid=st.lists(VALID_MESSAGES, max_size=6), ending=ENDINGS, control=st.booleans())
    def fuzz(valid: list[bytes], ending: tuple[str, bytes], control: bool) -> None:
        asyncio.run_coroutine_threadsafe(one(valid, ending, control), loop).result(60)
        examples.append(len(valid))

    try:
        await loop.run_in_executor(None, fuzz)
        assert len(examples) >= 200
        assert await bystander.framebuffer_update() >= 1
    finally:
        await bystander.close()
        for server in servers.values():
            await server.close()


# ---------------------------------------------------------------- the listener in the IPMI over LAN service

async def test_handshake_deadline(display: QemuDisplay) -> None:
    """A viewer that connects and then says nothing is disconnected at the handshake deadline,
    and QEMU is never reached."""
    opened: list[RecordingStream] = []
    outcome: list[BaseException] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def open_stream() -> RecordingStream:
            opened.append(await RecordingStream.open(display.socket))
            return opened[-1]
        try:
            await rfb.serve_viewer(reader, writer, open_stream, password=PASSWORD, control=True,
                                   handshake_timeout=0.5)
        except Exception as exc:
            outcome.append(exc)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
    assert await reader.readexactly(12) == rfb.VERSION
    assert await reader.read() == b""  # ended by the service
    assert isinstance(outcome[0], TimeoutError) and opened == []
    writer.close()
    server.close()


# ---------------------------------------------------------------- the listener in the IPMI over LAN service

async def test_listener_over_the_bus(services: Any, short_dir: Path, tmp_path: Path) -> None:
    """``vnc = "host:port"`` in the config: the IPMI over LAN service serves the machine's display
    (the machine service's stream over the bus) to vncdo with the password, and its keys reach the
    guest; a wrong password is refused; a viewer beyond the listener's limit is turned away with a
    reason while the others go on."""
    port = free_tcp_port()
    config = write_config(short_dir, f"""
[vm.m1]
{boot_sector_vm(key_echo_disk(short_dir))}vnc = "127.0.0.1:{port}"
vnc_password = "{PASSWORD}"
""")
    await services("machine", config)
    await services("ipmi-lan", config)
    await wait_for(lambda: KEY_GUEST_READY in serial_log(short_dir, "m1"), timeout=60, message="the guest up")
    png = tmp_path / "screen.png"
    status, output = await vncdo(port, PASSWORD, "key", "x", "capture", str(png))
    assert status == 0, output
    assert banner_rows_vary(png)
    await wait_for(lambda: serial_log(short_dir, "m1").endswith("x"), timeout=30, message="the key in the guest")
    status, output = await vncdo(port, "wrong", "capture", str(tmp_path / "never.png"))
    assert status != 0 and "authentication failed" in output

    viewers = [await RawViewer.connect(port, PASSWORD) for _ in range(vnc.MAX_VIEWERS)]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await reader.readexactly(12) == rfb.VERSION
    writer.write(rfb.VERSION)
    count, length = struct.unpack("!BI", await reader.readexactly(5))
    assert count == 0 and b"too many viewers" in await reader.readexactly(length)
    writer.close()
    for viewer in viewers:
        assert await viewer.framebuffer_update() >= 1
        await viewer.close()
    status, output = await vncdo(port, PASSWORD, "capture", str(png))  # a place is free again
    assert status == 0, output
    assert PASSWORD not in (short_dir / "ipmi-lan.log").read_text()


@pytest.mark.parametrize(("keys", "problem"), [
    ({"vnc": "127.0.0.1:5901"}, "vm.m1.vnc_password: missing"),
    ({"vnc": "127.0.0.1:5901", "vnc_password": "123456789"}, "vm.m1.vnc_password: must be 1-8"),
    ({"vnc": "127.0.0.1:5901", "vnc_password": ""}, "vm.m1.vnc_password: must be 1-8"),
    ({"vnc_password": "secret"}, "vm.m1.vnc_password: only with vnc"),
    ({"vnc": "5901", "vnc_password": "secret"}, "vm.m1.vnc: must be \"host:port\""),
    ({"vnc": "0.0.0.0:8443", "vnc_password": "secret"}, "vm.m1.vnc: TCP port 8443 is already taken by redfish.listen"),
])
def test_config_errors_name_the_key(keys: dict[str, str], problem: str) -> None:
    """A VNC listener needs a password (none means no listener: the config is refused rather than
    serving the screen open), of 1-8 characters, on a port nothing else takes."""
    with pytest.raises(ConfigError) as error:
        parse({"vm": {"m1": {"cmd": ["-m", "64"], **keys}}}, None)
    assert problem in str(error.value)
    two = {name: {"cmd": ["-m", "64"], "vnc": "127.0.0.1:5901", "vnc_password": "pw"} for name in ("a", "b")}
    with pytest.raises(ConfigError, match=r"vm\.b\.vnc: TCP port 5901 is already taken by vm\.a\.vnc"):
        parse({"vm": two}, None)
    config = parse({"vm": {"m1": {"cmd": ["-m", "64"], "vnc": "127.0.0.1:5901", "vnc_password": "pw"}}}, None)
    assert config.vms["m1"].vnc == ("127.0.0.1", 5901) and "pw" not in repr(config.vms["m1"])
