"""Managers: one BMC per machine (Redfish Manager, EthernetInterface and ManagerNetworkProtocol
schemas), with the BMC's own settings, all kept by the state service: its network settings (see
manager_network.py), its names and NTP servers, and its clock.

The BMC's clock is the state service's host clock plus an offset a client sets, by PATCHing the
Manager's DateTime or with IPMI Set SEL Time (IPMI v2.0 §31.11); it stamps the SEL's records and
Get SEL Time reads it. DateTimeLocalOffset is the offset DateTime is shown in. No NTP client
runs: NTP's settings are kept for the clients that configure them.

A PATCH needs ConfigureManager; with If-Match, 412 unless it is the resource's current ETag (the
Manager's ETag leaves DateTime out, which changes every second).

A manager reset does not touch the VM: the BMC is this service, shared by every machine, so
there is nothing to restart per machine; GracefulRestart and ForceRestart are answered 204 and
logged."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import datetime
from typing import Any
from urllib.parse import quote

import msgspec
from fastapi import FastAPI, Request, Response
from msgspec import UNSET
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared import manager_settings as checks
from qemu_bmc_shared.ipmi.core import LAN_CHANNEL
from qemu_bmc_shared.kvm import WEB_VIEWERS
from qemu_bmc_shared.messages import LanConfig, LanParamSet, LanRef, ManagerSettings, ManagerSettingsUpdate, SolConfig

from . import __version__, kvm
from .errors import RedfishError
from .manager_network import (
    INTERFACE_ID,
    ethernet_interface,
    fqdn,
    interface_changes,
    names,
    of_type,
    refuse_others,
    servers,
)
from .resources import ENABLED, Redfish, check_if_match, collection, etag_of, json_response, link, patch_body, writable
from .service_root import service_uuid
from .virtual_media import action_body, collection_path

log = logging.getLogger(__name__)

MANAGER_TYPE = "#Manager.v1_24_0.Manager"
NETWORK_PROTOCOL_TYPE = "#ManagerNetworkProtocol.v1_12_0.ManagerNetworkProtocol"
RESET = "#Manager.Reset"
RESET_TYPES = ["GracefulRestart", "ForceRestart"]
NTP_PORT = 123
#: What a PATCH may change: the Manager's clock, and the network protocols' names and NTP.
MANAGER_WRITABLE = ("DateTime", "DateTimeLocalOffset")
PROTOCOL_WRITABLE = ("HostName", "FQDN", "NTP")
#: SOL configuration parameter 1, SOL Enable (IPMI v2.0 §26.3).
SOL_ENABLE = 1


def manager_path(machine: str) -> str:
    return f"/redfish/v1/Managers/{machine}"


def manager_uuid(machine: str) -> str:
    """Stable for the machine name, and not the system's UUID."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"qemu-bmc:manager:{machine}"))


def date_time(settings: ManagerSettings) -> str:
    """The BMC's clock, in its local time offset."""
    moment = datetime.fromtimestamp(checks.bmc_time(settings), checks.local_zone(settings.local_offset))
    return moment.isoformat(timespec="seconds")


def clock_changes(body: dict[str, Any]) -> ManagerSettingsUpdate:
    """DateTime (Edm.DateTimeOffset: an ISO 8601 time with its offset) and DateTimeLocalOffset."""
    update = ManagerSettingsUpdate()
    if "DateTime" in body:
        value = of_type(body["DateTime"], str, "DateTime")
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise RedfishError(400, "PropertyValueFormatError", value, "DateTime") from None
        if moment.tzinfo is None:
            raise RedfishError(400, "PropertyValueFormatError", value, "DateTime")
        if not checks.clock_ok(moment.timestamp()):
            raise RedfishError(400, "PropertyValueOutOfRange", value, "DateTime")
        update.clock = moment.timestamp()
    if "DateTimeLocalOffset" in body:
        offset = of_type(body["DateTimeLocalOffset"], str, "DateTimeLocalOffset")
        if not checks.local_offset_ok(offset):
            raise RedfishError(400, "PropertyValueFormatError", offset, "DateTimeLocalOffset")
        update.local_offset = offset
    return update


def ntp_changes(current: dict[str, Any], request: Any, settings: ManagerSettings, update: ManagerSettingsUpdate
                ) -> None:
    for key, value in of_type(request, dict, "NTP").items():
        if key == "ProtocolEnabled":
            update.ntp_enabled = of_type(value, bool, "NTP/ProtocolEnabled")
        elif key == "NTPServers":
            update.ntp_servers = servers(settings.ntp_servers, value, "NTP/NTPServers", checks.server_ok)
        else:
            raise RedfishError(400, "PropertyNotWritable" if key in current else "PropertyUnknown", f"NTP/{key}")


def register(app: FastAPI, redfish: Redfish) -> None:
    async def settings_of(machine: str) -> ManagerSettings:
        return await bus.request(redfish.nc, machine, subjects.MANAGER_GET, None, ManagerSettings)

    async def change_settings(machine: str, update: ManagerSettingsUpdate) -> None:
        if any(value is not UNSET for value in msgspec.structs.astuple(update)):
            await bus.request(redfish.nc, machine, subjects.MANAGER_SET, update, ManagerSettings)

    async def manager_body(machine: str) -> dict[str, Any]:
        sol, settings = await asyncio.gather(bus.request(redfish.nc, machine, subjects.SOL_GET, None, SolConfig),
                                             settings_of(machine))
        sol_enable = sol.params.get(SOL_ENABLE, b"")
        sol_enabled = bool(machine in redfish.machines.ipmi and sol_enable and sol_enable[0] & 1)  # SOL is IPMI LAN
        path = manager_path(machine)
        body = {
            "@odata.id": path, "@odata.type": MANAGER_TYPE,
            "Id": machine, "Name": f"BMC of {machine}", "ManagerType": "BMC", "Model": "qemu-bmc",
            "FirmwareVersion": __version__, "UUID": manager_uuid(machine),
            "ServiceEntryPointUUID": service_uuid(),  # the service root this manager is reached through
            "DateTimeLocalOffset": settings.local_offset, **writable(*MANAGER_WRITABLE),
            "Status": ENABLED, "PowerState": "On",
            # IPMI SOL when enabled, and always the web console (/console/<machine>, console.py): the
            # schema has no WebSocket connect type, "Oem" stands for it
            "SerialConsole": {"ServiceEnabled": True,
                              "ConnectTypesSupported": ["IPMI", "Oem"] if sol_enabled else ["Oem"]},
            # the web KVM (/kvm/<machine>, kvm.py): noVNC on a WebSocket, KVM over IP
            "GraphicalConsole": {"ServiceEnabled": True, "MaxConcurrentSessions": WEB_VIEWERS,
                                 "ConnectTypesSupported": ["KVMIP"]},
            "Oem": {"QemuBmc": {"@odata.type": "#QemuBmcManager.v1_0_0.Manager",
                                "GraphicalConsoleURI": kvm.page_path(machine),
                                "SerialConsoleURI": f"/console/{quote(machine, safe='')}",
                                "ScreenshotURI": kvm.screenshot_path(machine)}},
            "EthernetInterfaces": link(f"{path}/EthernetInterfaces"),
            "NetworkProtocol": link(f"{path}/NetworkProtocol"), "LogServices": link(f"{path}/LogServices"),
            "VirtualMedia": link(collection_path("Managers", machine)),
            "Links": {"ManagerForServers": [link(f"/redfish/v1/Systems/{machine}")],
                      "ManagerForChassis": [link(f"/redfish/v1/Chassis/{machine}")]},
            "Actions": {RESET: {"target": f"{path}/Actions/Manager.Reset",
                                "ResetType@Redfish.AllowableValues": RESET_TYPES}}}
        return {**body, "@odata.etag": etag_of(body), "DateTime": date_time(settings)}

    async def interface_body(machine: str) -> tuple[dict[str, Any], ManagerSettings]:
        lan, settings = await asyncio.gather(
            bus.request(redfish.nc, machine, subjects.LAN_GET, LanRef(channel=LAN_CHANNEL), LanConfig),
            settings_of(machine))
        address = redfish.machines.ipmi.get(machine, "").rpartition(":")[0].strip("[]")
        listening = address if address and address != "0.0.0.0" and ":" not in address else None
        path = f"{manager_path(machine)}/EthernetInterfaces/{INTERFACE_ID}"
        return ethernet_interface(path, lan, settings, listening), settings

    async def network_protocol_body(machine: str) -> dict[str, Any]:
        """HTTP or HTTPS as the Redfish service listens; IPMI when an IPMI over LAN service on the
        bus serves the machine; the BMC's names and NTP settings."""
        settings = redfish.config.redfish
        port = settings.listen[1]
        address = redfish.machines.ipmi.get(machine)
        ipmi_port = int(address.rpartition(":")[2]) if address else None
        bmc = await settings_of(machine)
        return {
            "@odata.id": f"{manager_path(machine)}/NetworkProtocol", "@odata.type": NETWORK_PROTOCOL_TYPE,
            "Id": "NetworkProtocol", "Name": f"Network protocols of the BMC of {machine}", "Status": ENABLED,
            "HostName": bmc.host_name, "FQDN": fqdn(bmc), **writable(*PROTOCOL_WRITABLE),
            "HTTP": {"ProtocolEnabled": not settings.tls, "Port": None if settings.tls else port},
            "HTTPS": {"ProtocolEnabled": settings.tls, "Port": port if settings.tls else None,
                      "Certificates": link(f"{manager_path(machine)}/NetworkProtocol/HTTPS/Certificates")},
            "IPMI": {"ProtocolEnabled": ipmi_port is not None, "Port": ipmi_port},
            "NTP": {"ProtocolEnabled": bmc.ntp_enabled, "Port": NTP_PORT, "NTPServers": bmc.ntp_servers}}

    @app.get("/redfish/v1/Managers")
    async def managers(request: Request) -> Response:
        members = await redfish.visible_machines(request)
        return json_response(collection("/redfish/v1/Managers", "ManagerCollection", "Managers",
                                        [manager_path(machine) for machine in members]))

    @app.get("/redfish/v1/Managers/{machine}")
    async def manager(request: Request, machine: str) -> Response:
        await redfish.login(request, machine)
        return json_response(await manager_body(machine))

    @app.patch("/redfish/v1/Managers/{machine}")
    async def patch_manager(request: Request, machine: str) -> Response:
        """DateTime (sets the BMC's clock) and DateTimeLocalOffset."""
        await redfish.login(request, machine, "ConfigureManager")
        body = await patch_body(request)
        current = await manager_body(machine)
        check_if_match(request, current)
        refuse_others(body, current, MANAGER_WRITABLE)
        await change_settings(machine, clock_changes(body))
        return json_response(await manager_body(machine))

    @app.post("/redfish/v1/Managers/{machine}/Actions/Manager.Reset")
    async def reset(request: Request, machine: str) -> Response:
        """Accepted and logged, nothing else: the VM is not the BMC (without ResetType: GracefulRestart)."""
        login = await redfish.login(request, machine, "ConfigureManager")
        body = await action_body(request)
        for key in body:
            if key != "ResetType":
                raise RedfishError(400, "ActionParameterUnknown", RESET, key)
        reset_type = body.get("ResetType", "GracefulRestart")
        if not isinstance(reset_type, str) or reset_type not in RESET_TYPES:
            raise RedfishError(400, "ActionParameterValueNotInList", reset_type, "ResetType", RESET)
        log.info("%s: Manager.Reset %s by %s: the BMC is a service shared by every machine, nothing to restart",
                 machine, reset_type, login.user)
        return Response(status_code=204)

    @app.get("/redfish/v1/Managers/{machine}/EthernetInterfaces")
    async def ethernet_interfaces(request: Request, machine: str) -> Response:
        await redfish.login(request, machine)
        path = f"{manager_path(machine)}/EthernetInterfaces"
        return json_response(collection(path, "EthernetInterfaceCollection", "BMC Ethernet interfaces",
                                        [f"{path}/{INTERFACE_ID}"]))

    async def interface_of(request: Request, machine: str, interface: str, privilege: str = "Login"
                           ) -> tuple[dict[str, Any], ManagerSettings]:
        await redfish.login(request, machine, privilege)
        if interface != INTERFACE_ID:
            raise RedfishError(404, "ResourceNotFound", "EthernetInterface", interface)
        return await interface_body(machine)

    @app.get("/redfish/v1/Managers/{machine}/EthernetInterfaces/{interface}")
    async def ethernet_interface_of(request: Request, machine: str, interface: str) -> Response:
        return json_response((await interface_of(request, machine, interface))[0])

    @app.patch("/redfish/v1/Managers/{machine}/EthernetInterfaces/{interface}")
    async def patch_ethernet_interface(request: Request, machine: str, interface: str) -> Response:
        """The BMC's IPv4 (IPMI LAN parameters), VLAN, names, DNS servers and static IPv6 settings."""
        current, settings = await interface_of(request, machine, interface, "ConfigureManager")
        body = await patch_body(request)
        check_if_match(request, current)
        lan, update = interface_changes(current, body, settings)
        for number, value in lan.items():
            await bus.request(redfish.nc, machine, subjects.LAN_SET,
                              LanParamSet(param=number, data=value, channel=LAN_CHANNEL), LanConfig)
        await change_settings(machine, update)
        return json_response((await interface_body(machine))[0])

    @app.get("/redfish/v1/Managers/{machine}/NetworkProtocol")
    async def network_protocol(request: Request, machine: str) -> Response:
        await redfish.login(request, machine)
        return json_response(await network_protocol_body(machine))

    @app.patch("/redfish/v1/Managers/{machine}/NetworkProtocol")
    async def patch_network_protocol(request: Request, machine: str) -> Response:
        """HostName, FQDN (the same as the Ethernet interface's) and NTP; the other protocols are the
        configuration file's."""
        await redfish.login(request, machine, "ConfigureManager")
        body = await patch_body(request)
        current = await network_protocol_body(machine)
        check_if_match(request, current)
        refuse_others(body, current, PROTOCOL_WRITABLE)
        update = ManagerSettingsUpdate()
        names(body, update)
        if "NTP" in body:
            ntp_changes(current["NTP"], body["NTP"], await settings_of(machine), update)
        await change_settings(machine, update)
        return json_response(await network_protocol_body(machine))
