"""The VM-wire service: the in-band BMC of every machine of its config that has ``vmwire``.

A managed machine's requests come over the bus from the machine service (``bmc.<m>.vmwire.frame``
and ``.greeting``, queue group: any replica on any host answers). An attached machine's QEMU
connects over TCP to its ``vmwire`` address; an address that cannot be bound is logged at ERROR
and announced as ``unserved.vmwire.<machine>`` in the service's metadata, and tried again every
few seconds, while the other machines are served."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging

import msgspec
from nats.aio.client import Client
from nats.micro.service import Service
from qemu_bmc_shared import bus, ipmi, subjects
from qemu_bmc_shared.config import Config, VmConfig
from qemu_bmc_shared.ipmi.core import StateReads, follow_state_changes
from qemu_bmc_shared.ipmi.transport import front_end
from qemu_bmc_shared.messages import VmWireAnswer, VmWireFrame, VmWireGreeting
from qemu_bmc_shared.service import argument_parser, bind_failure, listening_socket, run_service, unserved_key

from . import __version__
from .server import BusLink, InbandBmc, TcpLink

log = logging.getLogger(__name__)
SERVICE_NAME = "qemu-bmc-vmwire"
#: Seconds between tries to bind an address that could not be bound.
RETRY = 2.0


def endpoints(link: BusLink) -> list[bus.Endpoint]:
    machine = link.bmc.machine

    async def frame(_: str, message: VmWireFrame) -> msgspec.Struct:
        return await link.frame(message)

    async def greeting(_: str, message: VmWireGreeting) -> msgspec.Struct:
        return VmWireAnswer(data=link.bmc.greeting(message.enables), enables=message.enables)

    return [bus.Endpoint(name=f"{machine}-vmwire-frame", subject=subjects.for_machine(machine, subjects.VMWIRE_FRAME),
                         request_type=VmWireFrame, handler=frame),
            bus.Endpoint(name=f"{machine}-vmwire-greeting",
                         subject=subjects.for_machine(machine, subjects.VMWIRE_GREETING),
                         request_type=VmWireGreeting, handler=greeting)]


def loopback(host: str) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return host == "localhost"


class Listeners:
    """The TCP listeners of the attached machines, and which of them cannot be bound."""

    def __init__(self, links: dict[str, TcpLink], vms: dict[str, VmConfig]) -> None:
        self.links = links
        self.vms = vms
        self.servers: dict[str, asyncio.Server] = {}
        self.unserved: dict[str, str] = {}

    async def bind(self) -> bool:
        """Listen on every address not listened on yet; True when that changed what is served."""
        changed = False
        for name, link in self.links.items():
            if name in self.servers:
                continue
            host, port = self.vms[name].vmwire or ("", 0)
            try:
                self.servers[name] = await asyncio.start_server(link.serve, sock=listening_socket(host, port))
            except OSError as exc:
                problem = f"{host}:{port}: {bind_failure(exc, 'tcp', host, port)}"
                if self.unserved.get(name) != problem:
                    log.error("%s: VM wire %s; trying again every %g s", name, problem, RETRY)
                    self.unserved[name] = problem
                    changed = True
                continue
            changed = True
            if self.unserved.pop(name, None):
                log.info("%s: VM wire %s:%d served now", name, host, port)
            log.info("%s: VM wire on tcp %s:%d (attach mode: one QEMU connection at a time)", name, host, port)
            if not loopback(host):
                log.warning("%s: VM wire %s:%d takes connections from other hosts: whoever connects first with "
                            "QEMU's protocol is the machine's in-band link, with administrator rights on its BMC",
                            name, host, port)
        return changed

    def close(self) -> None:
        for server in self.servers.values():
            server.close()


async def serve(nc: Client, config: Config, stop: asyncio.Event) -> None:
    registry = ipmi.load()
    reads: dict[str, StateReads] = {}
    subscription = await follow_state_changes(nc, reads)
    bus_links: dict[str, BusLink] = {}
    tcp_links: dict[str, TcpLink] = {}
    for vm in config.vms.values():
        if not vm.inband:
            continue
        bmc = InbandBmc(vm.name, nc, registry, front_end(config.ipmi, vm.ipmi))
        reads[vm.name] = bmc.reads
        if vm.mode == "managed":
            bus_links[vm.name] = BusLink(bmc)
            log.info("%s: in-band IPMI over the bus (the machine service carries QEMU's chardev)", vm.name)
        elif vm.vmwire is not None:
            tcp_links[vm.name] = TcpLink(bmc, "{}:{}".format(*vm.vmwire))
    listeners = Listeners(tcp_links, config.vms)
    await listeners.bind()
    service: Service | None = None

    async def announce() -> None:
        nonlocal service
        served = {**{name: "bus" for name in bus_links},
                  **{name: tcp_links[name].address for name in listeners.servers}}
        previous = service
        service = await bus.serve(
            nc, name=SERVICE_NAME, version=__version__,
            description="in-band IPMI from QEMU's ipmi-bmc-extern device (OpenIPMI VM wire)",
            endpoints=[endpoint for link in bus_links.values() for endpoint in endpoints(link)],
            metadata={"machines": ",".join(sorted(served)), **{f"vmwire.{name}": at for name, at in served.items()},
                      **{unserved_key("vmwire", name): why for name, why in listeners.unserved.items()}})
        if previous is not None:  # after the new one is there: no moment without a responder
            await previous.stop()

    await announce()
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RETRY)
            if listeners.unserved and await listeners.bind():
                await announce()
    finally:
        await subscription.unsubscribe()
        if service is not None:
            await service.stop()
        listeners.close()


def main() -> None:
    run_service(SERVICE_NAME, argument_parser("qemu-bmc VM-wire service (in-band IPMI)").parse_args(), serve)
