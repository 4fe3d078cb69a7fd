"""The VNC listeners: each machine with ``vnc = "host:port"`` serves its graphical console to
standard VNC viewers there (RFB 3.8 with VNC Authentication by ``vnc_password``), each viewer on
its own stream to the machine's display over the bus (:func:`qemu_bmc_shared.kvm.open_kvm`),
opened only once the viewer has authenticated. A viewer with the password asks for control; with
``kvm_control = "first"`` it is served view-only when another viewer (here or on the web page) has
it (rfb.serve_viewer follows the stream's grant). At most MAX_VIEWERS connections per listener
(more are turned away with a reason, or just closed while MAX_VIEWERS are being turned away),
and HANDSHAKE_TIMEOUT seconds to authenticate."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

from nats.aio.client import Client
from qemu_bmc_shared import bus, rfb
from qemu_bmc_shared.config import VmConfig
from qemu_bmc_shared.kvm import open_kvm

log = logging.getLogger(__name__)
MAX_VIEWERS = 8
"""Connections a listener serves at once, authenticated or not."""


class VncListener:
    """One machine's VNC listener (bound, taken over and given back between replicas as the
    machine's IPMI endpoint is: :class:`.service.Endpoints`)."""

    def __init__(self, nc: Client, vm: VmConfig) -> None:
        assert vm.vnc is not None and vm.vnc_password is not None
        self.nc, self.machine, self.address, self.password = nc, vm.name, vm.vnc, vm.vnc_password
        self.server: asyncio.Server | None = None
        self.viewers: set[asyncio.Task[None]] = set()
        self.refusing = 0
        """Connections being turned away (told why) now: at most MAX_VIEWERS, more are just closed."""

    async def start(self) -> None:
        """Listen (raises OSError when the address cannot be bound)."""
        self.server = await asyncio.start_server(self._connected, *self.address, limit=1 << 16)

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = "{}:{}".format(*writer.get_extra_info("peername")[:2])
        task = asyncio.current_task()
        assert task is not None
        try:
            if len(self.viewers) >= MAX_VIEWERS:
                log.warning("%s: VNC viewer %s turned away: %d viewers already", self.machine, peer, MAX_VIEWERS)
                if self.refusing < MAX_VIEWERS:
                    self.refusing += 1
                    try:
                        await rfb.refuse_viewer(reader, writer, f"too many viewers (at most {MAX_VIEWERS})")
                    finally:
                        self.refusing -= 1
                return
            self.viewers.add(task)
            log.info("%s: VNC viewer %s connected", self.machine, peer)
            await rfb.serve_viewer(reader, writer, functools.partial(open_kvm, self.nc, self.machine, control=True),
                                   password=self.password, control=True)
            log.info("%s: VNC viewer %s disconnected", self.machine, peer)
        except rfb.RfbError as exc:
            log.warning("%s: VNC viewer %s disconnected: %s", self.machine, peer, exc)
        except TimeoutError:
            log.warning("%s: VNC viewer %s disconnected: handshake not done in %g s", self.machine, peer,
                        rfb.HANDSHAKE_TIMEOUT)
        except bus.BusError as exc:
            log.warning("%s: VNC viewer %s: the display cannot be opened: %s", self.machine, peer, exc)
        except (ConnectionError, asyncio.IncompleteReadError):
            log.info("%s: VNC viewer %s went during the handshake", self.machine, peer)
        finally:
            self.viewers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.viewers):
            task.cancel()
        await asyncio.gather(*self.viewers, return_exceptions=True)

