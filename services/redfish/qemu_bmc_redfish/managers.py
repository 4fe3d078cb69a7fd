"""Managers: one BMC per machine (Redfish Manager, EthernetInterface and ManagerNetworkProtocol
schemas). The BMC's network settings are the machine's IPMI LAN configuration in the state
service; its protocols come from the configuration file.

A manager reset does not touch the VM: the BMC is this service, shared by every machine, so
there is nothing to restart per machine; GracefulRestart and ForceRestart are answered 204 and
logged."""

from __future__ import annotations

import ipaddress
import logging
import uuid
from datetime import datetime
from typing import Any

from fastapi import FastAPI, Request, Response
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.ipmi.core import LAN_CHANNEL
from qemu_bmc_shared.messages import LanConfig, LanRef, SolConfig

from . import __version__
from .errors import RedfishError
from .resources import ENABLED, Redfish, collection, json_response, link
from .service_root import service_uuid
from .virtual_media import action_body, collection_path

log = logging.getLogger(__name__)

MANAGER_TYPE = "#Manager.v1_24_0.Manager"
ETHERNET_INTERFACE_TYPE = "#EthernetInterface.v1_12_4.EthernetInterface"
NETWORK_PROTOCOL_TYPE = "#ManagerNetworkProtocol.v1_12_0.ManagerNetworkProtocol"
RESET = "#Manager.Reset"
RESET_TYPES = ["GracefulRestart", "ForceRestart"]
#: The one Ethernet interface: the IPMI LAN channel whose parameters it shows.
INTERFACE_ID = str(LAN_CHANNEL)
#: IPMI LAN configuration parameters (IPMI v2.0 §23.2).
LAN_IP, LAN_IP_SOURCE, LAN_MAC, LAN_NETMASK, LAN_GATEWAY = 3, 4, 5, 6, 12
#: SOL configuration parameter 1, SOL Enable (IPMI v2.0 §26.3).
SOL_ENABLE = 1


def manager_path(machine: str) -> str:
    return f"/redfish/v1/Managers/{machine}"


def manager_uuid(machine: str) -> str:
    """Stable for the machine name, and not the system's UUID."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"qemu-bmc:manager:{machine}"))


def ipv4(params: dict[int, bytes], number: int) -> str | None:
    value = params.get(number)
    return str(ipaddress.IPv4Address(value)) if value is not None and len(value) == 4 else None


def mac_address(params: dict[int, bytes]) -> str | None:
    value = params.get(LAN_MAC)
    return ":".join(f"{byte:02x}" for byte in value) if value is not None and len(value) == 6 else None


def address_origin(params: dict[int, bytes]) -> str:
    """IP Address Source (parameter 4, low nibble): 2 is DHCP; static, BIOS-loaded and others are Static."""
    source = params.get(LAN_IP_SOURCE, b"")
    return "DHCP" if source and source[0] & 0x0F == 2 else "Static"


def ethernet_interface(machine: str, lan: LanConfig) -> dict[str, Any]:
    params = lan.params
    origin = address_origin(params)
    address = {"Address": ipv4(params, LAN_IP), "SubnetMask": ipv4(params, LAN_NETMASK),
               "Gateway": ipv4(params, LAN_GATEWAY), "AddressOrigin": origin}
    return {
        "@odata.id": f"{manager_path(machine)}/EthernetInterfaces/{INTERFACE_ID}",
        "@odata.type": ETHERNET_INTERFACE_TYPE, "Id": INTERFACE_ID, "Name": f"BMC LAN channel {lan.channel}",
        "Description": "The BMC's network interface: the IPMI LAN configuration of the machine",
        "InterfaceEnabled": True, "Status": ENABLED,
        "MACAddress": mac_address(params),
        "DHCPv4": {"DHCPEnabled": origin == "DHCP"},
        "IPv4Addresses": [address],
        "IPv4StaticAddresses": [{key: address[key] for key in ("Address", "SubnetMask", "Gateway")}]
        if origin == "Static" else [],
    }


def register(app: FastAPI, redfish: Redfish) -> None:
    async def lan_config(machine: str) -> LanConfig:
        return await bus.request(redfish.nc, machine, subjects.LAN_GET, LanRef(channel=LAN_CHANNEL), LanConfig)

    @app.get("/redfish/v1/Managers")
    async def managers(request: Request) -> Response:
        members = await redfish.visible_machines(request)
        return json_response(collection("/redfish/v1/Managers", "ManagerCollection", "Managers",
                                        [manager_path(machine) for machine in members]))

    @app.get("/redfish/v1/Managers/{machine}")
    async def manager(request: Request, machine: str) -> Response:
        await redfish.login(request, machine)
        sol = await bus.request(redfish.nc, machine, subjects.SOL_GET, None, SolConfig)
        sol_enable = sol.params.get(SOL_ENABLE, b"")
        sol_enabled = bool(machine in redfish.machines.ipmi and sol_enable and sol_enable[0] & 1)  # SOL is IPMI LAN
        path = manager_path(machine)
        now = datetime.now().astimezone()
        return json_response({
            "@odata.id": path, "@odata.type": MANAGER_TYPE,
            "Id": machine, "Name": f"BMC of {machine}", "ManagerType": "BMC", "Model": "qemu-bmc",
            "FirmwareVersion": __version__, "UUID": manager_uuid(machine),
            "ServiceEntryPointUUID": service_uuid(),  # the service root this manager is reached through
            "DateTime": now.isoformat(timespec="seconds"), "DateTimeLocalOffset": now.isoformat()[-6:],
            "Status": ENABLED, "PowerState": "On",
            # IPMI SOL when enabled, and always the web console (/console/<machine>, console.py): the
            # schema has no WebSocket connect type, "Oem" stands for it
            "SerialConsole": {"ServiceEnabled": True,
                              "ConnectTypesSupported": ["IPMI", "Oem"] if sol_enabled else ["Oem"]},
            "EthernetInterfaces": link(f"{path}/EthernetInterfaces"),
            "NetworkProtocol": link(f"{path}/NetworkProtocol"),
            "VirtualMedia": link(collection_path("Managers", machine)),
            "Links": {"ManagerForServers": [link(f"/redfish/v1/Systems/{machine}")],
                      "ManagerForChassis": [link(f"/redfish/v1/Chassis/{machine}")]},
            "Actions": {RESET: {"target": f"{path}/Actions/Manager.Reset",
                                "ResetType@Redfish.AllowableValues": RESET_TYPES}}})

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

    @app.get("/redfish/v1/Managers/{machine}/EthernetInterfaces/{interface}")
    async def ethernet_interface_of(request: Request, machine: str, interface: str) -> Response:
        await redfish.login(request, machine)
        if interface != INTERFACE_ID:
            raise RedfishError(404, "ResourceNotFound", "EthernetInterface", interface)
        return json_response(ethernet_interface(machine, await lan_config(machine)))

    @app.get("/redfish/v1/Managers/{machine}/NetworkProtocol")
    async def network_protocol(request: Request, machine: str) -> Response:
        """HTTP or HTTPS as the Redfish service listens; IPMI when an IPMI over LAN service on the
        bus serves the machine."""
        await redfish.login(request, machine)
        settings = redfish.config.redfish
        port = settings.listen[1]
        address = redfish.machines.ipmi.get(machine)
        ipmi_port = int(address.rpartition(":")[2]) if address else None
        return json_response({
            "@odata.id": f"{manager_path(machine)}/NetworkProtocol", "@odata.type": NETWORK_PROTOCOL_TYPE,
            "Id": "NetworkProtocol", "Name": f"Network protocols of the BMC of {machine}", "Status": ENABLED,
            "HTTP": {"ProtocolEnabled": not settings.tls, "Port": None if settings.tls else port},
            "HTTPS": {"ProtocolEnabled": settings.tls, "Port": port if settings.tls else None},
            "IPMI": {"ProtocolEnabled": ipmi_port is not None, "Port": ipmi_port}})

