"""Processors, Memory, Storage, SimpleStorage and the EthernetInterfaces of each ComputerSystem,
from the machine service's hardware.get (what QEMU really has)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import Hardware, SystemView

from .errors import RedfishError
from .resources import ENABLED, Redfish, collection, json_response, link


def system_properties(path: str, view: SystemView) -> dict[str, Any]:
    """What a ComputerSystem (at ``path``) says of its hardware: summaries and links."""
    identity = view.inventory
    return {
        "ProcessorSummary": {"Count": identity.cpus},
        "MemorySummary": {"TotalSystemMemoryGiB": round(identity.memory_mib / 1024, 3)},
        "EthernetInterfaces": link(f"{path}/EthernetInterfaces"),
    }


def register(app: FastAPI, redfish: Redfish) -> None:
    async def hardware(machine: str) -> Hardware:
        return await bus.request(redfish.nc, machine, subjects.HARDWARE_GET, None, Hardware)

    @app.get("/redfish/v1/Systems/{machine}/EthernetInterfaces")
    async def ethernet_interfaces(request: Request, machine: str) -> Response:
        await redfish.login(request, machine)
        nics = (await hardware(machine)).nics
        path = f"/redfish/v1/Systems/{machine}/EthernetInterfaces"
        return json_response(collection(path, "EthernetInterfaceCollection", "Ethernet interfaces",
                                        [f"{path}/{index}" for index in range(len(nics))]))

    @app.get("/redfish/v1/Systems/{machine}/EthernetInterfaces/{index}")
    async def ethernet_interface(request: Request, machine: str, index: str) -> Response:
        await redfish.login(request, machine)
        nics = (await hardware(machine)).nics
        if not index.isdigit() or int(index) >= len(nics):
            raise RedfishError(404, "ResourceNotFound", "EthernetInterface", index)
        mac = nics[int(index)].mac
        return json_response({
            "@odata.id": f"/redfish/v1/Systems/{machine}/EthernetInterfaces/{index}",
            "@odata.type": "#EthernetInterface.v1_12_0.EthernetInterface", "Id": index, "Name": f"NIC {index}",
            "MACAddress": mac, "PermanentMACAddress": mac, "Status": ENABLED})
