"""The IPMI over LAN service: one UDP endpoint per machine that has an ``ipmi`` address."""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client
from qemu_bmc_shared import bus, ipmi
from qemu_bmc_shared.config import Config
from qemu_bmc_shared.ipmi.core import StateReads, follow_state_changes
from qemu_bmc_shared.service import argument_parser, run_service

from . import __version__
from .lan_commands import lan_registry
from .server import LanServer

log = logging.getLogger(__name__)
SERVICE_NAME = "qemu-bmc-ipmi-lan"


async def serve(nc: Client, config: Config, stop: asyncio.Event) -> None:
    registry = ipmi.load().extended(lan_registry)
    loop = asyncio.get_running_loop()
    transports = []
    servers: list[LanServer] = []
    listening = {}
    reads: dict[str, StateReads] = {}
    subscription = await follow_state_changes(nc, reads)
    for vm in config.vms.values():
        if vm.ipmi is None:
            continue
        transport, server = await loop.create_datagram_endpoint(
            lambda vm=vm: LanServer(vm.name, nc, registry, config.ipmi), local_addr=vm.ipmi)
        transports.append(transport)
        servers.append(server)
        reads[vm.name] = server.state
        listening[vm.name] = f"{vm.ipmi[0]}:{vm.ipmi[1]}"
        log.info("%s: IPMI over LAN on udp %s:%d", vm.name, *vm.ipmi)
    service = await bus.serve(nc, name=SERVICE_NAME, version=__version__,
                              description="IPMI over LAN (RMCP, RMCP+) for each machine", endpoints=[],
                              metadata={"machines": ",".join(sorted(listening)),
                                        **{f"ipmi.{name}": address for name, address in listening.items()}})
    try:
        await stop.wait()
    finally:
        await subscription.unsubscribe()
        await service.stop()
        for server in servers:
            await server.close()
        for transport in transports:
            transport.close()


def main() -> None:
    run_service(SERVICE_NAME, argument_parser("qemu-bmc IPMI over LAN service").parse_args(), serve)
