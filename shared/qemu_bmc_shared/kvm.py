"""A machine's graphical console over the bus, the front-end side.

:func:`open_kvm` asks the machine service (``kvm.open``) for a stream: one connection of the
machine service to QEMU's VNC server, so one RFB session that starts with QEMU's
``RFB 003.008\\n``. The machine service sends what QEMU says to an inbox of this connection
(KvmOutput, in order, numbered by ``end``); :meth:`KvmStream.write` sends bytes the other way as
requests on ``kvm.input.<stream>``, one at a time (each answered once written to QEMU: a QEMU that
does not read holds the writer, nothing else). Flow control: the machine service sends at most a
window (KvmOpened.window) of bytes this side has not acknowledged on ``kvm.ack.<stream>``, and stops
reading QEMU's socket for the stream meanwhile, so a slow reader holds no one but itself. The ack
subject also carries a keepalive (a request every KEEPALIVE_INTERVAL s): the machine service ends a
stream whose front-end has gone quiet, and this side ends the stream when the keepalive finds
no machine service (it stopped or restarted) or no stream there.

A stream ends when QEMU closes it (power off, QEMU exit), when the machine service stops, on
:meth:`KvmStream.close`, or on a lost or out-of-order message: :meth:`KvmStream.read` then gives
b"" and :meth:`KvmStream.write` raises :class:`KvmClosed`. Open a new stream to go on (a new RFB
session: after a power on, QEMU's VNC server is a new one).

Control (shared mode): a stream opened with ``control=True`` (its viewer's login may type) is
granted control unless the machine has ``kvm_control = "first"`` and another stream holds it
(:attr:`KvmStream.control`); the front-end serves a viewer without control view-only. The holder's
control ends with its stream: the next stream opened that wants it gets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro.request import ERROR_CODE_HEADER

from . import bus, subjects
from .messages import KvmAck, KvmInput, KvmOpen, KvmOpened, KvmOutput, Screenshot, ScreenshotPart

log = logging.getLogger(__name__)

#: Web KVM viewers of one machine at once, on every Redfish replica together (the machine service
#: counts them; Manager.GraphicalConsole.MaxConcurrentSessions).
WEB_VIEWERS = 4
#: Seconds between keepalives (the machine service ends a stream it has not heard of in
#: display.KEEPALIVE_TIMEOUT seconds).
KEEPALIVE_INTERVAL = 5.0
#: Seconds a write or a keepalive waits for the machine service's answer.
REPLY_TIMEOUT = 10.0
#: Largest KvmInput (bytes): longer writes go in several.
INPUT_CHUNK = 65536


class KvmClosed(Exception):
    """The stream has ended (see the module's docstring)."""


class KvmStream:
    """One graphical console stream (from :func:`open_kvm`). ``read`` from one task at a time;
    ``write`` may be called from any task (writes are sent in the order they are called)."""

    def __init__(self, nc: Client, machine: str) -> None:
        self.nc = nc
        self.machine = machine
        self.stream = ""
        self.window = 0
        self.control = False
        """Whether the machine service granted this stream control (keys, pointer)."""
        self.reason = ""
        """Why the stream ended (empty while it has not)."""
        self._output: asyncio.Queue[bytes] = asyncio.Queue()
        self._queued_end = 0
        self._received = 0
        self._acked = 0
        self._ended = False
        self._write_lock = asyncio.Lock()
        self._subscription: Subscription | None = None
        self._keepalive: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- the caller's side

    async def read(self) -> bytes:
        """The next bytes QEMU's VNC server sent; b"" once the stream has ended."""
        if self._output.empty() and self._ended:
            return b""
        data = await self._output.get()
        if not data:
            self._output.put_nowait(b"")  # every later read sees the end too
            return b""
        self._received += len(data)
        if self._received - self._acked >= max(1, self.window // 4):
            self._acked = self._received
            with contextlib.suppress(nats.errors.Error):
                await self.nc.publish(self._subject(subjects.KVM_ACK), bus.encode(KvmAck(received=self._received)))
        return data

    async def write(self, data: bytes) -> None:
        """Send ``data`` to QEMU's VNC server, in order; returns once the machine service has
        written it. Raises KvmClosed when the stream has ended."""
        async with self._write_lock:
            for start in range(0, len(data), INPUT_CHUNK):
                if self._ended:
                    raise KvmClosed(self.reason)
                try:
                    reply = await self.nc.request(self._subject(subjects.KVM_INPUT),
                                                  bus.encode(KvmInput(data=data[start:start + INPUT_CHUNK])),
                                                  timeout=REPLY_TIMEOUT)
                except nats.errors.Error as exc:  # no responders, time-out, connection lost
                    await self._end(f"the machine service did not take the input: {type(exc).__name__}")
                    raise KvmClosed(self.reason) from None
                if reply.headers and ERROR_CODE_HEADER in reply.headers:
                    await self._end(reply.data.decode(errors="replace"))
                    raise KvmClosed(self.reason)

    async def close(self) -> None:
        """End the stream (the machine service closes its connection to QEMU)."""
        if not self._ended and self.stream:
            with contextlib.suppress(nats.errors.Error):
                await self.nc.publish(self._subject(subjects.KVM_ACK),
                                      bus.encode(KvmAck(received=self._received, close=True)))
        await self._end("closed")
        self._output = asyncio.Queue()  # what was not read yet is dropped: reads give b"" from now on
        self._output.put_nowait(b"")

    @property
    def ended(self) -> bool:
        return self._ended

    # ---------------------------------------------------------------- internals

    def _subject(self, operation: str) -> str:
        return subjects.for_stream(self.machine, operation, self.stream)

    async def _output_message(self, msg: Msg) -> None:
        if self._ended:
            return
        try:
            output = bus.decode(msg.data, KvmOutput)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self._end(f"malformed output message: {exc}")
            return
        if output.end != self._queued_end + len(output.data):
            await self._end(f"output lost (at byte {self._queued_end}, next message ends at {output.end})")
            return
        self._queued_end = output.end
        if output.data:
            self._output.put_nowait(output.data)
        if output.closed:
            await self._end(output.reason or "ended by the machine service")

    async def _keep_alive(self) -> None:
        """A keepalive request every KEEPALIVE_INTERVAL s; the stream ends when it is not answered."""
        while not self._ended:
            await asyncio.sleep(KEEPALIVE_INTERVAL)
            try:
                reply = await self.nc.request(self._subject(subjects.KVM_ACK),
                                              bus.encode(KvmAck(received=self._received)), timeout=REPLY_TIMEOUT)
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
                await self._end(f"the machine service has gone ({type(exc).__name__})")
                return
            except nats.errors.Error:
                continue  # the bus connection itself is down for now: try again
            if reply.headers and ERROR_CODE_HEADER in reply.headers:
                await self._end(reply.data.decode(errors="replace"))
                return
            self._acked = max(self._acked, self._received)

    async def _end(self, reason: str) -> None:
        if self._ended:
            return
        self._ended = True
        self.reason = reason
        self._output.put_nowait(b"")
        if self._keepalive is not None and self._keepalive is not asyncio.current_task():
            self._keepalive.cancel()
        if self._subscription is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._subscription.unsubscribe()


async def open_kvm(nc: Client, machine: str, timeout: float = 5.0, *, control: bool = True,
                   web: bool = False) -> KvmStream:
    """Open a graphical console stream to ``machine``'s QEMU VNC server, asking for control when
    ``control`` (the stream's ``control`` says whether it was granted); ``web``: for a viewer of
    the web KVM page (WEB_VIEWERS of them per machine). Raises bus.BusError: ``no_display`` (the
    machine has none), ``invalid_state`` (the machine is off), ``conflict`` (too many streams, or
    web viewers), ``unavailable`` (QEMU's VNC server cannot be reached), ``unknown_machine``,
    ``timeout``."""
    stream = KvmStream(nc, machine)
    inbox = nc.new_inbox()
    stream._subscription = await nc.subscribe(inbox, cb=stream._output_message)
    try:
        opened = await bus.request(nc, machine, subjects.KVM_OPEN, KvmOpen(inbox=inbox, control=control, web=web),
                                   KvmOpened, timeout=timeout)
    except BaseException:
        await stream._end("not opened")
        raise
    stream.stream, stream.window, stream.control = opened.stream, opened.window, opened.control and control
    stream._keepalive = asyncio.ensure_future(stream._keep_alive())
    return stream


async def screenshot(nc: Client, machine: str, timeout: float = 30.0) -> bytes:
    """The machine's screen as PNG bytes (QMP ``screendump``), in as many requests as it has parts.
    Raises bus.BusError as open_kvm."""
    first = await bus.request(nc, machine, subjects.DISPLAY_SCREENSHOT, ScreenshotPart(), Screenshot, timeout=timeout)
    png = bytearray(first.png)
    while len(png) < first.size:
        part = await bus.request(nc, machine, subjects.DISPLAY_SCREENSHOT,
                                 ScreenshotPart(shot=first.shot, offset=len(png)), Screenshot, timeout=timeout)
        if not part.png:
            raise bus.BusError("internal", f"screenshot {first.shot}: an empty part at {len(png)}")
        png += part.png
    return bytes(png)
