"""A machine's serial console on the bus: the machine service keeps the serial port's socket
(the chardev socket the launcher gives QEMU, or ``serial`` in attach mode) connected across power
cycles and QEMU restarts, publishes what the machine writes (``console.out``), writes what
front-ends type (``console.in``) and keeps the last bytes for viewers that attach
(``console.get``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
from qemu_bmc_shared import subjects
from qemu_bmc_shared.messages import ConsoleHistory, ConsoleOutput

log = logging.getLogger(__name__)

RING_SIZE = 64 * 1024
#: How long to wait between connection attempts while there is no serial socket (a launch wakes
#: the console at once).
RETRY_INTERVAL = 1.0


class Console:
    def __init__(self, machine: str, path: Path,
                 publish: Callable[[str, str, msgspec.Struct], Awaitable[None]]) -> None:
        self.machine = machine
        self.path = path
        self.publish = publish
        self.ring = bytearray()
        self.end = 0
        self.writer: asyncio.StreamWriter | None = None
        self.connected = asyncio.Event()
        self.wake = asyncio.Event()

    def history(self) -> ConsoleHistory:
        return ConsoleHistory(data=bytes(self.ring), end=self.end)

    async def write(self, data: bytes) -> int:
        """Type ``data`` on the serial port; 0 bytes while no machine is there to take them."""
        writer = self.writer
        if writer is None:
            return 0
        try:
            writer.write(data)
            await writer.drain()
        except (ConnectionError, OSError):
            return 0
        return len(data)

    async def attached(self, timeout: float) -> None:
        """Connect now (QEMU has just started) and wait up to ``timeout`` s for it."""
        self.wake.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.connected.wait(), timeout)

    async def run(self) -> None:
        """Stay connected to the serial socket whenever it is there."""
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.path))
            except OSError:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), RETRY_INTERVAL)
                continue
            self.writer = writer
            self.connected.set()
            try:
                while data := await reader.read(4096):
                    self.ring += data
                    del self.ring[:-RING_SIZE]
                    self.end += len(data)
                    await self.publish(self.machine, subjects.CONSOLE_OUT,
                                       ConsoleOutput(machine=self.machine, data=data, end=self.end))
            except (ConnectionError, OSError):
                pass
            finally:
                self.writer = None
                self.connected.clear()
                writer.close()
                with contextlib.suppress(ConnectionError, OSError):
                    await writer.wait_closed()
