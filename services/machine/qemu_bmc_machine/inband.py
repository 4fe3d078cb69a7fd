"""A managed machine's in-band IPMI link: the machine service owns QEMU's ``ipmi-bmc-extern``
chardev (a unix socket in the machine's runtime directory, QEMU listening) as it owns QMP and the
serial port, and carries what comes on it over the bus to the VM-wire service, which runs the
commands (any replica, on any host): no TCP port, nothing another local user can reach.

The stream is split into frames at their end markers (``vmwire.FrameSplitter``), not decoded.
Each message frame is one ``vmwire.frame`` request, and the next waits for its answer (QEMU
sends one request at a time). A frame nobody answers (the VM-wire service restarting, a bus
blip) is sent again until it is answered, for as long as QEMU still waits for it: QEMU answers
the guest 0xC3 (timeout) itself 4 s after it sent the request, so a frame is given up after
``FRAME_WINDOW`` seconds and nothing queues without limit. Control frames from QEMU (its version
and capabilities, "the machine was reset") are not carried: the greeting does not depend on them
and the machine service sees resets on QMP itself."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from pathlib import Path

import nats.errors
from nats.aio.client import Client
from qemu_bmc_shared import bus, subjects, vmwire
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.messages import VmWireAnswer, VmWireFrame, VmWireGreeting

log = logging.getLogger(__name__)

#: Seconds a frame is sent again until it is answered (QEMU gives up on it after 4 s).
FRAME_WINDOW = 3.5
#: Seconds one try waits for its answer; a later try of the same frame is not run twice by the
#: VM-wire service that still runs it.
ATTEMPT_TIMEOUT = 1.0
#: Seconds between tries when no VM-wire service answers at once (none on the bus).
RETRY_PAUSE = 0.1
#: Seconds between connection attempts while QEMU's socket is not there (a launch wakes the link).
CONNECT_INTERVAL = 1.0
#: The system interface's BMC Global Enables at power-on (IPMI v2.0 §22.1: system event logging).
DEFAULT_ENABLES = 0x08
READ_SIZE = 4096


class InbandLink:
    """The client end of one managed machine's ipmi-bmc-extern socket, for as long as the machine
    service runs: it connects whenever QEMU is there (launched, adopted) and carries its frames."""

    def __init__(self, machine: str, path: Path, nc: Client) -> None:
        self.machine = machine
        self.path = path
        self.nc = nc
        self.enables = DEFAULT_ENABLES
        """The system interface's BMC Global Enables, kept here with the link (see VmWireFrame)."""
        self.link = ""
        self.number = 0
        self.connected = asyncio.Event()
        self.wake = asyncio.Event()
        self.requests = 0
        self.retried = 0
        """Frames answered only after more than one try (the VM-wire service was away)."""
        self.lost = 0
        """Frames given up (no answer within FRAME_WINDOW)."""
        self.lost_since: int | None = None
        """``lost`` when the VM-wire service stopped answering (None: it answers)."""

    async def attached(self, timeout: float) -> None:
        """Connect now (QEMU has just started, paused) and wait up to ``timeout`` s for it, so
        that the guest's driver finds its BMC from its first request."""
        self.wake.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.connected.wait(), timeout)

    async def run(self) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.path))
            except OSError:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), CONNECT_INTERVAL)
                continue
            try:
                await self._serve(reader, writer)
            except OSError as exc:
                log.info("%s: in-band IPMI link ended: %s", self.machine, exc)
            finally:
                self.connected.clear()
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.link, self.number = secrets.token_hex(8), 0
        loop = asyncio.get_running_loop()
        greeting = await self._carry(subjects.VMWIRE_GREETING, VmWireGreeting(enables=self.enables),
                                     loop.time() + FRAME_WINDOW)
        if greeting is not None:
            writer.write(greeting.data)
        self.connected.set()
        log.info("%s: in-band IPMI link to QEMU connected (%s)", self.machine, self.path)
        splitter = vmwire.FrameSplitter()
        while data := await reader.read(READ_SIZE):
            received = loop.time()
            for frame in splitter.feed(data):
                if frame[-1] != vmwire.MESSAGE_END or len(frame) < 2:
                    continue  # a control frame, or an end marker alone
                self.number += 1
                answer = await self._carry(subjects.VMWIRE_FRAME, VmWireFrame(
                    link=self.link, number=self.number, frame=frame, enables=self.enables),
                    received + FRAME_WINDOW)
                if answer is not None:
                    self.enables = answer.enables
                    writer.write(answer.data)
            await writer.drain()
        if splitter.dropped:
            log.warning("%s: dropped %d overlong frame(s) from QEMU", self.machine, splitter.dropped)
        log.info("%s: in-band IPMI link to QEMU closed", self.machine)

    async def _carry(self, operation: str, message: VmWireFrame | VmWireGreeting,
                     deadline: float) -> VmWireAnswer | None:
        """``message`` to the VM-wire service, tried again until it is answered or ``deadline``
        (loop time) has passed; None then."""
        loop = asyncio.get_running_loop()
        tries = 0
        self.requests += 1
        while (remaining := deadline - loop.time()) > 0:
            tries += 1
            try:
                answer = await bus.request(self.nc, self.machine, operation, message, VmWireAnswer,
                                           timeout=min(ATTEMPT_TIMEOUT, remaining))
            except BusError as exc:
                if exc.error == "bad_request":
                    log.error("%s: the VM-wire service refused a frame: %s", self.machine, exc.message)
                    return None
                self._unanswered(operation, tries, exc.message)
                if exc.error != "timeout":  # none on the bus, or a failing one: not at once again
                    await asyncio.sleep(min(RETRY_PAUSE, max(0.0, deadline - loop.time())))
                continue
            except nats.errors.Error as exc:  # the connection to NATS is closed or being replaced
                self._unanswered(operation, tries, str(exc) or type(exc).__name__)
                await asyncio.sleep(min(RETRY_PAUSE, max(0.0, deadline - loop.time())))
                continue
            if tries > 1:
                self.retried += 1
                log.info("%s: in-band %s answered at try %d", self.machine, operation, tries)
            if self.lost_since is not None:
                log.info("%s: the VM-wire service answers again (%d request(s) lost meanwhile)", self.machine,
                         self.lost - self.lost_since)
                self.lost_since = None
            return answer
        if self.lost_since is None:  # once per outage, not per request
            log.warning("%s: in-band %s not answered in %g s (%d tries): no VM-wire service answers; QEMU "
                        "answers the guest 0xC3", self.machine, operation, FRAME_WINDOW, tries)
            self.lost_since = self.lost
        self.lost += 1
        return None

    def _unanswered(self, operation: str, tries: int, why: str) -> None:
        """Say that a request is tried again (its first try failed), but not during an outage
        already reported."""
        if tries == 1 and self.lost_since is None:
            log.info("%s: in-band %s not answered (%s): trying again for up to %g s", self.machine, operation,
                     why, FRAME_WINDOW)
