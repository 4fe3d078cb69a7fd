"""The graphical console over the bus: a real machine service gives streams to a real QEMU's VNC
server, which a minimal RFB 3.8 client in the test drives; flow control, several streams, power
cycles, attach mode, and screenshots (bus and CLI)."""

from __future__ import annotations

import asyncio
import io
import struct
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from conftest import serial_log, toml_list, wait_for, write_config
from guest_images import NOISE_GUEST_READY, GuestImages, boot_sector_vm, noise_disk
from PIL import Image
from qemu_bmc_machine.display import SCREENSHOT_PART
from qemu_bmc_shared import kvm, subjects
from qemu_bmc_shared.bus import BusError, request
from qemu_bmc_shared.config import ConfigError, load
from qemu_bmc_shared.kvm import KvmClosed, KvmStream, open_kvm
from qemu_bmc_shared.launcher import RuntimeFiles, managed_argv
from qemu_bmc_shared.messages import (
    ErrorReply,
    KvmOpen,
    KvmOpened,
    KvmOutput,
    PowerRequest,
    PowerStatus,
    Screenshot,
    ScreenshotPart,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class RfbClient:
    """The client side of RFB 3.8 (RFC 6143), as much as the tests need: security None, raw frames."""

    def __init__(self, stream: KvmStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.width = self.height = self.bytes_per_pixel = 0

    async def readexactly(self, count: int) -> bytes:
        while len(self.buffer) < count:
            data = await self.stream.read()
            if not data:
                raise EOFError(f"the stream ended: {self.stream.reason}")
            self.buffer += data
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    async def handshake(self) -> None:
        assert await self.readexactly(12) == b"RFB 003.008\n"
        await self.stream.write(b"RFB 003.008\n")
        (count,) = await self.readexactly(1)
        assert 1 in await self.readexactly(count)  # security type None (RFC 6143 §7.1.2)
        await self.stream.write(b"\x01")
        assert await self.readexactly(4) == b"\0\0\0\0"  # SecurityResult OK
        await self.stream.write(b"\x01")  # ClientInit: shared
        self.width, self.height = struct.unpack(">HH", await self.readexactly(4))
        pixel_format = await self.readexactly(16)
        self.bytes_per_pixel = pixel_format[0] // 8
        (name_length,) = struct.unpack(">I", await self.readexactly(4))
        await self.readexactly(name_length)
        await self.stream.write(struct.pack(">BxHi", 2, 1, 0))  # SetEncodings: raw only

    async def request_frame(self) -> None:
        await self.stream.write(struct.pack(">BBHHHH", 3, 0, 0, 0, self.width, self.height))

    async def read_frame(self) -> bytes:
        """The pixels of the next FramebufferUpdate (every rectangle's, one after the other)."""
        while True:
            (message_type,) = await self.readexactly(1)
            if message_type == 0:
                break
            if message_type == 2:  # Bell
                continue
            if message_type == 3:  # ServerCutText
                (length,) = struct.unpack(">3xI", await self.readexactly(7))
                await self.readexactly(length)
                continue
            raise AssertionError(f"unexpected server message {message_type}")
        (rectangles,) = struct.unpack(">xH", await self.readexactly(3))
        pixels = bytearray()
        for _ in range(rectangles):
            _, _, width, height, encoding = struct.unpack(">HHHHi", await self.readexactly(12))
            assert encoding == 0, encoding
            pixels += await self.readexactly(width * height * self.bytes_per_pixel)
        return bytes(pixels)

    async def frame(self) -> bytes:
        await self.request_frame()
        return await self.read_frame()

    def distinct_pixels(self, pixels: bytes) -> int:
        size = self.bytes_per_pixel
        return len({pixels[i:i + size] for i in range(0, len(pixels), size)})


async def viewer(nc, machine: str) -> RfbClient:  # type: ignore[no-untyped-def]
    client = RfbClient(await open_kvm(nc, machine))
    await client.handshake()
    assert client.width > 0 and client.height > 0
    return client


async def screen_has_text(client: RfbClient) -> bool:
    return client.distinct_pixels(await client.frame()) > 1


async def power(nc, machine: str, action: str) -> PowerStatus:  # type: ignore[no-untyped-def]
    return await request(nc, machine, subjects.POWER_SET, PowerRequest(action=action), PowerStatus, timeout=60)


async def drained(stream: KvmStream) -> bool:
    """Reads until the stream ends (b"")."""
    while await stream.read():
        pass
    return True


def with_std_vga(args: list[str]) -> list[str]:
    """The test images' command line without its ``-vga none``: the launcher then adds ``-vga std``."""
    index = args.index("-vga")
    return args[:index] + args[index + 2:]


async def test_kvm_streams_of_a_managed_machine(nc, services, short_dir: Path, images: GuestImages):
    config = write_config(short_dir, f"[vm.n1]\ncmd = {toml_list(with_std_vga(images.qemu_args(nic=False)))}\n")
    machine_service = await services("machine", config, "--stop-vms-on-exit")
    with pytest.raises(BusError) as off:
        await open_kvm(nc, "n1")
    assert off.value.error == "invalid_state"
    with pytest.raises(BusError) as unknown:
        await open_kvm(nc, "ghost")
    assert unknown.value.error == "unknown_machine"

    await power(nc, "n1", "on")
    await wait_for(lambda: "MARKER-HDD" in serial_log(short_dir, "n1"), timeout=60, message="the guest booted")

    # two viewers at once, each its own RFB session; SeaBIOS's banner makes the screen non-uniform
    first, second = await viewer(nc, "n1"), await viewer(nc, "n1")
    assert (first.width, first.height) == (second.width, second.height)
    await wait_for(lambda: screen_has_text(first), timeout=60, message="text on the screen")
    assert await screen_has_text(second)

    # flow control: a viewer that does not read holds only itself, and gets everything in order later
    frame_size = first.width * first.height * first.bytes_per_pixel
    ahead = first.stream.window + 64 * 1024  # the window, and the chunk read when it had room
    assert frame_size > ahead
    await first.request_frame()
    for _ in range(3):
        assert await screen_has_text(second)
    assert first.stream._queued_end - first.stream._received <= ahead
    assert len(await first.read_frame()) == frame_size

    # screenshots: over the bus, and by the CLI
    png = await kvm.screenshot(nc, "n1")
    assert png.startswith(PNG_SIGNATURE)
    image = Image.open(io.BytesIO(png))
    assert image.size == (first.width, first.height)
    darkest, brightest = image.convert("L").getextrema()
    assert darkest < brightest  # not a blank screen
    output = short_dir / "screen.png"
    cli = subprocess.run([sys.executable, "-m", "qemu_bmc", "screenshot", "n1", str(output), "--config", str(config),
                          "--nats", machine_service.argv[machine_service.argv.index("--nats") + 1]],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert Image.open(output).size == (first.width, first.height)
    missing = subprocess.run([sys.executable, "-m", "qemu_bmc", "screenshot", "ghost", str(short_dir / "x.png"),
                              "--config", str(config), "--nats",
                              machine_service.argv[machine_service.argv.index("--nats") + 1]],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "unknown_machine" in missing.stderr

    # a limit on streams per machine; closing one makes room
    extra = [await open_kvm(nc, "n1") for _ in range(14)]
    with pytest.raises(BusError) as full:
        await open_kvm(nc, "n1")
    assert full.value.error == "conflict"
    closed = extra.pop()
    await closed.close()
    assert await closed.read() == b""  # the end of a closed stream, at once
    extra.append(await wait_for(lambda: _opened(nc, "n1"), timeout=20, message="room for a stream"))
    for stream in extra:
        await stream.close()

    # power off ends every stream; after power on a new one works
    await power(nc, "n1", "off")
    for client in (first, second):
        assert await asyncio.wait_for(drained(client.stream), 30)
        with pytest.raises(KvmClosed):
            await client.stream.write(b"\x03\x00\x00\x00\x00\x00\x00\x01\x00\x01")
    with pytest.raises(BusError):
        await kvm.screenshot(nc, "n1")
    await power(nc, "n1", "on")
    again = await viewer(nc, "n1")
    await wait_for(lambda: screen_has_text(again), timeout=60, message="text on the screen after power on")

    # the machine service stopping ends the stream
    await machine_service.stop()
    assert await asyncio.wait_for(drained(again.stream), 30)
    assert "Traceback" not in (short_dir / "machine.log").read_text()


async def _opened(nc, machine: str) -> KvmStream | None:  # type: ignore[no-untyped-def]
    try:
        return await open_kvm(nc, machine)
    except BusError as exc:
        assert exc.error == "conflict"
        return None


async def test_kvm_in_attach_mode(nc, services, short_dir: Path, images: GuestImages):
    qmp, vnc = short_dir / "a-qmp.sock", short_dir / "a-vnc.sock"
    qemu = subprocess.Popen(["qemu-system-x86_64", *with_std_vga(images.qemu_args(nic=False)), "-vga", "std",
                             "-qmp", f"unix:{qmp},server=on,wait=off", "-vnc", f"unix:{vnc}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        config = write_config(short_dir, f'[vm.a1]\nqmp = "{qmp}"\nvnc_socket = "{vnc}"\n'
                                         f'[vm.a2]\nqmp = "{short_dir / "none.sock"}"\n')
        await services("machine", config)
        with pytest.raises(BusError) as no_display:
            await open_kvm(nc, "a2")
        assert no_display.value.error == "no_display"
        await wait_for(lambda: _power_state(nc, "a1", "On"), timeout=30, message="attached and On")
        client = await viewer(nc, "a1")
        await wait_for(lambda: screen_has_text(client), timeout=60, message="text on the screen")
        assert (await kvm.screenshot(nc, "a1")).startswith(PNG_SIGNATURE)

        # malformed input is refused, and the stream goes on
        input_subject = subjects.for_stream("a1", subjects.KVM_INPUT, client.stream.stream)
        refused = await nc.request(input_subject, b'{"data": 5}', timeout=10)
        assert msgspec.json.decode(refused.data, type=ErrorReply).error == "bad_request"
        with pytest.raises(BusError) as elsewhere:  # output only to an inbox, never to a service's subject
            await request(nc, "a1", subjects.KVM_OPEN, KvmOpen(inbox="bmc.a1.power.set"), KvmOpened)
        assert elsewhere.value.error == "bad_request"
        assert await screen_has_text(client)
        await client.stream.close()
        assert await client.stream.read() == b""

        # a front-end that goes quiet (no keepalive, no acknowledgement) has its stream ended
        ended: asyncio.Future[KvmOutput] = asyncio.get_running_loop().create_future()

        async def output(message) -> None:  # type: ignore[no-untyped-def]
            chunk = msgspec.json.decode(message.data, type=KvmOutput)
            if chunk.closed and not ended.done():
                ended.set_result(chunk)

        inbox = nc.new_inbox()
        await nc.subscribe(inbox, cb=output)
        await request(nc, "a1", subjects.KVM_OPEN, KvmOpen(inbox=inbox), KvmOpened)
        closing = await asyncio.wait_for(ended, 120)
        assert "keepalive" in closing.reason and closing.end == len(b"RFB 003.008\n")
        assert "Traceback" not in (short_dir / "machine.log").read_text()
    finally:
        qemu.kill()
        qemu.wait()


async def _power_state(nc, machine: str, state: str) -> bool:  # type: ignore[no-untyped-def]
    try:
        reply = await request(nc, machine, subjects.POWER_GET, None, PowerStatus)
    except BusError:
        return False
    return reply.state == state


async def test_a_screenshot_larger_than_a_message_comes_in_parts(nc, services, short_dir: Path):
    """A 1024x768 screen of noise: its PNG is several bus messages long; kvm.screenshot (the CLI's
    and Redfish's) asks for the parts and gets the whole image."""
    config = write_config(short_dir, f"[vm.n1]\n{boot_sector_vm(noise_disk(short_dir))}")
    await services("machine", config, "--stop-vms-on-exit")
    await wait_for(lambda: NOISE_GUEST_READY in serial_log(short_dir, "n1"), timeout=120, message="the noise drawn")
    png = await kvm.screenshot(nc, "n1")
    assert png.startswith(PNG_SIGNATURE) and len(png) > 3 * SCREENSHOT_PART, len(png)
    image = Image.open(io.BytesIO(png))
    image.load()  # the whole image decodes: no part is missing or twice
    assert image.size == (1024, 768) and len(image.getcolors(1 << 24)) > 10_000
    # the parts one by one, as kvm.screenshot asks for them
    first = await request(nc, "n1", subjects.DISPLAY_SCREENSHOT, ScreenshotPart(), Screenshot)
    assert first.shot and len(first.png) == SCREENSHOT_PART and first.size > SCREENSHOT_PART
    last = await request(nc, "n1", subjects.DISPLAY_SCREENSHOT,
                         ScreenshotPart(shot=first.shot, offset=first.size - 10), Screenshot)
    assert len(last.png) == 10 and last.png.endswith(b"IEND\xaeB`\x82")
    for wrong, error in ((ScreenshotPart(shot=first.shot, offset=first.size + 1), "bad_request"),
                         (ScreenshotPart(shot="0123456789abcdef"), "not_found")):
        with pytest.raises(BusError) as refused:
            await request(nc, "n1", subjects.DISPLAY_SCREENSHOT, wrong, Screenshot)
        assert refused.value.error == error


def test_the_launcher_gives_a_vnc_socket_and_a_display_adapter(tmp_path: Path):
    def argv_of(*args: str) -> list[str]:
        vm = load(write_config(tmp_path, f"[vm.a]\ncmd = {toml_list(list(args))}\n")).vms["a"]
        files = RuntimeFiles(vm.runtime_dir)
        files.prepare()
        argv = managed_argv(vm, files)
        assert argv[argv.index("-vnc") + 1] == f"unix:{files.vnc}"
        return argv

    def std_vga_added(*args: str) -> bool:
        argv = argv_of(*args)
        return any(argv[i:i + 2] == ["-vga", "std"] for i in range(len(argv) - len(args)))

    assert std_vga_added("-m", "64", "-display", "none")
    assert std_vga_added("-nodefaults", "-device", "virtio-net-pci")
    assert not std_vga_added("-vga", "none")
    assert not std_vga_added("-vga", "virtio")
    assert not std_vga_added("-device", "virtio-vga,id=v0")
    assert not std_vga_added("-device", "driver=bochs-display")
    assert not std_vga_added("-nographic")


def test_vnc_socket_is_for_attach_mode(tmp_path: Path):
    vm = load(write_config(tmp_path, '[vm.a]\nqmp = "q.sock"\nvnc_socket = "v.sock"\n')).vms["a"]
    assert vm.vnc_socket == tmp_path / "v.sock"
    with pytest.raises(ConfigError, match="vnc_socket"):
        load(write_config(tmp_path, '[vm.a]\ncmd = ["-m", "64"]\nvnc_socket = "v.sock"\n'))
