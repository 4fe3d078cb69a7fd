"""ComputerSystems: one per machine on the bus, the Id being the machine name (Redfish
ComputerSystem schema; DSP0266 §9.7 PATCH and ETags, §9.8 actions)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Request, Response
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import (
    BootOverride,
    BootOverrideUpdate,
    Inventory,
    PowerAction,
    PowerQuery,
    PowerRequest,
    PowerStatus,
    SystemView,
)

from .errors import RedfishError
from .resources import ENABLED, Redfish, check_if_match, collection, etag_of, json_body, json_response, link, patch_body

log = logging.getLogger(__name__)

BOOT_TARGETS = ["None", "Pxe", "Hdd", "Cd", "BiosSetup"]
BOOT_ENABLED = ["Disabled", "Once", "Continuous"]
#: Reset types → machine power actions (GracefulRestart: ACPI power button, then on once Off).
RESET_TYPES: dict[str, PowerAction | None] = {
    "On": "on", "ForceOff": "off", "GracefulShutdown": "soft", "GracefulRestart": None, "ForceRestart": "reset",
    "Nmi": "nmi", "ForceOn": "on", "PowerCycle": "cycle"}
GRACEFUL_RESTART_TIMEOUT = 300.0


def system_path(machine: str) -> str:
    return f"/redfish/v1/Systems/{machine}"


async def computer_system(redfish: Redfish, machine: str) -> dict[str, Any]:
    view = await bus.request(redfish.nc, machine, subjects.SYSTEM_GET, None, SystemView)
    power, boot, inventory = view.power, view.boot, view.inventory
    path = system_path(machine)
    body = {
        "@odata.id": path, "@odata.type": "#ComputerSystem.v1_20_0.ComputerSystem",
        "Id": machine, "Name": machine, "SystemType": "Physical" if inventory.bare_metal else "Virtual",
        "UUID": inventory.uuid, "Manufacturer": inventory.manufacturer, "Model": inventory.model,
        "SerialNumber": inventory.serial or inventory.uuid,
        "PowerState": power.state,
        "Status": ENABLED,
        "ProcessorSummary": {"Count": inventory.cpus},
        "MemorySummary": {"TotalSystemMemoryGiB": round(inventory.memory_mib / 1024, 3)},
        "Boot": {
            "BootSourceOverrideTarget": boot.target, "BootSourceOverrideEnabled": boot.enabled,
            "BootSourceOverrideMode": boot.mode,
            "BootSourceOverrideTarget@Redfish.AllowableValues": BOOT_TARGETS,
            "BootSourceOverrideMode@Redfish.AllowableValues": [inventory.firmware],
        },
        "EthernetInterfaces": link(f"{path}/EthernetInterfaces"),
        "VirtualMedia": link(f"{path}/VirtualMedia"),
        "Links": {"ManagedBy": [link(f"/redfish/v1/Managers/{machine}")],
                  "Chassis": [link(f"/redfish/v1/Chassis/{machine}")]},
        "Actions": {"#ComputerSystem.Reset": {"target": f"{path}/Actions/ComputerSystem.Reset",
                                              "ResetType@Redfish.AllowableValues": list(RESET_TYPES)}},
    }
    body["@odata.etag"] = etag_of(body)
    return body


def boot_update(boot: Any, firmware: str) -> BootOverrideUpdate:
    """The machine's boot override update a PATCH of ``Boot`` asks for (400 naming what is wrong)."""
    if not isinstance(boot, dict):
        raise RedfishError(400, "PropertyValueTypeError", boot, "Boot")
    update = BootOverrideUpdate()
    allowed = {"BootSourceOverrideTarget": ("target", BOOT_TARGETS),
               "BootSourceOverrideEnabled": ("enabled", BOOT_ENABLED),
               "BootSourceOverrideMode": ("mode", [firmware])}
    for key, value in boot.items():
        if key not in allowed:
            raise RedfishError(400, "PropertyUnknown", f"Boot/{key}")
        field, values = allowed[key]
        if value not in values:
            raise RedfishError(400, "PropertyValueNotInList", value, f"Boot/{key}")
        setattr(update, field, value)
    return update


def register(app: FastAPI, redfish: Redfish) -> None:
    @app.get("/redfish/v1/Systems")
    async def systems(request: Request) -> Response:
        members = await redfish.visible_machines(request)
        return json_response(collection("/redfish/v1/Systems", "ComputerSystemCollection", "Computer systems",
                                        [system_path(machine) for machine in members]))

    @app.get("/redfish/v1/Systems/{machine}")
    async def system(request: Request, machine: str) -> Response:
        await redfish.login(request, machine)
        return json_response(await computer_system(redfish, machine))

    @app.patch("/redfish/v1/Systems/{machine}")
    async def patch_system(request: Request, machine: str) -> Response:
        """PATCH of Boot (ConfigureComponents); with If-Match, 412 unless it is the current ETag."""
        await redfish.login(request, machine, "ConfigureComponents")
        body = await patch_body(request)
        current = await computer_system(redfish, machine)
        check_if_match(request, current)
        for key in body:
            if key != "Boot":
                raise RedfishError(400, "PropertyNotWritable" if key in current else "PropertyUnknown", key)
        if "Boot" in body:
            firmware = current["Boot"]["BootSourceOverrideMode@Redfish.AllowableValues"][0]
            await bus.request(redfish.nc, machine, subjects.BOOT_SET, boot_update(body["Boot"], firmware),
                              BootOverride)
        return json_response(await computer_system(redfish, machine))

    @app.post("/redfish/v1/Systems/{machine}/Actions/ComputerSystem.Reset")
    async def reset(request: Request, machine: str) -> Response:
        """ComputerSystem.Reset with each reset type's real effect on the VM."""
        await redfish.login(request, machine, "ConfigureComponents")
        body = await json_body(request)
        action = "#ComputerSystem.Reset"
        if "ResetType" not in body:
            raise RedfishError(400, "ActionParameterMissing", action, "ResetType")
        for key in body:
            if key != "ResetType":
                raise RedfishError(400, "ActionParameterUnknown", action, key)
        reset_type = body["ResetType"]
        if not isinstance(reset_type, str) or reset_type not in RESET_TYPES:
            raise RedfishError(400, "ActionParameterValueNotInList", reset_type, "ResetType", action)
        power_action = RESET_TYPES[reset_type]
        if power_action is None:
            await graceful_restart(redfish, machine)
        else:
            await bus.request(redfish.nc, machine, subjects.POWER_SET, PowerRequest(action=power_action),
                              PowerStatus, timeout=60)
        return Response(status_code=204)

    @app.get("/redfish/v1/Systems/{machine}/EthernetInterfaces")
    async def ethernet_interfaces(request: Request, machine: str) -> Response:
        await redfish.login(request, machine)
        inventory = await bus.request(redfish.nc, machine, subjects.INVENTORY_GET, None, Inventory)
        path = f"{system_path(machine)}/EthernetInterfaces"
        return json_response(collection(path, "EthernetInterfaceCollection", "Ethernet interfaces",
                                        [f"{path}/{index}" for index in range(len(inventory.macs))]))

    @app.get("/redfish/v1/Systems/{machine}/EthernetInterfaces/{index}")
    async def ethernet_interface(request: Request, machine: str, index: str) -> Response:
        await redfish.login(request, machine)
        inventory = await bus.request(redfish.nc, machine, subjects.INVENTORY_GET, None, Inventory)
        if not index.isdigit() or int(index) >= len(inventory.macs):
            raise RedfishError(404, "ResourceNotFound", "EthernetInterface", index)
        mac = inventory.macs[int(index)]
        return json_response({
            "@odata.id": f"{system_path(machine)}/EthernetInterfaces/{index}",
            "@odata.type": "#EthernetInterface.v1_12_0.EthernetInterface", "Id": index, "Name": f"NIC {index}",
            "MACAddress": mac, "PermanentMACAddress": mac, "Status": ENABLED})


async def graceful_restart(redfish: Redfish, machine: str) -> None:
    """The ACPI power button; once the guest has shut down, power on (in the background)."""
    status = await bus.request(redfish.nc, machine, subjects.POWER_SET, PowerRequest(action="soft"), PowerStatus)
    if status.state == "Off":
        await bus.request(redfish.nc, machine, subjects.POWER_SET, PowerRequest(action="on"), PowerStatus)
        return

    async def power_on_when_off() -> None:
        deadline = asyncio.get_running_loop().time() + GRACEFUL_RESTART_TIMEOUT
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.5)
            power = await bus.request(redfish.nc, machine, subjects.POWER_GET, PowerQuery(), PowerStatus)
            if power.state == "Off":
                await bus.request(redfish.nc, machine, subjects.POWER_SET, PowerRequest(action="on"), PowerStatus)
                return
        log.warning("%s: GracefulRestart: the guest did not shut down within %.0f s", machine,
                    GRACEFUL_RESTART_TIMEOUT)

    task = asyncio.create_task(power_on_when_off())
    _background.add(task)
    task.add_done_callback(_background.discard)


_background: set[asyncio.Task[None]] = set()
