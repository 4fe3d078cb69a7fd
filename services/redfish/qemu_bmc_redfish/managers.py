"""Managers: one BMC per machine (Redfish Manager schema)."""

from __future__ import annotations

from fastapi import FastAPI, Request, Response

from . import __version__
from .app import Redfish, json_response, link


def register(app: FastAPI, redfish: Redfish) -> None:
    @app.get("/redfish/v1/Managers")
    async def managers(request: Request) -> Response:
        members = await redfish.visible_machines(request)
        return json_response({
            "@odata.id": "/redfish/v1/Managers", "@odata.type": "#ManagerCollection.ManagerCollection",
            "Name": "Managers", "Members@odata.count": len(members),
            "Members": [link(f"/redfish/v1/Managers/{machine}") for machine in members]})

    @app.get("/redfish/v1/Managers/{machine}")
    async def manager(request: Request, machine: str) -> Response:
        await redfish.login(request, machine)
        return json_response({
            "@odata.id": f"/redfish/v1/Managers/{machine}", "@odata.type": "#Manager.v1_19_0.Manager",
            "Id": machine, "Name": f"BMC of {machine}", "ManagerType": "BMC", "FirmwareVersion": __version__,
            "Status": {"State": "Enabled", "Health": "OK"}, "PowerState": "On",
            "Links": {"ManagerForServers": [link(f"/redfish/v1/Systems/{machine}")],
                      "ManagerForChassis": [link(f"/redfish/v1/Chassis/{machine}")]}})
