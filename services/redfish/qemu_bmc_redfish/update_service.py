"""UpdateService: the firmware inventory (the BMC's and each machine's system firmware) and
SimpleUpdate of a machine's system firmware (Redfish UpdateService, SoftwareInventory and
ActionInfo schemas; DSP0266 §9.8 actions).

The inventory lists the BMC (qemu-bmc, updated as a package: never ``Updateable``) and the system
firmware of each machine the caller logs in to (``BIOS-<machine>``): what the machine service reads
of the firmware the machine runs, or will run at its next power-on (``hardware.get``: its version,
who made it, whether an image can replace it).

``#UpdateService.SimpleUpdate`` (ConfigureComponents on each target machine, as the DMTF privilege
registry has it for the UpdateService) installs a system firmware image:

* ``ImageURI``: an http(s) URL; without a scheme, ``TransferProtocol``'s (HTTP or HTTPS; HTTP when
  not given), which is ignored for a URI with a scheme, as the schema says. Its host must not be an
  internal address (as virtual media images: ``virtual_media.check_image_target``). ``Username`` and
  ``Password``: HTTP Basic credentials for the image's server.
* ``Targets``: the ``BIOS-<machine>`` inventory items, or the ComputerSystems (the schema applies the
  image to the system's components); needed when the caller sees more than one machine. The
  BMC is not a target.
* Each target machine's service downloads the image, checks that it is firmware for the boot mode
  the machine runs in and installs it: the machine boots with it from its next reset or power-on
  (docs/redfish.md "Firmware inventory and update"). All within the request: 400 naming what is wrong with the
  image or its download, nothing changed then for that machine.

The update is done when the request is answered: 200 with the Base registry's Success. Each
machine's update is a completed Task too (kept by its machine service, shown by the TaskService,
see ``tasks``), and the first target's is the answer's ``Location``: sushy's ``simple_update``
needs one to make its task monitor of, and Ironic's firmware interface then reads that Task's
state and status, as it does from sushy-tools' answer.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request, Response
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.messages import FirmwareUpdate, FirmwareUpdated, Hardware

from . import __version__
from .errors import RedfishError, message
from .resources import ENABLED, Redfish, collection, json_body, json_response, link
from .systems import system_path
from .tasks import firmware_task_path
from .virtual_media import PROTOCOLS, Parameters, check_image_target, image_url_ok

SERVICE_PATH = "/redfish/v1/UpdateService"
INVENTORY_PATH = f"{SERVICE_PATH}/FirmwareInventory"
SIMPLE_UPDATE = "#UpdateService.SimpleUpdate"
ACTION_PATH = f"{SERVICE_PATH}/Actions/UpdateService.SimpleUpdate"
ACTION_INFO = f"{SERVICE_PATH}/SimpleUpdateActionInfo"
SOFTWARE_TYPE = "#SoftwareInventory.v1_13_0.SoftwareInventory"
BMC = "BMC"
BIOS_PREFIX = "BIOS-"
PRIVILEGE = "ConfigureComponents"
#: URL schemes → TransferProtocol (what the machine service downloads with).
PARAMETERS = ("ImageURI", "TransferProtocol", "Targets", "Username", "Password")
#: The schema's other parameters: staging, local image stores, exclusions are not done here.
#: (ForceUpdate bypasses update policies, and there are none: it is taken, and changes nothing.)
UNSUPPORTED = ("Stage", "LocalImage", "ExcludeTargets")
#: The machine service's download time-out (120 s) and the checks after it.
UPDATE_TIMEOUT = 150.0
#: The largest image a machine takes: x86 QEMU maps at most 8 MiB of system flash.
MAX_IMAGE_BYTES = 8 << 20


def bios_item(machine: str) -> str:
    return f"{INVENTORY_PATH}/{BIOS_PREFIX}{machine}"


def bmc_firmware(machines: list[str]) -> dict[str, Any]:
    return {
        "@odata.id": f"{INVENTORY_PATH}/{BMC}", "@odata.type": SOFTWARE_TYPE, "Id": BMC, "Name": "qemu-bmc",
        "Description": "The BMC of every machine: the qemu-bmc services", "Manufacturer": "qemu-bmc",
        "Version": __version__, "Updateable": False, "Status": ENABLED,
        "RelatedItem": [link(f"/redfish/v1/Managers/{machine}") for machine in machines]}


def system_firmware(machine: str, hardware: Hardware) -> dict[str, Any]:
    item = f"{BIOS_PREFIX}{machine}"
    return {
        "@odata.id": bios_item(machine), "@odata.type": SOFTWARE_TYPE, "Id": item,
        "Name": f"System firmware of {machine}", "Description": "The firmware (BIOS or UEFI) the machine runs",
        "Manufacturer": hardware.bios_manufacturer, "Version": hardware.bios_version,
        "Updateable": hardware.bios_updateable, "Status": ENABLED, "RelatedItem": [link(system_path(machine))]}


def action_info(machines: list[str], updateable: list[str]) -> dict[str, Any]:
    """SimpleUpdate's parameters as this service takes them (Targets: the machines the caller sees
    whose firmware can be replaced)."""
    targets = [uri for machine in updateable for uri in (bios_item(machine), system_path(machine))]
    return {
        "@odata.id": ACTION_INFO, "@odata.type": "#ActionInfo.v1_5_0.ActionInfo", "Id": "SimpleUpdateActionInfo",
        "Name": "SimpleUpdate parameters",
        "Parameters": [
            {"Name": "ImageURI", "Required": True, "DataType": "String"},
            {"Name": "TransferProtocol", "Required": False, "DataType": "String",
             "AllowableValues": list(PROTOCOLS.values())},
            {"Name": "Targets", "Required": len(machines) > 1, "DataType": "StringArray", "AllowableValues": targets},
            {"Name": "Username", "Required": False, "DataType": "String"},
            {"Name": "Password", "Required": False, "DataType": "String"}]}


def image_uri(body: dict[str, Any], params: Parameters) -> str:
    """The http(s) URL of ``ImageURI``, the scheme ``TransferProtocol``'s when it has none."""
    if "ImageURI" not in body:
        raise RedfishError(400, "ActionParameterMissing", SIMPLE_UPDATE, "ImageURI")
    value, protocol = body["ImageURI"], body.get("TransferProtocol")
    if not isinstance(value, str):
        raise params.type_error(value, "ImageURI")
    if protocol is not None and not isinstance(protocol, str):
        raise params.type_error(protocol, "TransferProtocol")
    uri = value
    if "://" not in value:
        if protocol is not None and protocol not in PROTOCOLS.values():
            raise params.not_in_list(protocol, "TransferProtocol")
        uri = f"{(protocol or 'HTTP').lower()}://{value}"
    if not image_url_ok(uri):
        raise params.format_error(value, "ImageURI")
    return uri


def target_machines(body: dict[str, Any], machines: list[str], params: Parameters) -> list[str]:
    """The machines ``Targets`` names (their BIOS items or systems); all of them when the caller
    sees one machine only."""
    targets = body.get("Targets")
    if targets is None or targets == []:
        if len(machines) != 1:
            raise RedfishError(400, "ActionParameterMissing", SIMPLE_UPDATE, "Targets")
        return machines
    if not isinstance(targets, list) or not all(isinstance(target, str) for target in targets):
        raise params.type_error(targets, "Targets")
    uris = {uri: machine for machine in machines for uri in (bios_item(machine), system_path(machine))}
    chosen = []
    for target in targets:
        machine = uris.get(target.rstrip("/"))
        if machine is None:
            raise params.not_in_list(target, "Targets")
        chosen.append(machine)
    return list(dict.fromkeys(chosen))


def update_request(body: dict[str, Any], params: Parameters) -> FirmwareUpdate:
    for key in body:
        if key in UNSUPPORTED:
            raise params.not_supported(key)
        if key not in PARAMETERS and key != "ForceUpdate":
            raise params.unknown(key)
    if not isinstance(body.get("ForceUpdate", False), bool):
        raise params.type_error(body["ForceUpdate"], "ForceUpdate")
    credentials = {key: body.get(key) for key in ("Username", "Password")}
    for key, value in credentials.items():
        if value is not None and not isinstance(value, str):
            raise params.type_error(value, key)
    return FirmwareUpdate(image_uri=image_uri(body, params), username=credentials["Username"],
                          password=credentials["Password"])


def register(app: FastAPI, redfish: Redfish) -> None:
    async def hardware(machine: str) -> Hardware:
        return await bus.request(redfish.nc, machine, subjects.HARDWARE_GET, None, Hardware)

    @app.get(SERVICE_PATH)
    async def update_service(request: Request) -> Response:
        await redfish.login(request)
        return json_response({
            "@odata.id": SERVICE_PATH, "@odata.type": "#UpdateService.v1_17_0.UpdateService", "Id": "UpdateService",
            "Name": "Update service", "Description": "Firmware versions; SimpleUpdate of a machine's system firmware",
            "ServiceEnabled": True, "Status": ENABLED, "MaxImageSizeBytes": MAX_IMAGE_BYTES,
            "FirmwareInventory": link(INVENTORY_PATH),
            "Actions": {SIMPLE_UPDATE: {"target": ACTION_PATH, "@Redfish.ActionInfo": ACTION_INFO,
                                        "TransferProtocol@Redfish.AllowableValues": list(PROTOCOLS.values())}}})

    @app.get(ACTION_INFO)
    async def simple_update_info(request: Request) -> Response:
        machines = await redfish.visible_machines(request)
        found = await asyncio.gather(*(hardware(machine) for machine in machines))
        return json_response(action_info(machines, [item.machine for item in found if item.bios_updateable]))

    @app.get(INVENTORY_PATH)
    async def firmware_inventory(request: Request) -> Response:
        machines = await redfish.visible_machines(request)
        members = [f"{INVENTORY_PATH}/{BMC}", *(bios_item(machine) for machine in machines)]
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
        return json_response(system_firmware(machine, await hardware(machine)))

    @app.post(ACTION_PATH)
    async def simple_update(request: Request) -> Response:
        """Install the image on each target, in turn; the first refusal ends the request (the
        targets before it have the image)."""
        machines = await redfish.visible_machines(request)
        await redfish.login(request, privilege=PRIVILEGE)  # 403 before anything for a caller who may update none
        params = Parameters(SIMPLE_UPDATE)
        body = await json_body(request)
        update = update_request(body, params)
        await check_image_target(redfish, update.image_uri, params, "ImageURI")
        targets = target_machines(body, machines, params)
        for machine in targets:
            await redfish.login(request, machine, PRIVILEGE)
        for machine in targets:
            if not (await hardware(machine)).bios_updateable:
                raise params.not_in_list(bios_item(machine), "Targets")
        tasks = []
        for machine in targets:
            try:
                done = await bus.request(redfish.nc, machine, subjects.FIRMWARE_UPDATE, update, FirmwareUpdated,
                                         timeout=UPDATE_TIMEOUT)
            except BusError as exc:
                if exc.error == "bad_request":
                    raise params.refused("ImageURI", exc.message) from exc
                raise
            tasks.append(firmware_task_path(machine, done))
        return json_response({"@Message.ExtendedInfo": [message("Success")]}, headers={"Location": tasks[0]})
