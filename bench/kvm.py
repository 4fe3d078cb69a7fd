"""Graphical console (issue 15): key-to-screen latency, frames per second and bandwidth of a
machine's screen through qemu-bmc's paths vs the direct pair the Go qemu-bmc plan uses
(websockify in front of QEMU's own VNC socket, for noVNC), on this machine, over loopback.

``qemu-bmc up -c CONFIG`` with two managed machines under TCG (``-vga std``, VGA text mode
720x400): ``keys`` boots tests/guest_images.py's KEY_GUEST (echoes each key the BIOS reads to the
screen; its cursor hidden, so the screen changes only when a key arrives) and has a VNC listener
(``vnc``, ``vnc_password``); ``busy`` boots a boot sector (BUSY_GUEST, below) that rewrites all
2000 text cells at every timer tick (18.2 Hz), so its whole screen changes all the time. One RFB
client (this file: RFB 3.8, encodings zlib and raw, DesktopSize; it keeps one incremental
FramebufferUpdateRequest outstanding all the time, as noVNC does, and keeps a copy of the
framebuffer to see which updates change pixels) is used over each path, so only the server path
differs:

- ``web KVM``: WebSocket to the Redfish service's ``/kvm/{m}/ws?ticket=...`` (a ticket from
  ``GET /kvm/{m}/ticket``, what the page does): Redfish → NATS → machine service → QEMU's
  ``vnc.sock``;
- ``websockify``: WebSocket to ``websockify --unix-target=<runtime>/vm/{m}/vnc.sock`` (PyPI,
  in the bench extra): the direct path;
- ``VNC listener``: TCP to ``vnc = ...`` with VNC Authentication (the ipmi-lan service, then the
  bus);
- ``bus stream``: ``qemu_bmc_shared.kvm.open_kvm`` in this process: the bus hop alone (NATS and
  the machine service, no front-end);
- ``vnc.sock``: QEMU's own socket, no proxy at all.

The paths take turns in rounds (the order reversed every other round, after a warm-up turn each).
Each turn connects to ``keys``, sends ``--keys`` keys at each pace of PACES (a key press and
release; after the previous key's change was seen, a pause of 150-250 ms: single keys, or 30-40
ms: typing) and times each from the send to the first FramebufferUpdate whose pixels differ
(QEMU's VNC server sends an update only for a change: a character drawn); then counts the
bytes of IDLE_SECONDS of the idle screen; then connects to ``busy`` for BUSY_SECONDS and counts
the updates that change pixels (frames per second) and the bytes. Bytes are RFB bytes (WebSocket
payloads, or the TCP stream); for the bus paths also what nats-server wrote meanwhile (its
``/proc/PID/io`` wchar: the bus's own traffic, JSON with base64 data).

QEMU's VNC server refreshes on a timer that starts at 30 ms and grows by 50 ms (up to 3 s) at each
refresh that finds nothing changed, halving when it finds a change: a key's latency includes the
wait for that timer, the same on every path, and depends on how long the screen was still before
(hence the two paces). The guest itself echoes a key on its serial port within a millisecond.

Target (issue 15): web KVM latency at most 1.5x websockify's and under 50 ms at p50.

    .venv/bin/pip install -e .[bench]; .venv/bin/python bench/kvm.py [--rounds 5] [--keys 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Protocol

import httpx
import uvloop
from qemu_bmc_shared import bus, kvm, subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.messages import ConsoleHistory
from qemu_bmc_shared.rfb import vnc_auth_response
from websockets.asyncio import client as websockets_client

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from guest_images import KEY_GUEST, KEY_GUEST_READY, SCREEN_BOOT_SECTOR_START, assemble
from ports import free_tcp_port, free_udp_ports
from processes import processes_with
from waiting import wait_for

USER, PASSWORD = "admin", "password"
VNC_PASSWORD = "bench15"
KEYS, BUSY = "keys", "busy"
PATHS = ("web KVM", "websockify", "VNC listener", "bus stream", "vnc.sock")
PACES = {"single keys": (0.15, 0.25), "typing": (0.03, 0.04)}
"""Seconds between a key's change seen and the next key (uniformly random in the range)."""
KEY_DEADLINE = 5.0
IDLE_SECONDS = 2.0
BUSY_SECONDS = 3.0
QEMU_ARGS = ["-machine", "q35", "-accel", "tcg", "-m", "64", "-nodefaults", "-vga", "std"]

#: A boot sector that hides the cursor and, at every timer tick (hlt: 18.2 Hz), writes all 2000
#: cells of the text screen with characters one further than the last time: the whole screen
#: changes about 18 times a second.
BUSY_GUEST = SCREEN_BOOT_SECTOR_START + r"""
    mov ax, 0xb800
    mov es, ax
    xor bl, bl
frame:
    hlt                         ; until the next interrupt (the timer's, 18.2 Hz)
    inc bl
    xor di, di
    mov cx, 2000
    mov al, bl
.cell:
    mov ah, 0x07
    stosw
    inc al
    loop .cell
    jmp frame
times 510-($-$$) db 0
dw 0xaa55
"""


class Transport(Protocol):
    received: int

    async def recv(self) -> bytes: ...

    async def send(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


class WebSocketTransport:
    """Binary WebSocket messages (what noVNC sends and takes)."""

    def __init__(self, connection: websockets_client.ClientConnection) -> None:
        self.connection = connection
        self.received = 0

    @classmethod
    async def connect(cls, url: str, origin: str | None = None) -> WebSocketTransport:
        connection = await websockets_client.connect(url, origin=origin, max_size=None)  # type: ignore[arg-type]
        return cls(connection)

    @property
    def compression(self) -> str:
        return self.connection.response.headers.get("Sec-WebSocket-Extensions", "") if self.connection.response else ""

    async def recv(self) -> bytes:
        data = await self.connection.recv()
        data = data if isinstance(data, bytes) else data.encode()
        self.received += len(data)
        return data

    async def send(self, data: bytes) -> None:
        await self.connection.send(data)

    async def close(self) -> None:
        await self.connection.close()


class SocketTransport:
    """A TCP or unix stream socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.received = 0
        self.compression = ""

    async def recv(self) -> bytes:
        data = await self.reader.read(65536)
        self.received += len(data)
        return data

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


class BusTransport:
    """A KvmStream: RFB straight to QEMU over the bus (no front-end)."""

    def __init__(self, stream: kvm.KvmStream) -> None:
        self.stream = stream
        self.received = 0
        self.compression = ""

    async def recv(self) -> bytes:
        data = await self.stream.read()
        self.received += len(data)
        return data

    async def send(self, data: bytes) -> None:
        await self.stream.write(data)

    async def close(self) -> None:
        await self.stream.close()


class RfbClient:
    """An RFB 3.8 viewer: the handshake, then a reader that keeps the framebuffer and one
    incremental update request outstanding; ``changes`` counts updates that changed pixels."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.buffer = bytearray()
        self.width = self.height = 0
        self.bpp = 4
        self.framebuffer = bytearray()
        self.inflater = zlib.decompressobj()
        self.updates = 0
        self.changes = 0
        self.changed_at = 0.0
        self.changed = asyncio.Condition()
        self.reader: asyncio.Task[None] | None = None

    async def take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            data = await self.transport.recv()
            if not data:
                raise ConnectionError("the server closed the connection")
            self.buffer += data
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def handshake(self, password: str | None = None) -> None:
        version = await self.take(12)
        if not version.startswith(b"RFB 003."):
            raise ConnectionError(f"not RFB: {version!r}")
        await self.transport.send(b"RFB 003.008\n")
        types = await self.take((await self.take(1))[0])
        if not types:
            raise ConnectionError((await self.take(int.from_bytes(await self.take(4), "big"))).decode())
        if password is None:
            await self.transport.send(b"\x01")
        else:
            await self.transport.send(b"\x02")
            await self.transport.send(vnc_auth_response(password, await self.take(16)))
        if await self.take(4) != b"\0\0\0\0":
            raise ConnectionError("security failed")
        await self.transport.send(b"\x01")  # ClientInit: shared
        init = await self.take(24)
        self.width, self.height = struct.unpack(">HH", init[:4])
        self.bpp = init[4] // 8
        await self.take(int.from_bytes(init[20:24], "big"))
        self.framebuffer = bytearray(self.width * self.height * self.bpp)
        encodings = (6, 0, -223)  # zlib, raw, DesktopSize
        await self.transport.send(struct.pack(f">BxH{len(encodings)}i", 2, len(encodings), *encodings))
        await self.request(incremental=False)
        self.reader = asyncio.ensure_future(self.read_updates())
        await self.wait_change(0, KEY_DEADLINE * 4)  # the first, full update

    async def request(self, incremental: bool = True) -> None:
        await self.transport.send(struct.pack(">BBHHHH", 3, incremental, 0, 0, self.width, self.height))

    async def read_updates(self) -> None:
        while True:
            kind = (await self.take(1))[0]
            if kind == 0:
                count = struct.unpack(">xH", await self.take(3))[0]
                changed = False
                for _ in range(count):
                    changed |= await self.rectangle()
                self.updates += 1
                await self.request()
                if changed:
                    async with self.changed:
                        self.changes += 1
                        self.changed_at = time.perf_counter()
                        self.changed.notify_all()
            elif kind == 1:  # SetColourMapEntries
                await self.take(6 * struct.unpack(">xHH", await self.take(5))[1])
            elif kind == 2:  # Bell
                pass
            elif kind == 3:  # ServerCutText
                await self.take(int.from_bytes((await self.take(7))[3:], "big"))
            else:
                raise ConnectionError(f"unexpected server message {kind}")

    async def rectangle(self) -> bool:
        """Read one rectangle into the framebuffer; whether it changed pixels."""
        x, y, w, h, encoding = struct.unpack(">HHHHi", await self.take(12))
        if encoding == -223:
            self.width, self.height = w, h
            self.framebuffer = bytearray(w * h * self.bpp)
            return True
        if encoding == 0:
            pixels = await self.take(w * h * self.bpp)
        elif encoding == 6:
            pixels = self.inflater.decompress(await self.take(int.from_bytes(await self.take(4), "big")))
        else:
            raise ConnectionError(f"unexpected encoding {encoding}")
        row = w * self.bpp
        changed = False
        view = memoryview(pixels)
        for line in range(h):
            start = ((y + line) * self.width + x) * self.bpp
            new = view[line * row:(line + 1) * row]
            if self.framebuffer[start:start + row] != new:
                self.framebuffer[start:start + row] = new
                changed = True
        return changed

    async def wait_change(self, seen: int, timeout: float) -> float:
        """Wait until more than ``seen`` updates changed pixels; when the last one did."""
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(lambda: self.changes > seen or (self.reader is not None
                                                                        and self.reader.done()))
        if self.reader is not None and self.reader.done():
            self.reader.result()
        return self.changed_at

    async def key(self, keysym: int) -> float:
        """Press and release a key; seconds until an update changed pixels."""
        seen = self.changes
        sent = time.perf_counter()
        await self.transport.send(struct.pack(">BBxxI", 4, 1, keysym) + struct.pack(">BBxxI", 4, 0, keysym))
        return await self.wait_change(seen, KEY_DEADLINE) - sent

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(BaseException):
                await self.reader
        with contextlib.suppress(Exception):
            await self.transport.close()


class Deployment:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.runtime = work / "rt"
        self.redfish_port, self.vnc_port = free_tcp_port(), free_tcp_port()
        self.websockify_ports = {KEYS: free_tcp_port(), BUSY: free_tcp_port()}
        disks = {}
        for name, source in ((KEYS, KEY_GUEST), (BUSY, BUSY_GUEST)):
            disks[name] = work / f"{name}.img"
            disks[name].write_bytes(assemble(source, name, work).ljust(1024 * 1024, b"\0"))

        def argv(name: str) -> str:
            return toml_list([*QEMU_ARGS, "-drive", f"if=none,id=hd0,file={disks[name]},format=raw,snapshot=on",
                              "-device", "ide-hd,drive=hd0,bootindex=1"])

        self.config = work / "qemu-bmc.toml"
        self.config.write_text(
            f'runtime_dir = "{self.runtime}"\n[redfish]\nlisten = "127.0.0.1:{self.redfish_port}"\ntls = false\n'
            f'[vm.{KEYS}]\ncmd = {argv(KEYS)}\nipmi = "127.0.0.1:{free_udp_ports()}"\n'
            f'vnc = "127.0.0.1:{self.vnc_port}"\nvnc_password = "{VNC_PASSWORD}"\n'
            f'[vm.{BUSY}]\ncmd = {argv(BUSY)}\n')
        self.log = work / "up.log"
        self.up: asyncio.subprocess.Process | None = None
        self.websockify: list[subprocess.Popen[bytes]] = []
        self.nc = None
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.redfish_port}", auth=(USER, PASSWORD))

    def vnc_socket(self, machine: str) -> Path:
        return self.runtime / "vm" / machine / "vnc.sock"

    async def start(self) -> None:
        with self.log.open("wb") as output:
            self.up = await asyncio.create_subprocess_exec(sys.executable, "-m", "qemu_bmc", "up", "-c",
                                                           str(self.config), stdout=output, stderr=output)
        await wait_for(lambda: "Ctrl-C stops everything" in self.log.read_text(), 120, 0.1, "qemu-bmc up")
        self.nc = await bus.connect((self.runtime / "nats.url").read_text().strip(), "bench-kvm")
        for machine in (KEYS, BUSY):
            power = await asyncio.create_subprocess_exec(sys.executable, "-m", "qemu_bmc", "power", "on", machine,
                                                         "-c", str(self.config), stdout=asyncio.subprocess.DEVNULL)
            await power.wait()
        await wait_for(self.keys_ready, 120, 0.2, "KVM-READY on the keys machine's COM1")
        for machine, port in self.websockify_ports.items():
            await wait_for(self.vnc_socket(machine).exists, 60, 0.1, f"{machine}'s vnc.sock")
            self.websockify.append(subprocess.Popen(
                [str(Path(sys.executable).parent / "websockify"), f"--unix-target={self.vnc_socket(machine)}",
                 f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        await wait_for(self.vnc_listening, 60, 0.1, "the VNC listener")
        for port in self.websockify_ports.values():
            await wait_for(lambda port=port: listening(port), 60, 0.1, "websockify")

    async def keys_ready(self) -> bool:
        try:
            history = await bus.request(self.nc, KEYS, subjects.CONSOLE_GET, None, ConsoleHistory, timeout=2)
        except BusError:
            return False
        return KEY_GUEST_READY.encode() in history.data

    async def vnc_listening(self) -> bool:
        return await listening(self.vnc_port)

    async def connect(self, path: str, machine: str) -> tuple[RfbClient, Transport]:
        transport: Transport
        password = None
        if path == "web KVM":
            ticket = (await self.http.get(f"/kvm/{machine}/ticket")).raise_for_status().json()["ticket"]
            origin = f"http://127.0.0.1:{self.redfish_port}"
            transport = await WebSocketTransport.connect(
                f"ws://127.0.0.1:{self.redfish_port}/kvm/{machine}/ws?ticket={ticket}", origin)
        elif path == "websockify":
            transport = await WebSocketTransport.connect(f"ws://127.0.0.1:{self.websockify_ports[machine]}/")
        elif path == "VNC listener":
            if machine != KEYS:
                raise LookupError(machine)
            transport = SocketTransport(*await asyncio.open_connection("127.0.0.1", self.vnc_port))
            password = VNC_PASSWORD
        elif path == "bus stream":
            transport = BusTransport(await kvm.open_kvm(self.nc, machine))
        else:
            transport = SocketTransport(*await asyncio.open_unix_connection(str(self.vnc_socket(machine))))
        client = RfbClient(transport)
        try:
            await client.handshake(password)
        except BaseException:
            await client.close()
            raise
        return client, transport

    async def stop(self) -> None:
        for process in self.websockify:
            process.terminate()
            process.wait()
        if self.nc is not None:
            await self.nc.close()
        await self.http.aclose()
        if self.up is not None and self.up.returncode is None:
            self.up.send_signal(2)
            await self.up.wait()


def toml_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


async def listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


def nats_written(deployment: Deployment) -> int:
    pids = processes_with(str(deployment.runtime / "nats"))
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/io").read_text().splitlines():
                if line.startswith("wchar:"):
                    total += int(line.split()[1])
    return total


class Figures:
    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = {pace: [] for pace in PACES}
        self.idle_bytes: list[float] = []
        self.busy_fps: list[float] = []
        self.busy_bytes: list[float] = []
        self.idle_bus: list[float] = []
        self.busy_bus: list[float] = []
        self.compression = ""


async def counted(deployment: Deployment, transport: Transport, client: RfbClient, seconds: float,
                  ) -> tuple[float, float, float]:
    """Over ``seconds``: RFB bytes/s, changing updates/s, nats-server bytes written/s."""
    received, changes, written = transport.received, client.changes, nats_written(deployment)
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    if client.reader is not None and client.reader.done():
        client.reader.result()
    elapsed = time.perf_counter() - started
    return ((transport.received - received) / elapsed, (client.changes - changes) / elapsed,
            (nats_written(deployment) - written) / elapsed)


async def turn(deployment: Deployment, path: str, figures: Figures, keys: int) -> None:
    client, transport = await deployment.connect(path, KEYS)
    try:
        figures.compression = getattr(transport, "compression", "")
        for pace, pauses in PACES.items():
            for index in range(keys):
                await asyncio.sleep(random.uniform(*pauses))
                figures.latencies[pace].append(await client.key(ord("a") + index % 26))
        await asyncio.sleep(0.3)  # the last key's echo settles
        rate, _, bus_rate = await counted(deployment, transport, client, IDLE_SECONDS)
        figures.idle_bytes.append(rate)
        figures.idle_bus.append(bus_rate)
    finally:
        await client.close()
    if path == "VNC listener":  # the listener serves the keys machine only
        return
    client, transport = await deployment.connect(path, BUSY)
    try:
        await asyncio.sleep(0.5)
        rate, fps, bus_rate = await counted(deployment, transport, client, BUSY_SECONDS)
        figures.busy_bytes.append(rate)
        figures.busy_fps.append(fps)
        figures.busy_bus.append(bus_rate)
    finally:
        await client.close()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def median(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f}" if values else "-"


async def main(arguments: argparse.Namespace) -> None:
    paths = arguments.paths.split(",")
    figures = {path: Figures() for path in paths}
    with tempfile.TemporaryDirectory(prefix="qb-kvm-", dir="/tmp") as directory:
        deployment = Deployment(Path(directory))
        try:
            await deployment.start()
            for path in paths:  # a warm-up turn each (not counted)
                await turn(deployment, path, Figures(), 2)
            for round_number in range(arguments.rounds):
                order = paths if round_number % 2 == 0 else paths[::-1]
                for path in order:
                    await turn(deployment, path, figures[path], arguments.keys)
                    print(f"round {round_number + 1}: {path}: key p50 " + ", ".join(
                        f"{pace} {statistics.median(values) * 1000:.1f} ms"
                        for pace, values in figures[path].latencies.items()), file=sys.stderr)
        finally:
            await deployment.stop()
    print(f"\n{arguments.rounds} rounds, {arguments.keys} keys per pace per path per round\n")
    print("| path | pace | key p50 ms | p90 ms | p99 ms | max ms | keys |")
    print("|---|---|---|---|---|---|---|")
    for path, figure in figures.items():
        for pace, values in figure.latencies.items():
            milliseconds = [value * 1000 for value in values]
            print(f"| {path} | {pace} | {percentile(milliseconds, 0.5):.1f} | {percentile(milliseconds, 0.9):.1f} | "
                  f"{percentile(milliseconds, 0.99):.1f} | {max(milliseconds):.1f} | {len(milliseconds)} |")
    print("\n| path | busy frames/s | busy RFB bytes/s | idle RFB bytes/s | busy nats-server bytes/s "
          "| idle nats-server bytes/s | WebSocket extension |")
    print("|---|---|---|---|---|---|---|")
    for path, figure in figures.items():
        on_bus = path in ("web KVM", "VNC listener", "bus stream")
        fps = f"{statistics.median(figure.busy_fps):.1f}" if figure.busy_fps else "-"
        print(f"| {path} | {fps} | {median(figure.busy_bytes)} | {median(figure.idle_bytes)} | "
              f"{median(figure.busy_bus) if on_bus else '-'} | {median(figure.idle_bus) if on_bus else '-'} | "
              f"{figure.compression or '-'} |")
    if "web KVM" in figures and "websockify" in figures:
        for pace in PACES:
            ours = percentile(figures["web KVM"].latencies[pace], 0.5)
            direct = percentile(figures["websockify"].latencies[pace], 0.5)
            print(f"\n{pace}: web KVM / websockify key latency at p50: {ours / direct:.2f}x ({ours * 1000:.1f} vs "
                  f"{direct * 1000:.1f} ms); target at most 1.5x and under 50 ms: "
                  f"{'met' if ours <= 1.5 * direct and ours < 0.05 else 'not met'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keys", type=int, default=10, help="keys per path per round (default: %(default)s)")
    parser.add_argument("--paths", default=",".join(PATHS), help="default: %(default)s")
    options = parser.parse_args()
    uvloop.run(main(options))
