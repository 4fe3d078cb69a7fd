"""A machine's graphical console on the bus, the machine side (the front-end side and the
protocol are in qemu_bmc_shared/kvm.py).

Each stream is one connection to QEMU's VNC server socket (managed: ``vnc.sock`` of the runtime
directory; attach: the configured ``vnc_socket``): what QEMU sends goes to the front-end's inbox
as KvmOutput messages, at most WINDOW bytes ahead of the front-end's acknowledgements (this side
stops reading QEMU's socket for that stream meanwhile); what the front-end writes
(``kvm.input.<stream>``) is written to QEMU in order. A stream ends when QEMU closes the
connection (QEMU exits: a managed machine's power off), when the machine powers off (attach mode:
QEMU stays, stopped), when the front-end closes it or is not heard of for KEEPALIVE_TIMEOUT
seconds, and when the service stops. Screenshots are QMP ``screendump`` in PNG.

Control (real BMCs' shared mode): with ``kvm_control = "first"`` one stream at a time has it,
the first opened asking for it (KvmOpen.control) while no other holds it; it is free again when
that stream ends. With ``"all"`` (the default) every stream that asks has it. The front-end serves
a stream without control view-only (this side relays bytes, it does not parse RFB).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.kvm import WEB_VIEWERS
from qemu_bmc_shared.messages import (
    Empty,
    ErrorReply,
    KvmAck,
    KvmInput,
    KvmOpen,
    KvmOpened,
    KvmOutput,
    Message,
    Screenshot,
    ScreenshotPart,
)

if TYPE_CHECKING:
    from .machine import Machine

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

#: Bytes a stream sends ahead of the front-end's acknowledgements.
WINDOW = 1 << 20
#: Bytes read from QEMU's socket (and sent) at a time: well under NATS's 1 MB message limit once base64.
CHUNK = 64 * 1024
#: Streams of one machine at a time (each holds a connection to QEMU and a window of memory).
MAX_STREAMS = 16
#: Seconds without a keepalive, acknowledgement or input after which a stream is ended (the
#: front-end sends a keepalive every kvm.KEEPALIVE_INTERVAL = 5 s).
KEEPALIVE_TIMEOUT = 20.0
#: Seconds between checks for silent front-ends.
SWEEP_INTERVAL = 2.0
#: Seconds to connect to QEMU's VNC socket, and to write one input to it.
SOCKET_TIMEOUT = 10.0
#: PNG bytes a screenshot reply carries (base64 in JSON must stay under NATS's 1 MB message limit):
#: a larger screenshot goes in parts, which the front-end asks for one by one.
SCREENSHOT_PART = 512 * 1024
#: Seconds a screenshot in parts is kept for those requests.
SHOT_KEPT = 30.0
#: Screenshots kept at once per machine (the oldest goes first).
SHOTS_KEPT = 4


class Stream:
    """One front-end's connection to QEMU's VNC server."""

    def __init__(self, display: Display, stream_id: str, inbox: str, connection: socket.socket, web: bool) -> None:
        self.display = display
        self.id = stream_id
        self.inbox = inbox
        self.web = web
        self.connection = connection
        self.sent = 0
        self.acked = 0
        self.heard = time.monotonic()
        self.room = asyncio.Event()
        self.ended = False
        self.subscriptions: list[Subscription] = []
        self.pump: asyncio.Task[None] | None = None

    @property
    def nc(self) -> Client:
        return self.display.nc

    async def start(self) -> None:
        machine = self.display.machine.name
        self.subscriptions = [
            await self.nc.subscribe(subjects.for_stream(machine, subjects.KVM_INPUT, self.id), cb=self._input),
            await self.nc.subscribe(subjects.for_stream(machine, subjects.KVM_ACK, self.id), cb=self._ack),
        ]
        self.pump = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        """QEMU's bytes to the front-end, while the window has room."""
        loop = asyncio.get_running_loop()
        reason = "QEMU closed the display connection"
        try:
            while True:
                while self.sent - self.acked >= WINDOW:
                    self.room.clear()
                    await self.room.wait()
                data = await loop.sock_recv(self.connection, CHUNK)
                if not data:
                    break
                self.sent += len(data)
                await self.nc.publish(self.inbox, bus.encode(KvmOutput(data=data, end=self.sent)))
        except (OSError, nats.errors.Error) as exc:
            reason = f"display connection failed: {type(exc).__name__}"
        await self.end(reason)

    async def _heard(self, msg: Msg, kind: type[M]) -> M | None:
        """The front-end's message (it is alive), or None once its sender has been told what is wrong."""
        self.heard = time.monotonic()
        try:
            return bus.decode(msg.data, kind)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self._reply_error(msg, BusError("bad_request", f"{kind.__name__}: {exc}"))
            return None

    async def _input(self, msg: Msg) -> None:
        """Bytes for QEMU, in order (this subscription's messages are handled one at a time)."""
        request = await self._heard(msg, KvmInput)
        if request is None:
            return
        if self.ended:
            await self._reply_error(msg, BusError("invalid_state", "the stream has ended"))
            return
        try:
            async with asyncio.timeout(SOCKET_TIMEOUT):
                await asyncio.get_running_loop().sock_sendall(self.connection, request.data)
        except (OSError, TimeoutError) as exc:
            await self._reply_error(msg, BusError("unavailable", f"QEMU's VNC server took no input: {exc!r}"))
            await self.end("QEMU's VNC server took no input")
            return
        if msg.reply:
            await msg.respond(bus.encode(Empty()))

    async def _ack(self, msg: Msg) -> None:
        ack = await self._heard(msg, KvmAck)
        if ack is None:
            return
        self.acked = max(self.acked, min(ack.received, self.sent))
        self.room.set()
        if msg.reply:
            await msg.respond(bus.encode(Empty()))
        if ack.close:
            await self.end("closed by the front-end")

    async def _reply_error(self, msg: Msg, error: BusError) -> None:
        """An error reply as bus.request understands it (nats.micro headers, ErrorReply body)."""
        if msg.reply:
            with contextlib.suppress(nats.errors.Error):
                await self.nc.publish(msg.reply, bus.encode(ErrorReply(error=error.error, message=error.message)),
                                      headers={ERROR_CODE_HEADER: str(bus.ERROR_CODES[error.error]),
                                               ERROR_HEADER: error.message})

    async def end(self, reason: str) -> None:
        """Close the connection to QEMU and tell the front-end (the last KvmOutput, ``closed``)."""
        if self.ended:
            return
        self.ended = True
        self.display.streams.pop(self.id, None)
        if self.display.controller == self.id:
            self.display.controller = None
        if self.pump is not None and self.pump is not asyncio.current_task():
            self.pump.cancel()
        self.connection.close()
        log.info("%s: display stream %s ended: %s", self.display.machine.name, self.id, reason)
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(self.inbox, bus.encode(KvmOutput(data=b"", end=self.sent, closed=True,
                                                                   reason=reason)))
        # last: called from one of these subscriptions' own callbacks, unsubscribing cancels it
        for subscription in self.subscriptions:
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()


class Display:
    """The graphical console streams and screenshots of one machine."""

    def __init__(self, machine: Machine, nc: Client) -> None:
        self.machine = machine
        self.nc = nc
        self.socket_path: Path | None = machine.files.vnc if machine.vm.mode == "managed" else machine.vm.vnc_socket
        self.streams: dict[str, Stream] = {}
        self.controller: str | None = None
        """``kvm_control = "first"``: the stream that has control (None: nobody)."""
        self._sweeper: asyncio.Task[None] | None = None
        self.shots: dict[str, tuple[bytes, float]] = {}
        """Screenshots larger than a message: id → (PNG, when it is forgotten)."""

    def start(self) -> None:
        self._sweeper = asyncio.ensure_future(self._sweep())

    async def open(self, request: KvmOpen) -> KvmOpened:
        name = self.machine.name
        if self.socket_path is None:
            raise BusError("no_display", f"machine {name} has no display (attach mode: set vnc_socket)")
        if self.machine.power_state == "Off":
            raise BusError("invalid_state", f"machine {name} is off")
        if len(self.streams) >= MAX_STREAMS:
            raise BusError("conflict", f"machine {name} has {MAX_STREAMS} graphical console streams open already")
        if request.web and sum(stream.web for stream in self.streams.values()) >= WEB_VIEWERS:
            raise BusError("conflict", f"machine {name} has {WEB_VIEWERS} web console viewers already")
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.setblocking(False)
        try:
            async with asyncio.timeout(SOCKET_TIMEOUT):
                await asyncio.get_running_loop().sock_connect(connection, str(self.socket_path))
        except (OSError, TimeoutError) as exc:
            connection.close()
            raise BusError("unavailable", f"cannot reach the VNC server of machine {name}: {exc!r}") from None
        stream = Stream(self, secrets.token_hex(8), request.inbox, connection, request.web)
        self.streams[stream.id] = stream
        control = request.control and (self.machine.vm.kvm_control == "all" or self.controller is None)
        if control and self.machine.vm.kvm_control == "first":
            self.controller = stream.id
        await stream.start()
        log.info("%s: display stream %s opened (%d open)%s", name, stream.id, len(self.streams),
                 "" if control else ", view only")
        return KvmOpened(stream=stream.id, window=WINDOW, control=control)

    async def end_all(self, reason: str) -> None:
        await asyncio.gather(*(stream.end(reason) for stream in list(self.streams.values())))

    async def _sweep(self) -> None:
        """End the streams whose front-end has gone quiet."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            quiet = time.monotonic() - KEEPALIVE_TIMEOUT
            for stream in list(self.streams.values()):
                if stream.heard < quiet:
                    await stream.end(f"no keepalive from the front-end for {KEEPALIVE_TIMEOUT:g} s")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.end_all("the machine service is stopping")

    async def screenshot(self, request: ScreenshotPart) -> Screenshot:
        """A new screenshot, or a part of one taken before (``request.shot``)."""
        now = time.monotonic()
        self.shots = {shot: kept for shot, kept in self.shots.items() if kept[1] > now}
        if request.shot:
            if request.shot not in self.shots:
                raise BusError("not_found", f"screenshot {request.shot} is gone (its parts are kept {SHOT_KEPT:g} s)")
            png, shot = self.shots[request.shot][0], request.shot
        else:
            png, shot = await self._screendump(), ""
            if len(png) > SCREENSHOT_PART:
                shot = secrets.token_hex(8)
                self.shots[shot] = (png, now + SHOT_KEPT)
                while len(self.shots) > SHOTS_KEPT:
                    del self.shots[next(iter(self.shots))]
        if request.offset > len(png):
            raise BusError("bad_request", f"offset {request.offset} is past the screenshot's {len(png)} bytes")
        return Screenshot(png=png[request.offset:request.offset + SCREENSHOT_PART], size=len(png), shot=shot)

    async def _screendump(self) -> bytes:
        """QMP ``screendump`` (PNG) to a file of the runtime directory, read and removed."""
        if self.machine.power_state == "Off":
            raise BusError("invalid_state", f"machine {self.machine.name} is off")
        path = self.machine.files.directory / f"screendump-{secrets.token_hex(4)}.png"
        try:
            await self.machine._execute("screendump", {"filename": str(path), "format": "png"})
            png = path.read_bytes()
        except OSError as exc:
            raise BusError("qemu_error", f"no screendump from QEMU: {exc.strerror}") from None
        finally:
            path.unlink(missing_ok=True)
        return png


def endpoints(display: Display) -> list[bus.Endpoint]:
    """``kvm.open`` and ``display.screenshot`` of one machine."""
    name = display.machine.name

    async def kvm_open(_: str, request: KvmOpen) -> KvmOpened:
        return await display.open(request)

    async def screenshot(_: str, request: ScreenshotPart) -> Screenshot:
        return await display.screenshot(request)

    return [bus.Endpoint(name=f"{name}-kvm-open", subject=subjects.for_machine(name, subjects.KVM_OPEN),
                         request_type=KvmOpen, handler=kvm_open),
            bus.Endpoint(name=f"{name}-display-screenshot",
                         subject=subjects.for_machine(name, subjects.DISPLAY_SCREENSHOT),
                         request_type=ScreenshotPart, handler=screenshot)]
