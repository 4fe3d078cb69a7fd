"""The machine service on the bus: one set of endpoints per machine it owns."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket

import msgspec
from nats.aio.client import Client
from qemu_bmc_shared import bus, launcher, subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.config import Config
from qemu_bmc_shared.discovery import announced_machines, metadata, service_infos
from qemu_bmc_shared.messages import (
    BootOverrideUpdate,
    ChassisConfig,
    ConsoleInput,
    ConsoleWritten,
    Empty,
    FirmwareUpdate,
    MediaInsert,
    NicUpdate,
    PowerQuery,
    PowerRequest,
    SystemView,
    VolumeCreate,
    VolumeDelete,
    WatchdogSet,
)
from qemu_bmc_shared.service import argument_parser, run_service

from . import __version__
from .console import Console
from .display import Display
from .display import endpoints as display_endpoints
from .inband import InbandLink
from .machine import Machine

log = logging.getLogger(__name__)
SERVICE_NAME = "qemu-bmc-machine"
#: Seconds (one try a second) a starting machine service waits for the state service to tell a
#: machine's power restore policy.
RESTORE_POLICY_TRIES = 60


def endpoints(machine: Machine) -> list[bus.Endpoint]:
    """The request subjects of one machine (``bmc.<machine>.…``), each served by that machine."""

    async def power_get(_: str, query: PowerQuery) -> msgspec.Struct:
        return await machine.power_status() if query.fresh else machine.status()

    async def power_set(_: str, request: PowerRequest) -> msgspec.Struct:
        return await machine.power(request.action, request.on_if_off)

    async def boot_get(_: str, __: Empty) -> msgspec.Struct:
        return machine.boot_override()

    async def boot_set(_: str, request: BootOverrideUpdate) -> msgspec.Struct:
        return await machine.set_boot_override(request)

    async def boot_options(_: str, __: Empty) -> msgspec.Struct:
        return machine.boot_options()

    async def media_get(_: str, __: Empty) -> msgspec.Struct:
        return await machine.media_status()

    async def media_insert(_: str, request: MediaInsert) -> msgspec.Struct:
        return await machine.insert_media(request)

    async def media_eject(_: str, __: Empty) -> msgspec.Struct:
        return await machine.eject_media()

    async def inventory_get(_: str, __: Empty) -> msgspec.Struct:
        return await machine.inventory()

    async def hardware_get(_: str, __: Empty) -> msgspec.Struct:
        return await machine.hardware.read()

    async def nic_set(_: str, request: NicUpdate) -> msgspec.Struct:
        return await machine.hardware.set_nic(request)

    async def volume_list(_: str, __: Empty) -> msgspec.Struct:
        return await machine.volumes.listing()

    async def volume_create(_: str, request: VolumeCreate) -> msgspec.Struct:
        return await machine.volumes.create(request)

    async def volume_delete(_: str, request: VolumeDelete) -> msgspec.Struct:
        return await machine.volumes.delete(request)

    async def firmware_update(_: str, request: FirmwareUpdate) -> msgspec.Struct:
        return await machine.system_firmware.update(request)

    async def firmware_updates(_: str, __: Empty) -> msgspec.Struct:
        return machine.system_firmware.updates()

    async def watchdog_get(_: str, __: Empty) -> msgspec.Struct:
        return machine.watchdog.status()

    async def watchdog_set(_: str, request: WatchdogSet) -> msgspec.Struct:
        return await machine.watchdog.set(request)

    async def watchdog_reset(_: str, __: Empty) -> msgspec.Struct:
        return await machine.watchdog.reset()

    async def watchdog_pretimeout_clear(_: str, __: Empty) -> msgspec.Struct:
        return machine.watchdog.clear_pretimeout()

    def console() -> Console:
        if machine.console is None:
            raise BusError("not_found", f"machine {machine.name} has no serial console (attach mode: set serial)")
        return machine.console

    async def console_get(_: str, __: Empty) -> msgspec.Struct:
        return console().history()

    async def console_in(_: str, request: ConsoleInput) -> msgspec.Struct:
        serial = console()
        if request.send_break:
            await machine.send_break()
        return ConsoleWritten(written=await serial.write(request.data))

    async def system_get(_: str, __: Empty) -> msgspec.Struct:
        return SystemView(power=machine.status(), boot=machine.boot_override(), inventory=await machine.inventory(),
                          hardware=await machine.hardware.read(), boot_options=machine.boot_options())

    table = [
        (subjects.SYSTEM_GET, Empty, system_get),
        (subjects.POWER_GET, PowerQuery, power_get),
        (subjects.POWER_SET, PowerRequest, power_set),
        (subjects.BOOT_GET, Empty, boot_get),
        (subjects.BOOT_SET, BootOverrideUpdate, boot_set),
        (subjects.BOOT_OPTIONS, Empty, boot_options),
        (subjects.MEDIA_GET, Empty, media_get),
        (subjects.MEDIA_INSERT, MediaInsert, media_insert),
        (subjects.MEDIA_EJECT, Empty, media_eject),
        (subjects.INVENTORY_GET, Empty, inventory_get),
        (subjects.HARDWARE_GET, Empty, hardware_get),
        (subjects.NIC_SET, NicUpdate, nic_set),
        (subjects.VOLUME_LIST, Empty, volume_list),
        (subjects.VOLUME_CREATE, VolumeCreate, volume_create),
        (subjects.VOLUME_DELETE, VolumeDelete, volume_delete),
        (subjects.FIRMWARE_UPDATE, FirmwareUpdate, firmware_update),
        (subjects.FIRMWARE_UPDATES, Empty, firmware_updates),
        (subjects.WATCHDOG_GET, Empty, watchdog_get),
        (subjects.WATCHDOG_SET, WatchdogSet, watchdog_set),
        (subjects.WATCHDOG_RESET, Empty, watchdog_reset),
        (subjects.WATCHDOG_PRETIMEOUT_CLEAR, Empty, watchdog_pretimeout_clear),
        (subjects.CONSOLE_GET, Empty, console_get),
        (subjects.CONSOLE_IN, ConsoleInput, console_in),
    ]
    return [bus.Endpoint(name=f"{machine.name}-{operation.replace('.', '-')}",
                         subject=subjects.for_machine(machine.name, operation),
                         request_type=request_type, handler=handler)
            for operation, request_type, handler in table]


async def serve(nc: Client, config: Config, stop: asyncio.Event, stop_vms: bool = False) -> None:
    displays: dict[str, Display] = {}

    async def publish(machine: str, event: str, message: msgspec.Struct) -> None:
        if not nc.is_closed:
            await bus.publish(nc, machine, event, message)
        if event == subjects.EVENT_POWER and getattr(message, "state", None) == "Off" and machine in displays:
            await displays[machine].end_all("the machine powered off")

    for info in await service_infos(nc, SERVICE_NAME):
        taken = sorted(set(announced_machines(info)) & set(config.vms))
        if taken:
            raise SystemExit(f"{SERVICE_NAME}: {', '.join(taken)} already served by the machine service "
                             f"{info.get('id')} on {metadata(info).get('host', '?')}: one owner per machine")

    async def restore_policy(machine: str) -> int | None:
        """The machine's power restore policy from the state service, which may start after this
        one (None when it never answers)."""
        for _ in range(RESTORE_POLICY_TRIES):
            try:
                return (await bus.request(nc, machine, subjects.CHASSIS_GET, None, ChassisConfig)).restore_policy
            except BusError:
                await asyncio.sleep(1.0)
        log.warning("%s: no power restore policy from the state service: the machine stays off", machine)
        return None

    machines = [Machine(vm, publish, functools.partial(restore_policy, vm.name)) for vm in config.vms.values()]
    for machine in machines:
        if launcher.owns_ipmi_chardev(machine.vm):
            machine.inband = InbandLink(machine.name, machine.files.ipmi, nc)
        await machine.start()
        displays[machine.name] = Display(machine, nc)
        displays[machine.name].start()
    service = await bus.serve(
        nc, name=SERVICE_NAME, version=__version__,
        description="QEMU machines: power, boot override, virtual media, inventory over QMP",
        endpoints=[endpoint for machine in machines
                   for endpoint in [*endpoints(machine), *display_endpoints(displays[machine.name])]],
        metadata={"machines": ",".join(machine.name for machine in machines), "host": socket.gethostname()})
    log.info("serving %d machine(s): %s", len(machines), ", ".join(m.name for m in machines))
    try:
        await stop.wait()
    finally:
        await service.stop()
        await asyncio.gather(*(display.close() for display in displays.values()))
        await asyncio.gather(*(machine.close(stop_vm=stop_vms) for machine in machines))


def main() -> None:
    parser = argument_parser("qemu-bmc machine service: QEMU power, boot and media over NATS")
    parser.add_argument("--stop-vms-on-exit", action="store_true",
                        help="power off the managed VMs when the service stops (default: leave them running)")
    args = parser.parse_args()
    # qemu.qmp logs every refused connection attempt as an error; reconnecting is normal here.
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    run_service(SERVICE_NAME, args, functools.partial(serve, stop_vms=args.stop_vms_on_exit))
