"""The service root, the OData service document and $metadata (DSP0266 §7, §8.4)."""

from __future__ import annotations

import functools
import socket
import uuid

from fastapi import FastAPI, Response

from .query import PROTOCOL_FEATURES
from .resources import Redfish, json_response, link

#: The schemas the service's resources use, for $metadata and the odata document.
SCHEMAS = ("ServiceRoot", "EventService", "Event", "EventDestinationCollection",
           "ComputerSystemCollection", "ComputerSystem", "ManagerCollection", "Manager",
           "ChassisCollection", "Chassis", "EthernetInterfaceCollection", "EthernetInterface", "Resource",
           "Message", "ActionInfo", "VirtualMediaCollection", "VirtualMedia", "ManagerNetworkProtocol",
           "IPAddresses", "SessionService", "SessionCollection", "Session", "AccountService",
           "ManagerAccountCollection", "ManagerAccount", "RoleCollection", "Role",
           "ProcessorCollection", "Processor", "MemoryCollection", "Memory", "StorageCollection", "Storage",
           "StorageControllerCollection", "StorageController", "DriveCollection", "Drive", "VolumeCollection",
           "Volume", "SimpleStorageCollection", "SimpleStorage", "Power", "Thermal", "PowerSubsystem",
           "ThermalSubsystem", "SensorCollection", "Sensor", "LogServiceCollection", "LogService",
           "LogEntryCollection", "LogEntry", "CertificateService", "CertificateCollection", "Certificate",
           "CertificateLocations", "UpdateService", "SoftwareInventoryCollection", "SoftwareInventory",
           "ThermalMetrics", "EnvironmentMetrics", "BootOptionCollection", "BootOption", "Settings", "TaskService",
           "TaskCollection", "Task")
ROOT_COLLECTIONS = {"Systems": "ComputerSystemCollection", "Managers": "ManagerCollection",
                    "Chassis": "ChassisCollection"}


@functools.cache
def service_uuid() -> str:
    """Stable for the host (replicas behind one name answer alike when they share it)."""
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"qemu-bmc.redfish.{socket.getfqdn()}"))


def register(app: FastAPI, redfish: Redfish) -> None:
    root_uuid = service_uuid()

    @app.get("/redfish")
    async def versions() -> Response:
        return json_response({"v1": "/redfish/v1/"})

    @app.get("/redfish/v1")
    async def service_root() -> Response:
        """ServiceRoot (DSP0266 §7.1): open to all, links to everything else."""
        return json_response({
            "@odata.id": "/redfish/v1", "@odata.type": "#ServiceRoot.v1_20_0.ServiceRoot",
            "@odata.context": "/redfish/v1/$metadata#ServiceRoot.ServiceRoot",
            "Id": "RootService", "Name": "qemu-bmc Redfish service", "RedfishVersion": "1.20.0",
            "UUID": root_uuid, "Vendor": "qemu-bmc", "Product": "qemu-bmc",
            **{name: link(f"/redfish/v1/{name}") for name in ROOT_COLLECTIONS},
            "SessionService": link("/redfish/v1/SessionService"), "AccountService": link("/redfish/v1/AccountService"),
            "EventService": link("/redfish/v1/EventService"), "UpdateService": link("/redfish/v1/UpdateService"),
            "CertificateService": link("/redfish/v1/CertificateService"),
            "Tasks": link("/redfish/v1/TaskService"),
            "Links": {"Sessions": link("/redfish/v1/SessionService/Sessions")},
            "ProtocolFeaturesSupported": PROTOCOL_FEATURES,
        })

    @app.get("/redfish/v1/odata")
    async def odata_document() -> Response:
        """The OData service document (DSP0266 §8.4.1)."""
        return json_response({"@odata.context": "/redfish/v1/$metadata", "value": [
            {"name": "Service", "kind": "Singleton", "url": "/redfish/v1/"},
            *({"name": name, "kind": "Singleton", "url": f"/redfish/v1/{name}"} for name in ROOT_COLLECTIONS)]})

    @app.get("/redfish/v1/$metadata")
    async def metadata() -> Response:
        """The CSDL metadata document: references to the DMTF schemas the resources use (§8.4.2)."""
        references = "".join(
            f'  <edmx:Reference Uri="http://redfish.dmtf.org/schemas/v1/{schema}_v1.xml">\n'
            f'    <edmx:Include Namespace="{schema}"/>\n'
            + (f'    <edmx:Include Namespace="{schema}.v1_0_0"/>\n' if schema not in ("Resource",) else "")
            + "  </edmx:Reference>\n" for schema in SCHEMAS)
        document = ('<?xml version="1.0" encoding="UTF-8"?>\n'
                    '<edmx:Edmx xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx" Version="4.0">\n'
                    f"{references}"
                    '  <edmx:DataServices>\n'
                    '    <Schema xmlns="http://docs.oasis-open.org/odata/ns/edm" Namespace="Service">\n'
                    '      <EntityContainer Name="Service" Extends="ServiceRoot.v1_0_0.ServiceContainer"/>\n'
                    '    </Schema>\n'
                    '  </edmx:DataServices>\n'
                    '</edmx:Edmx>\n')
        return Response(document, media_type="application/xml")
