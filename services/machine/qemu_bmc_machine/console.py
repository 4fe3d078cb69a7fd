"""A machine's serial console on the bus: the machine service keeps the serial port (the pipes the
launcher gives QEMU, or the chardev socket ``serial`` in attach mode) open across power cycles
and QEMU restarts, publishes what the machine writes (``console.out``), writes what
front-ends type (``console.in``) and keeps the last bytes for viewers that attach
(``console.get``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
from qemu_bmc_shared import subjects
from qemu_bmc_shared.messages import ConsoleHistory, ConsoleOutput

log = logging.getLogger(__name__)

RING_SIZE = 64 * 1024
CHUNK = 16 * 1024
#: Seconds a burst of output is gathered into one console.out message (see ``Console._pump``).
GATHER = 0.002
#: How long to wait between connection attempts while there is no serial socket (a launch wakes
#: the console at once).
RETRY_INTERVAL = 1.0


class Console:
    """``path``: the managed launcher's pipes (``path.out``, ``path.in``), or, with ``socket``, an
    attached QEMU's serial chardev socket. ``live`` says whether a QEMU is there to type on."""

    def __init__(self, machine: str, path: Path, publish: Callable[[str, str, msgspec.Struct], Awaitable[None]],
                 socket: bool = False, live: Callable[[], bool] = lambda: True) -> None:
        self.machine = machine
        self.path = path
        self.publish = publish
        self.socket = socket
        self.live = live
        self.ring = bytearray()
        self.end = 0
        self.connection: socket.socket | None = None
        self.input_fd: int | None = None
        self.connected = asyncio.Event()
        self.wake = asyncio.Event()

    def history(self) -> ConsoleHistory:
        return ConsoleHistory(data=bytes(self.ring), end=self.end)

    async def write(self, data: bytes) -> int:
        """Type ``data`` on the serial port; 0 bytes while no machine is there to take them."""
        if not self.live():
            return 0
        if self.input_fd is not None:
            try:
                return os.write(self.input_fd, data)
            except BlockingIOError:
                return 0
        connection = self.connection
        if connection is None:
            return 0
        try:
            await asyncio.get_running_loop().sock_sendall(connection, data)
        except OSError:
            return 0
        return len(data)

    async def attached(self, timeout: float) -> None:
        """Connect now (QEMU has just started) and wait up to ``timeout`` s for it."""
        self.wake.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.connected.wait(), timeout)

    async def received(self, data: bytes) -> None:
        self.ring += data
        del self.ring[:-RING_SIZE]
        self.end += len(data)
        await self.publish(self.machine, subjects.CONSOLE_OUT, ConsoleOutput(machine=self.machine, data=data,
                                                                            end=self.end))

    async def _pump(self, fd: int, read: Callable[[int], bytes]) -> None:
        """What the machine writes on ``fd`` (``read``: ``os.read`` or ``socket.recv`` on it,
        non-blocking) to the bus, until its end. QEMU's UART writes a byte at a time: output that
        follows a quiet spell (a keystroke's echo) goes out at once, while a burst gathers in the
        pipe or socket and goes out every ``GATHER`` seconds, one message and one wake-up for
        hundreds of bytes, not one per byte."""
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        published = 0.0
        while True:
            loop.add_reader(fd, readable.set)
            try:
                await readable.wait()
            finally:
                loop.remove_reader(fd)
            readable.clear()
            wait = published + GATHER - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            data, ended = bytearray(), False
            with contextlib.suppress(BlockingIOError, InterruptedError):
                while len(data) < CHUNK:
                    chunk = read(CHUNK - len(data))
                    ended = not chunk
                    if ended:
                        break
                    data += chunk
            if data:
                await self.received(bytes(data))
                published = time.monotonic()
            if ended:
                return

    async def run(self) -> None:
        if self.socket:
            await self._follow_socket()
        else:
            await self._follow_pipes()

    async def _follow_pipes(self) -> None:
        """Both pipes held open read-write for good: they never end, whichever QEMU (if any) is
        at their other end, and QEMU's output waits in the pipe (64 KiB) while this reads late."""
        output = os.open(self.path.with_suffix(".out"), os.O_RDWR | os.O_NONBLOCK)
        self.input_fd = os.open(self.path.with_suffix(".in"), os.O_RDWR | os.O_NONBLOCK)
        self.connected.set()
        try:
            await self._pump(output, lambda size: os.read(output, size))
        finally:
            os.close(output)
            os.close(self.input_fd)
            self.input_fd = None

    async def _follow_socket(self) -> None:
        """Stay connected to the serial socket whenever it is there."""
        loop = asyncio.get_running_loop()
        while True:
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            connection.setblocking(False)
            try:
                await loop.sock_connect(connection, str(self.path))
            except OSError:
                connection.close()
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), RETRY_INTERVAL)
                continue
            self.connection = connection
            self.connected.set()
            try:
                await self._pump(connection.fileno(), connection.recv)
            except OSError:
                pass
            finally:
                self.connection = None
                self.connected.clear()
                connection.close()
