"""The VM-wire service: one TCP listener per machine that has a ``vmwire`` address."""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client
from qemu_bmc_shared import bus, ipmi
from qemu_bmc_shared.config import Config
from qemu_bmc_shared.ipmi.core import StateReads, follow_state_changes
from qemu_bmc_shared.ipmi.transport import front_end
from qemu_bmc_shared.service import argument_parser, run_service

from . import __version__
from .server import VmWireEndpoint

log = logging.getLogger(__name__)
SERVICE_NAME = "qemu-bmc-vmwire"


async def serve(nc: Client, config: Config, stop: asyncio.Event) -> None:
    registry = ipmi.load()
    servers = []
    listening = {}
    reads: dict[str, StateReads] = {}
    subscription = await follow_state_changes(nc, reads)
    for vm in config.vms.values():
        if vm.vmwire is None:
            continue
        endpoint = VmWireEndpoint(vm.name, nc, registry, front_end(config.ipmi, vm.ipmi))
        reads[vm.name] = endpoint.reads
        servers.append(await asyncio.start_server(endpoint.serve, *vm.vmwire))
        listening[vm.name] = f"{vm.vmwire[0]}:{vm.vmwire[1]}"
        log.info("%s: VM wire on tcp %s:%d", vm.name, *vm.vmwire)
    service = await bus.serve(nc, name=SERVICE_NAME, version=__version__,
                              description="in-band IPMI from QEMU's ipmi-bmc-extern device (OpenIPMI VM wire)",
                              endpoints=[], metadata={"machines": ",".join(sorted(listening)),
                                                      **{f"vmwire.{name}": at for name, at in listening.items()}})
    try:
        await stop.wait()
    finally:
        await subscription.unsubscribe()
        await service.stop()
        for server in servers:
            server.close()


def main() -> None:
    run_service(SERVICE_NAME, argument_parser("qemu-bmc VM-wire service (in-band IPMI)").parse_args(), serve)
