"""One machine's in-band BMC: every request QEMU's ``ipmi-bmc-extern`` device sends runs in the
shared command layer on the system interface (no session, no privilege check, as on a real KCS;
IPMI v2.0 §6.8), so in-band and LAN share one behaviour and one state.

The requests come one of two ways:

* ``BusLink``: a managed machine's, carried over the bus by the machine service, which owns
  QEMU's chardev (``vmwire.frame``, ``vmwire.greeting``; any replica of this service answers);
* ``TcpLink``: an attached machine's QEMU connects over TCP, one connection at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

from nats.aio.client import Client
from qemu_bmc_shared import vmwire
from qemu_bmc_shared.ipmi import Context, Privilege, Registry, Request
from qemu_bmc_shared.ipmi.core import SYSTEM_INTERFACE, StateReads
from qemu_bmc_shared.messages import VmWireAnswer, VmWireFrame

log = logging.getLogger(__name__)
SET_BMC_GLOBAL_ENABLES = (0x06, 0x2E)
GET_BMC_GLOBAL_ENABLES = (0x06, 0x2F)
#: Global enables bits 0 (receive message queue interrupt) and 1 (event message buffer full interrupt).
MESSAGE_INTERRUPTS = 0x03
#: The BMC Global Enables at power-on (IPMI v2.0 §22.1: system event logging only).
DEFAULT_ENABLES = 0x08


class InbandBmc:
    """Runs one machine's in-band requests. The system interface's BMC Global Enables belong to
    the link (the machine service keeps a managed machine's, so that a restarted service or a
    replica has them): each request comes with them, and its answer gives them back."""

    def __init__(self, machine: str, nc: Client, registry: Registry, extra: dict[str, Any]) -> None:
        self.machine = machine
        self.nc = nc
        self.registry = registry
        self.extra = extra
        self.reads = StateReads()
        self.requests = 0

    def greeting(self, enables: int) -> bytes:
        """What QEMU gets when it (re)connects: the protocol version, "no attention" (the receive
        queue and event buffer are always empty) and the interrupt as the enables have it."""
        return (vmwire.encode_control(vmwire.COMMAND_VERSION, bytes([vmwire.PROTOCOL_VERSION]))
                + vmwire.encode_control(vmwire.COMMAND_NO_ATTENTION) + self.interrupt_control(enables))

    async def answer(self, request: vmwire.Request, enables: int) -> tuple[bytes, int]:
        """The framed response to ``request`` (and the interrupt control after a change of the
        enables), and the enables after it."""
        self.requests += 1
        context = Context(machine=self.machine, nc=self.nc, channel=SYSTEM_INTERFACE,
                          privilege=Privilege.ADMINISTRATOR, extra=self.extra, reads=self.reads)
        response = await self.registry.dispatch(context, Request(request.netfn, request.cmd, request.data,
                                                                 request.lun))
        data, command = response.data, (request.netfn, request.cmd)
        if response.completion == 0 and command == SET_BMC_GLOBAL_ENABLES:
            enables = request.data[0]  # one byte: the command checked its length
        elif response.completion == 0 and command == GET_BMC_GLOBAL_ENABLES:
            data = bytes([enables])
        answer = vmwire.encode_response(request, response.completion, data)
        if response.completion == 0 and command == SET_BMC_GLOBAL_ENABLES:
            answer += self.interrupt_control(enables)
        return answer, enables

    @staticmethod
    def interrupt_control(enables: int) -> bytes:
        """QEMU raises the KCS interrupt only when the BMC enables it: on when the guest's driver
        turned the message interrupts on in the global enables (without it, the driver waits for
        its timer at every request)."""
        return vmwire.encode_control(vmwire.COMMAND_ENABLE_IRQ if enables & MESSAGE_INTERRUPTS
                                     else vmwire.COMMAND_DISABLE_IRQ)

    def control(self, control: vmwire.Control) -> None:
        if control.command == vmwire.COMMAND_RESET:
            # the machine service sees the reset itself (QMP RESET) and applies the boot override
            log.info("%s: QEMU reports a machine reset", self.machine)
        elif control.command == vmwire.COMMAND_CAPABILITIES:
            log.debug("%s: QEMU capabilities %s", self.machine, control.argument.hex())


class BusLink:
    """A managed machine's frames, from the machine service over the bus. The machine service
    sends a frame again while it is not answered: a try that comes while this service still runs
    the frame (or has just answered it) gets that answer, and the command does not run twice."""

    def __init__(self, bmc: InbandBmc) -> None:
        self.bmc = bmc
        self.last: tuple[str, int, asyncio.Future[VmWireAnswer]] | None = None
        self.dropped = 0

    async def frame(self, message: VmWireFrame) -> VmWireAnswer:
        if self.last is not None and self.last[:2] == (message.link, message.number):
            return await asyncio.shield(self.last[2])
        running = asyncio.ensure_future(self._run(message))
        self.last = (message.link, message.number, running)
        return await asyncio.shield(running)

    async def _run(self, message: VmWireFrame) -> VmWireAnswer:
        frames = vmwire.Decoder().feed(message.frame)
        if len(frames) != 1 or not isinstance(frames[0], vmwire.Request):
            self.dropped += 1  # QEMU answers the guest 0xC3 after its 4 s
            log.debug("%s: dropped a malformed frame %s", self.bmc.machine, message.frame.hex())
            return VmWireAnswer(data=b"", enables=message.enables)
        data, enables = await self.bmc.answer(frames[0], message.enables)
        return VmWireAnswer(data=data, enables=enables)


#: Seconds a new TCP connection has to introduce itself as QEMU does at once (its protocol
#: version), or it is closed. Until it has, it does not hold the link: a client that connects and
#: says nothing keeps no QEMU out.
HELLO_TIMEOUT = 5.0
#: Connections that have not introduced themselves yet, at most, per machine (more are refused).
MAX_UNINTRODUCED = 4
#: TCP keepalive of the live connection (idle seconds, seconds between probes, probes): a peer
#: that is gone without a word (its host down, a cable pulled) frees the link after about 25 s.
KEEPALIVE = (10, 5, 3)
#: Seconds between two warnings about refused connections (a second QEMU retries every second).
REFUSAL_LOG_INTERVAL = 60.0
READ_SIZE = 4096


class TcpLink:
    """An attached machine's QEMU over TCP (``vmwire = "host:port"``): exactly one connection at
    a time. Another connection while one is live is refused, closed at once: it never displaces
    the live one; a new one is taken once the live one has gone (end of stream, reset, keepalive).
    QEMU reconnects every second (``reconnect=1``), so a restarted QEMU is back on its next try.
    A connection becomes the live one when it has sent QEMU's protocol version."""

    def __init__(self, bmc: InbandBmc, address: str) -> None:
        self.bmc = bmc
        self.address = address
        self.writer: asyncio.StreamWriter | None = None
        self.peer: Any = None
        self.enables = DEFAULT_ENABLES
        self.introducing = 0
        self.refused = 0
        self.refusals_logged = 0
        self.refusal_logged_at = -REFUSAL_LOG_INTERVAL

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self.writer is not None or self.introducing >= MAX_UNINTRODUCED:
            self._refuse(writer, peer)
            return
        decoder = vmwire.Decoder()
        self.introducing += 1
        try:
            pending = await self._hello(reader, decoder)
        except ConnectionError:
            pending = None
        finally:
            self.introducing -= 1
        if pending is None or self.writer is not None:  # not QEMU, or another one got the link meanwhile
            self._refuse(writer, peer, None if pending is not None else
                         f"it is not QEMU (no protocol version in its first {HELLO_TIMEOUT:g} s)")
            return
        self.writer, self.peer = writer, peer
        try:
            _keepalive(writer)
            log.info("%s: QEMU connected to the VM wire %s from %s", self.bmc.machine, self.address, peer)
            writer.write(self.bmc.greeting(self.enables))
            await self._frames(pending, writer)
            while data := await reader.read(READ_SIZE):
                await self._frames(decoder.feed(data), writer)
            log.info("%s: QEMU disconnected from the VM wire %s", self.bmc.machine, self.address)
        except ConnectionError as exc:
            log.info("%s: VM wire connection from %s ended: %s", self.bmc.machine, peer, exc)
        finally:
            if decoder.dropped:
                log.warning("%s: dropped %d malformed frame(s) from QEMU", self.bmc.machine, decoder.dropped)
            self.writer = None
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _hello(self, reader: asyncio.StreamReader,
                     decoder: vmwire.Decoder) -> list[vmwire.Request | vmwire.Control] | None:
        """The frames up to QEMU's version control (which it sends as soon as it connects, IPMI
        requests only after it), and those after it; None when none came in time."""
        frames: list[vmwire.Request | vmwire.Control] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(HELLO_TIMEOUT):
                while data := await reader.read(READ_SIZE):
                    frames += decoder.feed(data)
                    for index, frame in enumerate(frames):
                        if isinstance(frame, vmwire.Control) and frame.command == vmwire.COMMAND_VERSION:
                            return frames[index + 1:]
        return None

    async def _frames(self, frames: list[vmwire.Request | vmwire.Control], writer: asyncio.StreamWriter) -> None:
        for frame in frames:
            if isinstance(frame, vmwire.Control):
                self.bmc.control(frame)
            else:
                answer, self.enables = await self.bmc.answer(frame, self.enables)
                writer.write(answer)
        await writer.drain()

    def _refuse(self, writer: asyncio.StreamWriter, peer: Any, reason: str | None = None) -> None:
        """Close the connection at once; warn, at most every REFUSAL_LOG_INTERVAL seconds."""
        writer.transport.abort()
        self.refused += 1
        loop = asyncio.get_running_loop()
        if loop.time() - self.refusal_logged_at >= REFUSAL_LOG_INTERVAL:
            since = self.refused - self.refusals_logged - 1
            reason = reason or (f"QEMU at {self.peer} holds the link" if self.writer is not None else
                                f"{MAX_UNINTRODUCED} connections are introducing themselves")
            log.warning("%s: VM wire %s: refused a connection from %s: %s%s",
                        self.bmc.machine, self.address, peer, reason,
                        f" ({since} more refused since the last warning)" if since else "")
            self.refusal_logged_at, self.refusals_logged = loop.time(), self.refused


def _keepalive(writer: asyncio.StreamWriter) -> None:
    connection = writer.get_extra_info("socket")
    if connection is None:
        return
    idle, interval, count = KEEPALIVE
    with contextlib.suppress(OSError, AttributeError):
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
