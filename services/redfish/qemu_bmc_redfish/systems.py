"""ComputerSystems: one per machine on the bus, the Id being the machine name (Redfish
ComputerSystem schema; DSP0266 §9.7 PATCH and ETags, §9.8 actions)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Request, Response
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import (
    BootOption,
    BootOptions,
    BootOverride,
    BootOverrideUpdate,
    ChassisConfig,
    PowerRequest,
    PowerStatus,
    SystemView,
)

from . import inventory, system_settings
from .errors import RedfishError
from .resources import (
    ENABLED,
    Redfish,
    check_if_match,
    collection,
    etag_of,
    json_body,
    json_response,
    link,
    patch_body,
    writable,
)

log = logging.getLogger(__name__)

BOOT_TARGETS = ["None", "Pxe", "Hdd", "Cd", "BiosSetup", "UefiTarget", "UefiBootNext"]
BOOT_OPTION_TYPE = "#BootOption.v1_0_5.BootOption"
BOOT_ENABLED = ["Disabled", "Once", "Continuous"]
#: The Boot properties a PATCH may change (BootOrder is the machine's command line's).
BOOT_WRITABLE = ("BootSourceOverrideTarget", "BootSourceOverrideEnabled", "BootSourceOverrideMode",
                 "UefiTargetBootSourceOverride", "BootNext")
#: Reset types → the machine's power requests. The graceful ones press the ACPI power button
#: and fall back after the machine's graceful time-out (the machine service keeps that promise);
#: ForceRestart of a machine that is off powers it on, as real BMCs do.
RESET_TYPES: dict[str, PowerRequest] = {
    "On": PowerRequest(action="on"), "ForceOff": PowerRequest(action="off"),
    "GracefulShutdown": PowerRequest(action="soft"), "GracefulRestart": PowerRequest(action="graceful_restart"),
    "ForceRestart": PowerRequest(action="reset", on_if_off=True), "Nmi": PowerRequest(action="nmi"),
    "ForceOn": PowerRequest(action="on"), "PowerCycle": PowerRequest(action="cycle")}


def system_path(machine: str) -> str:
    return f"/redfish/v1/Systems/{machine}"


def boot_modes(view: SystemView) -> list[str]:
    """The boot modes the machine can be switched to."""
    return list(view.inventory.firmwares or [view.inventory.firmware])


async def computer_system(redfish: Redfish, machine: str) -> dict[str, Any]:
    view, chassis = await asyncio.gather(
        bus.request(redfish.nc, machine, subjects.SYSTEM_GET, None, SystemView),
        bus.request(redfish.nc, machine, subjects.CHASSIS_GET, None, ChassisConfig))
    power, boot, identity = view.power, view.boot, view.inventory
    path = system_path(machine)
    body = {
        "@odata.id": path, "@odata.type": "#ComputerSystem.v1_20_0.ComputerSystem",
        "Id": machine, "Name": machine, "SystemType": "Physical" if identity.bare_metal else "Virtual",
        "UUID": identity.uuid, "Manufacturer": identity.manufacturer, "Model": identity.model,
        "SerialNumber": identity.serial or identity.uuid,
        "PowerState": power.state,
        "Status": ENABLED,
        **writable("Boot", *system_settings.WRITABLE),
        **inventory.system_properties(path, view),
        **system_settings.properties(chassis),
        "Boot": {
            **writable(*BOOT_WRITABLE),
            "BootSourceOverrideTarget": boot.target, "BootSourceOverrideEnabled": boot.enabled,
            "BootSourceOverrideMode": boot.mode,
            "BootSourceOverrideTarget@Redfish.AllowableValues": BOOT_TARGETS,
            "BootSourceOverrideEnabled@Redfish.AllowableValues": BOOT_ENABLED,
            "BootSourceOverrideMode@Redfish.AllowableValues": boot_modes(view),
            "UefiTargetBootSourceOverride": boot.uefi_target, "BootNext": boot.boot_next,
            "BootOrder": view.boot_options.order if view.boot_options else [],
            "BootOptions": link(f"{path}/BootOptions"),
        },
        "VirtualMedia": link(f"{path}/VirtualMedia"), "LogServices": link(f"{path}/LogServices"),
        "Links": {"ManagedBy": [link(f"/redfish/v1/Managers/{machine}")],
                  "Chassis": [link(f"/redfish/v1/Chassis/{machine}")]},
        "Actions": {"#ComputerSystem.Reset": {"target": f"{path}/Actions/ComputerSystem.Reset",
                                              "ResetType@Redfish.AllowableValues": list(RESET_TYPES)}},
    }
    body["@odata.etag"] = etag_of(body)
    return body


def boot_update(boot: Any, modes: list[str], options: BootOptions | None) -> BootOverrideUpdate:
    """The machine's boot override update a PATCH of ``Boot`` asks for (400 naming what is wrong).
    UefiTargetBootSourceOverride and BootNext name one of the machine's boot options (by its UEFI
    device path, by its reference), or are null."""
    if not isinstance(boot, dict):
        raise RedfishError(400, "PropertyValueTypeError", boot, "Boot")
    known = options.options if options else []
    update = BootOverrideUpdate()
    allowed = dict(zip(BOOT_WRITABLE, (
        ("target", BOOT_TARGETS), ("enabled", BOOT_ENABLED), ("mode", modes),
        ("uefi_target", [None, *(option.uefi_path for option in known)]),
        ("boot_next", [None, *(option.reference for option in known)])), strict=True))
    for key, value in boot.items():
        if key not in allowed:
            raise RedfishError(400, "PropertyNotWritable" if key == "BootOrder" else "PropertyUnknown", f"Boot/{key}")
        field, values = allowed[key]
        if value not in values:
            raise RedfishError(400, "PropertyValueNotInList", value, f"Boot/{key}")
        setattr(update, field, value)
    if update.target == "UefiBootNext" and boot.get("BootSourceOverrideEnabled") == "Continuous":
        # UEFI's BootNext is a one-time boot (the machine service refuses the other combinations)
        raise RedfishError(400, "PropertyValueConflict", "BootSourceOverrideEnabled", "BootSourceOverrideTarget")
    return update


def boot_option_body(machine: str, option: BootOption) -> dict[str, Any]:
    return {"@odata.id": f"{system_path(machine)}/BootOptions/{option.reference}", "@odata.type": BOOT_OPTION_TYPE,
            "Id": option.reference, "Name": option.name, "BootOptionReference": option.reference,
            "DisplayName": option.name, "UefiDevicePath": option.uefi_path, "Alias": option.kind,
            "BootOptionEnabled": True}


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
        """PATCH of Boot and the system's settings (ConfigureComponents); with If-Match, 412 unless
        it is the current ETag."""
        await redfish.login(request, machine, "ConfigureComponents")
        body = await patch_body(request)
        current = await computer_system(redfish, machine)
        check_if_match(request, current)
        for key in body:
            if key != "Boot" and key not in system_settings.WRITABLE:
                raise RedfishError(400, "PropertyNotWritable" if key in current else "PropertyUnknown", key)
        update = None
        if "Boot" in body:
            options = await bus.request(redfish.nc, machine, subjects.BOOT_OPTIONS, None, BootOptions)
            update = boot_update(body["Boot"], current["Boot"]["BootSourceOverrideMode@Redfish.AllowableValues"],
                                 options)
        await system_settings.patch(redfish, machine, {key: value for key, value in body.items() if key != "Boot"})
        if update is not None:
            await bus.request(redfish.nc, machine, subjects.BOOT_SET, update, BootOverride)
        return json_response(await computer_system(redfish, machine))

    @app.get("/redfish/v1/Systems/{machine}/BootOptions")
    async def boot_options(request: Request, machine: str) -> Response:
        """The devices the machine can boot from (for UefiTarget and UefiBootNext overrides)."""
        await redfish.login(request, machine)
        options = await bus.request(redfish.nc, machine, subjects.BOOT_OPTIONS, None, BootOptions)
        path = f"{system_path(machine)}/BootOptions"
        return json_response(collection(path, "BootOptionCollection", "Boot options",
                                        [f"{path}/{option.reference}" for option in options.options]))

    @app.get("/redfish/v1/Systems/{machine}/BootOptions/{reference}")
    async def boot_option(request: Request, machine: str, reference: str) -> Response:
        await redfish.login(request, machine)
        options = await bus.request(redfish.nc, machine, subjects.BOOT_OPTIONS, None, BootOptions)
        for option in options.options:
            if option.reference == reference:
                return json_response(boot_option_body(machine, option))
        raise RedfishError(404, "ResourceNotFound", "BootOption", reference)

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
        await bus.request(redfish.nc, machine, subjects.POWER_SET, RESET_TYPES[reset_type], PowerStatus, timeout=60)
        return Response(status_code=204)
