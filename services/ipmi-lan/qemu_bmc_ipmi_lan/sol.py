"""Serial over LAN (IPMI v2.0 §26): the SOL payload (type 1) of one RMCP+ session, bridged to the
machine's serial console on the bus (``console.out`` events in, ``console.in`` requests out).

Packets (§26.2, tables 26-2/26-3): sequence number (1-15, 0 for an ack-only packet), the acked
or nacked sequence number, the accepted character count, an operation (console → BMC) or status
(BMC → console) byte, then characters. The BMC keeps one packet in flight: it is retransmitted
every retry interval, at most retry count times, until the console acks it.

A partial packet (fewer characters than the send threshold) goes out when the character
accumulate interval has passed since its first character, or as soon as the serial line has been
quiet for ``QUIET`` seconds, as a UART's receive FIFO hands over its characters after a few
character times without one: a keystroke's echo is not held back 60 ms (the default interval),
and a burst of output still fills whole packets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nats.aio.msg import Msg
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.messages import ConsoleInput, ConsoleOutput, ConsoleWritten

from . import framing

if TYPE_CHECKING:
    from .server import LanServer
    from .sessions import Session

log = logging.getLogger(__name__)

#: Largest SOL payload (header included) either side sends; Activate Payload reports it.
MAX_PAYLOAD = 252
MAX_DATA = MAX_PAYLOAD - 4
#: Serial output kept for a console that does not keep up; older bytes are dropped.
MAX_BUFFERED = 64 * 1024
#: Seconds without a new character after which a partial packet is sent before its interval.
QUIET = 0.001

# console → BMC operation bits
OP_NACK = 0x40
OP_BREAK = 0x10
OP_FLUSH_OUTBOUND = 0x01
# BMC → console status bits
STATUS_NACK = 0x40
STATUS_UNAVAILABLE = 0x20
STATUS_DEACTIVATING = 0x10


@dataclass(frozen=True)
class SolTiming:
    """From SOL parameters 3 and 4 (§26.3): accumulate interval (5 ms units) and send threshold,
    retry count and retry interval (10 ms units)."""

    accumulate: float = 0.06
    threshold: int = 96
    retries: int = 7
    retry_interval: float = 0.5

    @classmethod
    def from_params(cls, accumulate: bytes, retry: bytes) -> SolTiming:
        return cls(accumulate=max(accumulate[0], 1) * 0.005, threshold=max(accumulate[1], 1),
                   retries=retry[0] & 0x07, retry_interval=max(retry[1], 1) * 0.01)


def packet(sequence: int, acked: int, accepted: int, status: int, data: bytes = b"") -> bytes:
    return bytes([sequence & 0x0F, acked & 0x0F, accepted & 0xFF, status]) + data


class SolSession:
    """The active SOL payload instance (there is one per machine) and the session it is on."""

    def __init__(self, server: LanServer, session: Session, address: tuple[str, int], timing: SolTiming) -> None:
        self.server, self.session, self.address, self.timing = server, session, address, timing
        self.buffer = bytearray()
        self.first_buffered = self.last_buffered = 0.0
        self.end = -1  # console position of the last byte buffered
        self.sequence = 0
        self.in_flight: tuple[int, int] | None = None  # (sequence, length) awaiting its ack
        self.wake = asyncio.Event()
        self.acked = asyncio.Event()
        self.ack_count = 0
        self.ack_nack = False
        self.last_inbound: tuple[int, int] | None = None  # (sequence, accepted) of the console's last packet
        self.inbound_lock = asyncio.Lock()
        self.subscription = None
        self.task: asyncio.Task[None] | None = None
        self.closed = False

    async def start(self) -> None:
        subject = subjects.for_machine(self.server.machine, subjects.CONSOLE_OUT)
        self.subscription = await self.server.nc.subscribe(subject, cb=self._console_out)
        self.task = asyncio.ensure_future(self._run())
        log.info("%s: SOL activated for user %r", self.server.machine,
                 self.session.user_name.decode("ascii", "replace"))

    async def stop(self, tell_console: bool = True) -> None:
        """Deactivate: the console hears of it (status bit 4) unless its session is gone."""
        if self.closed:
            return
        self.closed = True
        if self.server.sol is self:
            self.server.sol = None
        if self.subscription is not None:
            try:
                await self.subscription.unsubscribe()
            except Exception:  # the bus connection may be closing
                pass
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        if tell_console and self.alive():
            self.sequence = self.sequence % 15 + 1
            self._send(packet(self.sequence, 0, 0, STATUS_DEACTIVATING))
        log.info("%s: SOL deactivated", self.server.machine)

    def alive(self) -> bool:
        """The session is still open (not closed, reset or expired)."""
        return self.server.sessions.get(self.session.bmc_id) is self.session

    def _send(self, payload: bytes) -> None:
        if self.session.keys is not None:
            self.server.send_v20(self.session, framing.PAYLOAD_SOL, payload, self.address)

    # ---------------------------------------------------------------- machine → console

    async def _console_out(self, msg: Msg) -> None:
        try:
            output = bus.decode(msg.data, ConsoleOutput)
        except Exception:
            return
        data = output.data
        start = output.end - len(data)
        if self.end >= 0 and start < self.end:  # overlaps what was buffered already
            data = data[max(0, self.end - start):]
        self.end = max(self.end, output.end)
        if not data:
            return
        self.last_buffered = time.monotonic()
        if not self.buffer:
            self.first_buffered = self.last_buffered
        self.buffer += data
        if len(self.buffer) > MAX_BUFFERED:
            del self.buffer[:len(self.buffer) - MAX_BUFFERED]
        self.wake.set()

    async def _run(self) -> None:
        try:
            while not self.closed:
                if not self.alive():
                    await self.stop(tell_console=False)
                    return
                if not self.buffer:
                    self.wake.clear()
                    try:
                        await asyncio.wait_for(self.wake.wait(), 1.0)
                    except TimeoutError:
                        pass
                    continue
                wait = min(self.first_buffered + self.timing.accumulate,
                           self.last_buffered + QUIET) - time.monotonic()
                if len(self.buffer) < min(self.timing.threshold, MAX_DATA) and wait > 0:
                    self.wake.clear()
                    try:
                        await asyncio.wait_for(self.wake.wait(), wait)
                    except TimeoutError:
                        pass
                    continue
                await self._transmit(bytes(self.buffer[:MAX_DATA]))
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("%s: SOL", self.server.machine)
            await self.stop()

    async def _transmit(self, chunk: bytes) -> None:
        """Send one packet until acked (or the retries run out); drop what the console accepted."""
        self.sequence = self.sequence % 15 + 1
        self.in_flight = (self.sequence, len(chunk))
        accepted = len(chunk)  # when no ack ever comes, the characters are given up
        for _ in range(self.timing.retries + 1):
            self.acked.clear()
            self._send(packet(self.sequence, 0, 0, 0, chunk))
            try:
                await asyncio.wait_for(self.acked.wait(), self.timing.retry_interval)
            except TimeoutError:
                if self.closed or not self.alive():
                    break
                continue
            accepted = min(self.ack_count, len(chunk))
            if self.ack_nack and accepted == 0:
                await asyncio.sleep(self.timing.retry_interval)  # the console is not ready: try again later
            break
        self.in_flight = None
        del self.buffer[:accepted]
        if self.buffer:
            self.first_buffered = time.monotonic()

    # ---------------------------------------------------------------- console → machine

    async def received(self, payload: bytes, address: tuple[str, int]) -> None:
        if len(payload) < 4:
            return
        self.address = address
        sequence, acked, accepted, operation = payload[0] & 0x0F, payload[1] & 0x0F, payload[2], payload[3]
        data = payload[4:4 + MAX_DATA]  # at most the payload size Activate Payload announced; the rest is not accepted
        if acked and self.in_flight is not None and acked == self.in_flight[0]:
            self.ack_count, self.ack_nack = accepted, bool(operation & OP_NACK)
            self.acked.set()
        if operation & OP_FLUSH_OUTBOUND:
            self.buffer.clear()
        if sequence == 0:
            return
        async with self.inbound_lock:
            if self.last_inbound is not None and self.last_inbound[0] == sequence:
                self._send(packet(0, sequence, self.last_inbound[1], 0))  # a retransmission: ack it again
                return
            count = len(data)
            if data or operation & OP_BREAK:
                await self._write(data, send_break=bool(operation & OP_BREAK))
            self.last_inbound = (sequence, count)
            self._send(packet(0, sequence, count, 0))

    async def _write(self, data: bytes, send_break: bool = False) -> None:
        """Type the characters on the serial port, after a break if asked; while the machine has no
        serial port (off) they are lost, as on a real serial line."""
        try:
            for offset in range(0, max(len(data), 1), 4096):
                await bus.request(self.server.nc, self.server.machine, subjects.CONSOLE_IN,
                                  ConsoleInput(data=data[offset:offset + 4096], send_break=send_break and not offset),
                                  ConsoleWritten, timeout=5)
        except BusError as exc:
            log.debug("%s: SOL input not written: %s", self.server.machine, exc)
