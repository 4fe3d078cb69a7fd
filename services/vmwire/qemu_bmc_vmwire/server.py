"""One machine's VM-wire endpoint: QEMU's ``ipmi-bmc-extern`` device connects to it over TCP and
every request runs in the shared command layer on the system interface (no session, no
privilege check, as on a real KCS), so in-band and LAN share one behaviour and one state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from nats.aio.client import Client
from qemu_bmc_shared.ipmi import Context, Privilege, Registry, Request, app
from qemu_bmc_shared.ipmi.core import SYSTEM_INTERFACE, StateReads

from . import framing

log = logging.getLogger(__name__)
SET_BMC_GLOBAL_ENABLES = (0x06, 0x2E)
#: Global enables bits 0 (receive message queue interrupt) and 1 (event message buffer full interrupt).
MESSAGE_INTERRUPTS = 0x03


class VmWireEndpoint:
    """Serves one QEMU connection at a time; a new connection (QEMU restarted or reconnected)
    replaces the old one."""

    def __init__(self, machine: str, nc: Client, registry: Registry, extra: dict[str, Any]) -> None:
        self.machine = machine
        self.nc = nc
        self.registry = registry
        self.extra = extra
        self.writer: asyncio.StreamWriter | None = None
        self.reads = StateReads()
        self.requests = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer = writer
        peer = writer.get_extra_info("peername")
        log.info("%s: QEMU connected from %s", self.machine, peer)
        decoder = framing.Decoder()
        try:
            writer.write(framing.encode_control(framing.COMMAND_VERSION, bytes([framing.PROTOCOL_VERSION]))
                         + framing.encode_control(framing.COMMAND_NO_ATTENTION) + self.interrupt_control())
            while data := await reader.read(4096):
                for frame in decoder.feed(data):
                    if isinstance(frame, framing.Control):
                        self.control(frame)
                    else:
                        writer.write(await self.answer(frame))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            if decoder.dropped:
                log.warning("%s: dropped %d malformed frame(s) from QEMU", self.machine, decoder.dropped)
            if self.writer is writer:
                self.writer = None
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            log.info("%s: QEMU disconnected", self.machine)

    async def answer(self, request: framing.Request) -> bytes:
        self.requests += 1
        context = Context(machine=self.machine, nc=self.nc, channel=SYSTEM_INTERFACE,
                          privilege=Privilege.ADMINISTRATOR, extra=self.extra, reads=self.reads)
        response = await self.registry.dispatch(context, Request(request.netfn, request.cmd, request.data,
                                                                 request.lun))
        answer = framing.encode_response(request, response.completion, response.data)
        if (request.netfn, request.cmd) == SET_BMC_GLOBAL_ENABLES and response.completion == 0:
            answer += self.interrupt_control()
        return answer

    def interrupt_control(self) -> bytes:
        """QEMU raises the KCS interrupt only when the BMC enables it: on when the guest's driver
        turned the message interrupts on in the global enables (without it, the driver waits for
        its timer at every request)."""
        on = app.global_enables(self.machine) & MESSAGE_INTERRUPTS
        return framing.encode_control(framing.COMMAND_ENABLE_IRQ if on else framing.COMMAND_DISABLE_IRQ)

    def control(self, control: framing.Control) -> None:
        if control.command == framing.COMMAND_RESET:
            # the machine service sees the reset itself (QMP RESET) and applies the boot override
            log.info("%s: QEMU reports a machine reset", self.machine)
        elif control.command == framing.COMMAND_CAPABILITIES:
            log.debug("%s: QEMU capabilities %s", self.machine, control.argument.hex())
