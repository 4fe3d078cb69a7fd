"""Chassis: one per machine (Redfish Chassis schema), with its power and thermal resources (environment.py)."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request, Response
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import Inventory, PowerQuery, PowerStatus

from .environment import chassis_path
from .resources import ENABLED, Redfish, collection, json_response, link


def register(app: FastAPI, redfish: Redfish) -> None:
    @app.get("/redfish/v1/Chassis")
    async def chassis_collection(request: Request) -> Response:
        members = await redfish.visible_machines(request)
        return json_response(collection("/redfish/v1/Chassis", "ChassisCollection", "Chassis",
                                        [chassis_path(machine) for machine in members]))

    @app.get("/redfish/v1/Chassis/{machine}")
    async def chassis(request: Request, machine: str) -> Response:
        await redfish.login(request, machine)
        power, inventory = await asyncio.gather(
            bus.request(redfish.nc, machine, subjects.POWER_GET, PowerQuery(), PowerStatus),
            bus.request(redfish.nc, machine, subjects.INVENTORY_GET, None, Inventory))
        path = chassis_path(machine)
        return json_response({
            "@odata.id": path, "@odata.type": "#Chassis.v1_28_0.Chassis",
            "Id": machine, "Name": f"Chassis of {machine}", "ChassisType": "Other", "PowerState": power.state,
            "UUID": inventory.uuid,  # the machine's SMBIOS UUID (its chassis is the machine)
            "Status": ENABLED,
            **{name: link(f"{path}/{name}") for name in ("PowerSubsystem", "ThermalSubsystem", "EnvironmentMetrics",
                                                         "Sensors", "Power", "Thermal")},
            "Links": {"ComputerSystems": [link(f"/redfish/v1/Systems/{machine}")],
                      "ManagedBy": [link(f"/redfish/v1/Managers/{machine}")]}})
