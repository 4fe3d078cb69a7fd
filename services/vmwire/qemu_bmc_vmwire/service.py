"""The VM-wire service: one TCP listener per machine that has a ``vmwire`` address."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from nats.aio.client import Client
from qemu_bmc_shared import bus, ipmi
from qemu_bmc_shared.config import Config, VmConfig
from qemu_bmc_shared.ipmi.core import StateReads, follow_state_changes
from qemu_bmc_shared.ipmi.transport import reachable_address
from qemu_bmc_shared.service import argument_parser, load_config_or_exit, nats_url, run, setup_logging

from . import __version__
from .server import VmWireEndpoint

log = logging.getLogger(__name__)
SERVICE_NAME = "qemu-bmc-vmwire"


def front_end(config: Config, vm: VmConfig) -> dict[str, Any]:
    """What the command layer answers about the machine's IPMI over LAN front-end (LAN parameters
    3 and 8, cipher suites, authentication types, lockout): it is in the same config."""
    extra: dict[str, Any] = {"cipher_suite_0": config.ipmi.cipher_suite_0, "auth_none": config.ipmi.auth_none,
                             "login_lockout": (config.ipmi.lockout_failures, config.ipmi.lockout_window,
                                               config.ipmi.lockout_time)}
    if vm.ipmi is not None:
        host, port = vm.ipmi
        extra.update(lan_port=port, **({"lan_address": address} if (address := reachable_address(host)) else {}))
    return extra


async def serve(nc: Client, config: Config, stop: asyncio.Event) -> None:
    registry = ipmi.load()
    servers = []
    listening = {}
    reads: dict[str, StateReads] = {}
    subscription = await follow_state_changes(nc, reads)
    for vm in config.vms.values():
        if vm.vmwire is None:
            continue
        endpoint = VmWireEndpoint(vm.name, nc, registry, front_end(config, vm))
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
    args = argument_parser("qemu-bmc VM-wire service (in-band IPMI)").parse_args()
    setup_logging(args.log_level)
    config = load_config_or_exit(args.config)

    async def main_task(stop: asyncio.Event) -> None:
        nc = await bus.connect(nats_url(args.nats, config), SERVICE_NAME)
        try:
            await serve(nc, config, stop)
        finally:
            await nc.drain()

    run(main_task)
