"""UpdateService and its FirmwareInventory: the BMC's and each machine's firmware versions (Redfish
UpdateService, SoftwareInventory schemas).

Nothing can be updated here: the BMC is qemu-bmc itself (updated as a package), and a machine's
firmware is the file its QEMU is launched with (``[qemu] ovmf_code`` or QEMU's own SeaBIOS). So the
service says ``ServiceEnabled`` false, has no update actions, and every inventory item is not
``Updateable``. The inventory lists the BMC and the system firmware of each machine the caller logs
in to; a machine's firmware version is the one the machine service reads (``hardware.get``'s
``bios_version``), null while it is not known.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import Hardware

from . import __version__
from .errors import RedfishError
from .resources import ENABLED, Redfish, collection, json_response, link

SERVICE_PATH = "/redfish/v1/UpdateService"
INVENTORY_PATH = f"{SERVICE_PATH}/FirmwareInventory"
SOFTWARE_TYPE = "#SoftwareInventory.v1_13_0.SoftwareInventory"
BMC = "BMC"
BIOS_PREFIX = "BIOS-"


def bmc_firmware(machines: list[str]) -> dict[str, Any]:
    return {
        "@odata.id": f"{INVENTORY_PATH}/{BMC}", "@odata.type": SOFTWARE_TYPE, "Id": BMC, "Name": "qemu-bmc",
        "Description": "The BMC of every machine: the qemu-bmc services", "Manufacturer": "qemu-bmc",
        "Version": __version__, "Updateable": False, "Status": ENABLED,
        "RelatedItem": [link(f"/redfish/v1/Managers/{machine}") for machine in machines]}


def system_firmware(machine: str, hardware: Hardware) -> dict[str, Any]:
    item = f"{BIOS_PREFIX}{machine}"
    return {
        "@odata.id": f"{INVENTORY_PATH}/{item}", "@odata.type": SOFTWARE_TYPE, "Id": item,
        "Name": f"System firmware of {machine}", "Description": "The firmware (BIOS or UEFI) the machine runs",
        "Version": hardware.bios_version, "Updateable": False, "Status": ENABLED,
        "RelatedItem": [link(f"/redfish/v1/Systems/{machine}")]}


def register(app: FastAPI, redfish: Redfish) -> None:
    @app.get(SERVICE_PATH)
    async def update_service(request: Request) -> Response:
        await redfish.login(request)
        return json_response({
            "@odata.id": SERVICE_PATH, "@odata.type": "#UpdateService.v1_17_0.UpdateService", "Id": "UpdateService",
            "Name": "Update service", "Description": "Firmware versions; nothing can be updated through Redfish",
            "ServiceEnabled": False, "Status": {"State": "Disabled", "Health": "OK"},
            "FirmwareInventory": link(INVENTORY_PATH)})

    @app.get(INVENTORY_PATH)
    async def firmware_inventory(request: Request) -> Response:
        machines = await redfish.visible_machines(request)
        members = [f"{INVENTORY_PATH}/{item}" for item in [BMC, *(f"{BIOS_PREFIX}{machine}" for machine in machines)]]
        return json_response(collection(INVENTORY_PATH, "SoftwareInventoryCollection", "Firmware inventory", members))

    @app.get(f"{INVENTORY_PATH}/{{item}}")
    async def firmware(request: Request, item: str) -> Response:
        if item == BMC:
            return json_response(bmc_firmware(await redfish.visible_machines(request)))
        if not item.startswith(BIOS_PREFIX):
            await redfish.login(request)
            raise RedfishError(404, "ResourceNotFound", "SoftwareInventory", item)
        machine = item.removeprefix(BIOS_PREFIX)
        await redfish.login(request, machine)
        hardware = await bus.request(redfish.nc, machine, subjects.HARDWARE_GET, None, Hardware)
        return json_response(system_firmware(machine, hardware))
