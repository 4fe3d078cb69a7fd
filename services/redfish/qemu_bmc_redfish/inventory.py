"""Processors, Memory, Storage, SimpleStorage and the EthernetInterfaces of each ComputerSystem,
from the machine service's hardware.get (what QEMU really has, or had when it last ran): what
Ironic's redfish inspection reads (sushy: processors, memory summary, storage and simple storage
sizes, NIC MACs).

Read-only, but for EthernetInterface ``InterfaceEnabled`` (PATCH, ConfigureComponents): the BMC
links the NIC down (QMP ``set_link``), for every QEMU the machine starts. Resources follow the
DMTF schemas Processor v1_22, Memory v1_23, Storage v1_21, StorageController v1_11, Drive v1_22,
Volume v1_10, SimpleStorage v1_3 and EthernetInterface v1_12 (DSP0268); the Storage of a
controller lists its StorageControllers both inline (as sushy reads them) and as the Controllers
collection, and each drive is also a Volume (no RAID: one volume per disk). The Volumes
collections, where volumes are created and deleted, are in ``volumes``."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

from fastapi import FastAPI, Request, Response
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import (
    Disk,
    Hardware,
    MemoryModule,
    Nic,
    NicUpdate,
    Processor,
    SystemView,
    Volume,
    VolumeList,
)

from .errors import RedfishError
from .resources import ENABLED, Redfish, check_if_match, collection, json_response, link, patch_body, writable

#: The Status of a summary whose parts are all working.
ROLLED_UP = {**ENABLED, "HealthRollup": "OK"}
#: What QEMU's RAM is to Redfish: no DDR generation of its own (MemoryDeviceType "Logical").
MEMORY_DEVICE_TYPE = "Logical"
#: The RAID types of a controller that makes volumes: each one new virtual disk (see ``volumes``).
VOLUME_RAID_TYPES = ["None", "RAID0"]


class Identified(Protocol):
    @property
    def id(self) -> str: ...


Item = TypeVar("Item", bound=Identified)


def present(body: dict[str, Any]) -> dict[str, Any]:
    """Without the properties that are not known (None)."""
    return {key: value for key, value in body.items() if value is not None}


def system_path(machine: str) -> str:
    return f"/redfish/v1/Systems/{machine}"


def system_properties(path: str, view: SystemView) -> dict[str, Any]:
    """What a ComputerSystem (at ``path``) says of its hardware: summaries, firmware, links."""
    hardware = view.hardware
    links = {name: link(f"{path}/{name}") for name in
             ("Processors", "Memory", "Storage", "SimpleStorage", "EthernetInterfaces")}
    if hardware is None:  # a machine service that does not tell its hardware
        return {"ProcessorSummary": {"Count": view.inventory.cpus},
                "MemorySummary": {"TotalSystemMemoryGiB": round(view.inventory.memory_mib / 1024, 3)},
                "EthernetInterfaces": links["EthernetInterfaces"]}
    processors = hardware.processors
    return {
        **present({"BiosVersion": hardware.bios_version, "SKU": hardware.sku}),
        "ProcessorSummary": {
            "Count": len(processors), "CoreCount": sum(cpu.cores for cpu in processors),
            "LogicalProcessorCount": sum(cpu.threads for cpu in processors),
            **({"Model": processors[0].model} if processors else {}), "Status": ROLLED_UP},
        "MemorySummary": {"TotalSystemMemoryGiB": round(sum(module.size_mib for module in hardware.memory) / 1024, 3),
                          "Status": ROLLED_UP},
        **links,
    }


# ---------------------------------------------------------------- resources

def processor(path: str, cpu: Processor) -> dict[str, Any]:
    return present({
        "@odata.id": path, "@odata.type": "#Processor.v1_22_0.Processor", "Id": f"CPU{cpu.socket}",
        "Name": f"Processor {cpu.socket}", "ProcessorType": "CPU", "Socket": f"Socket {cpu.socket}",
        "Model": cpu.model, "TotalCores": cpu.cores, "TotalEnabledCores": cpu.cores, "TotalThreads": cpu.threads,
        "ProcessorArchitecture": cpu.architecture, "InstructionSet": cpu.instruction_set,
        "Manufacturer": cpu.manufacturer, "Status": ENABLED})


def memory(path: str, module: MemoryModule) -> dict[str, Any]:
    name = f"{module.device} {module.id}" if module.device else \
        "Boot memory" + (f" of NUMA node {module.node}" if module.node is not None else "")
    return {"@odata.id": path, "@odata.type": "#Memory.v1_23_0.Memory", "Id": module.id, "Name": name,
            "CapacityMiB": module.size_mib, "MemoryDeviceType": MEMORY_DEVICE_TYPE, "MemoryType": module.kind,
            "Status": ENABLED}


def controllers_of(disks: list[Disk]) -> dict[str, list[Disk]]:
    """The storage controllers (by id) with their disks."""
    grouped: dict[str, list[Disk]] = {}
    for disk in disks:
        grouped.setdefault(disk.controller, []).append(disk)
    return grouped


def controller_properties(disks: list[Disk], listing: VolumeList) -> dict[str, Any]:
    """What a StorageController says, inline in its Storage or as a resource of its own: RAID
    types when volumes can be made on it (Ironic's RAID looks for them)."""
    controller = disks[0].controller
    return {"Name": f"{disks[0].controller_device} {controller}", "Model": disks[0].controller_device,
            "Status": ENABLED, "SupportedControllerProtocols": ["PCIe"],
            "SupportedRAIDTypes": [] if controller in listing.cannot_create else VOLUME_RAID_TYPES,
            "SupportedDeviceProtocols": sorted({disk.protocol for disk in disks if disk.protocol})}


def storage(path: str, disks: list[Disk], listing: VolumeList) -> dict[str, Any]:
    controller = disks[0].controller
    return {"@odata.id": path, "@odata.type": "#Storage.v1_21_0.Storage", "Id": controller,
            "Name": f"Storage of {controller}", "Status": ROLLED_UP,
            "StorageControllers": [{"@odata.id": f"{path}#/StorageControllers/0", "MemberId": "0",
                                    **controller_properties(disks, listing)}],
            "Controllers": link(f"{path}/Controllers"), "Volumes": link(f"{path}/Volumes"),
            "Drives": [link(f"{path}/Drives/{disk.id}") for disk in disks], "Drives@odata.count": len(disks)}


def drive(storage_path: str, disk: Disk) -> dict[str, Any]:
    return present({
        "@odata.id": f"{storage_path}/Drives/{disk.id}", "@odata.type": "#Drive.v1_22_0.Drive", "Id": disk.id,
        "Name": f"{disk.device} {disk.id}", "CapacityBytes": disk.capacity_bytes, "MediaType": disk.media,
        "Protocol": disk.protocol, "Model": disk.model, "SerialNumber": disk.serial, "Status": ENABLED,
        "Links": {"Volumes": [link(f"{storage_path}/Volumes/{disk.id}")], "Storage": link(storage_path)}})


def volume(storage_path: str, disk: Disk, made: Volume | None = None) -> dict[str, Any]:
    """The volume of a disk: one the BMC made (``made``) says its name and RAID type, and while
    the machine's next boot is to take it away, that it is being deleted."""
    deleting = made is not None and made.state == "deleting"
    return present({
        "@odata.id": f"{storage_path}/Volumes/{disk.id}", "@odata.type": "#Volume.v1_10_2.Volume", "Id": disk.id,
        "Name": made.name if made else f"Volume on {disk.id}", "CapacityBytes": disk.capacity_bytes,
        "RAIDType": made.raid_type if made else "None", "Status": ENABLED,
        "Operations": [{"Operation": "Delete", "PercentageComplete": 0}] if deleting else None,
        "Links": {"Drives": [link(f"{storage_path}/Drives/{disk.id}")]}})


def simple_storage(path: str, storage_path: str, disks: list[Disk]) -> dict[str, Any]:
    devices = [present({"Name": disk.id, "Model": disk.model, "CapacityBytes": disk.capacity_bytes, "Status": ENABLED})
               for disk in disks]
    return {"@odata.id": path, "@odata.type": "#SimpleStorage.v1_3_2.SimpleStorage", "Id": disks[0].controller,
            "Name": f"{disks[0].controller_device} {disks[0].controller}", "Status": ROLLED_UP, "Devices": devices,
            "Links": {"Storage": link(storage_path)}}


def link_status(nic: Nic) -> str:
    """NoLink: no network behind the NIC; LinkDown: the BMC set its link down."""
    if not nic.connected:
        return "NoLink"
    return "LinkUp" if nic.enabled else "LinkDown"


def ethernet_interface(path: str, nic: Nic) -> dict[str, Any]:
    """SpeedMbps is null for a NIC whose model has no fixed speed (virtio-net without ``speed``).
    The guest's own network settings (host name, addresses, name servers) are the guest's, which
    the BMC does not see: null and empty, as the OCP server profile wants them present."""
    return {"@odata.id": path, "@odata.type": "#EthernetInterface.v1_12_4.EthernetInterface", "Id": nic.id,
            "Name": f"{nic.device} {nic.id}", "MACAddress": nic.mac, "PermanentMACAddress": nic.mac,
            "InterfaceEnabled": nic.enabled, "LinkStatus": link_status(nic), "SpeedMbps": nic.speed_mbps,
            **writable("InterfaceEnabled"),
            "HostName": None, "FQDN": None, "NameServers": [], "IPv4Addresses": [],
            "Status": {"State": "Enabled" if nic.enabled else "Disabled", "Health": "OK"}}


def find(items: Sequence[Item], item_id: str, kind: str) -> Item:
    """The item with ``item_id``, else 404."""
    for item in items:
        if item.id == item_id:
            return item
    raise RedfishError(404, "ResourceNotFound", kind, item_id)


def interface_update(body: dict[str, Any], current: dict[str, Any]) -> bool:
    """The InterfaceEnabled a PATCH of an EthernetInterface asks for (400 for anything else)."""
    for key, value in body.items():
        if key != "InterfaceEnabled":
            raise RedfishError(400, "PropertyNotWritable" if key in current else "PropertyUnknown", key)
        if not isinstance(value, bool):
            raise RedfishError(400, "PropertyValueTypeError", value, key)
    return bool(body["InterfaceEnabled"])


# ---------------------------------------------------------------- what the machine service says

def storage_path(machine: str, controller: str) -> str:
    return f"{system_path(machine)}/Storage/{controller}"


async def machine_hardware(redfish: Redfish, machine: str) -> Hardware:
    return await bus.request(redfish.nc, machine, subjects.HARDWARE_GET, None, Hardware)


async def machine_volumes(redfish: Redfish, machine: str) -> VolumeList:
    return await bus.request(redfish.nc, machine, subjects.VOLUME_LIST, None, VolumeList)


def disks_of(hardware: Hardware, controller: str) -> list[Disk]:
    """The disks of a storage controller, else 404."""
    disks = controllers_of(hardware.disks).get(controller)
    if disks is None:
        raise RedfishError(404, "ResourceNotFound", "Storage", controller)
    return disks


async def storage_view(redfish: Redfish, request: Request, machine: str, controller: str,
                       privilege: str = "Login") -> tuple[list[Disk], VolumeList]:
    """A controller's disks (404 for no such controller), and the machine's volumes (where
    volumes can be made), for a caller with ``privilege`` on the machine."""
    await redfish.login(request, machine, privilege)
    found, listing = await asyncio.gather(machine_hardware(redfish, machine), machine_volumes(redfish, machine))
    return disks_of(found, controller), listing


def made_volume(listing: VolumeList, volume_id: str) -> Volume | None:
    """The volume the BMC made with this id (None: a disk of the machine's command line)."""
    return next((volume for volume in listing.volumes if volume.id == volume_id), None)


# ---------------------------------------------------------------- routes

def register(app: FastAPI, redfish: Redfish) -> None:
    async def hardware(request: Request, machine: str) -> Hardware:
        await redfish.login(request, machine)
        return await machine_hardware(redfish, machine)

    async def controller_disks(request: Request, machine: str, controller: str) -> list[Disk]:
        return disks_of(await hardware(request, machine), controller)

    @app.get("/redfish/v1/Systems/{machine}/Processors")
    async def processors(request: Request, machine: str) -> Response:
        path = f"{system_path(machine)}/Processors"
        return json_response(collection(path, "ProcessorCollection", "Processors", [
            f"{path}/CPU{cpu.socket}" for cpu in (await hardware(request, machine)).processors]))

    @app.get("/redfish/v1/Systems/{machine}/Processors/{processor_id}")
    async def processor_resource(request: Request, machine: str, processor_id: str) -> Response:
        cpu = next((cpu for cpu in (await hardware(request, machine)).processors
                    if f"CPU{cpu.socket}" == processor_id), None)
        if cpu is None:
            raise RedfishError(404, "ResourceNotFound", "Processor", processor_id)
        return json_response(processor(f"{system_path(machine)}/Processors/{processor_id}", cpu))

    @app.get("/redfish/v1/Systems/{machine}/Memory")
    async def memory_collection(request: Request, machine: str) -> Response:
        path = f"{system_path(machine)}/Memory"
        return json_response(collection(path, "MemoryCollection", "Memory", [
            f"{path}/{module.id}" for module in (await hardware(request, machine)).memory]))

    @app.get("/redfish/v1/Systems/{machine}/Memory/{memory_id}")
    async def memory_resource(request: Request, machine: str, memory_id: str) -> Response:
        module = find((await hardware(request, machine)).memory, memory_id, "Memory")
        return json_response(memory(f"{system_path(machine)}/Memory/{memory_id}", module))

    @app.get("/redfish/v1/Systems/{machine}/Storage")
    async def storage_collection(request: Request, machine: str) -> Response:
        grouped = controllers_of((await hardware(request, machine)).disks)
        return json_response(collection(f"{system_path(machine)}/Storage", "StorageCollection", "Storage",
                                        [storage_path(machine, controller) for controller in grouped]))

    @app.get("/redfish/v1/Systems/{machine}/Storage/{controller}")
    async def storage_resource(request: Request, machine: str, controller: str) -> Response:
        disks, listing = await storage_view(redfish, request, machine, controller)
        return json_response(storage(storage_path(machine, controller), disks, listing))

    @app.get("/redfish/v1/Systems/{machine}/Storage/{controller}/Controllers")
    async def storage_controllers(request: Request, machine: str, controller: str) -> Response:
        await controller_disks(request, machine, controller)
        path = f"{storage_path(machine, controller)}/Controllers"
        return json_response(collection(path, "StorageControllerCollection", "Storage controllers",
                                        [f"{path}/{controller}"]))

    @app.get("/redfish/v1/Systems/{machine}/Storage/{controller}/Controllers/{controller_id}")
    async def storage_controller(request: Request, machine: str, controller: str, controller_id: str) -> Response:
        disks, listing = await storage_view(redfish, request, machine, controller)
        if controller_id != controller:
            raise RedfishError(404, "ResourceNotFound", "StorageController", controller_id)
        return json_response({"@odata.id": f"{storage_path(machine, controller)}/Controllers/{controller}",
                              "@odata.type": "#StorageController.v1_11_0.StorageController", "Id": controller,
                              **controller_properties(disks, listing)})

    @app.get("/redfish/v1/Systems/{machine}/Storage/{controller}/Drives/{disk_id}")
    async def drive_resource(request: Request, machine: str, controller: str, disk_id: str) -> Response:
        disk = find(await controller_disks(request, machine, controller), disk_id, "Drive")
        return json_response(drive(storage_path(machine, controller), disk))

    @app.get("/redfish/v1/Systems/{machine}/SimpleStorage")
    async def simple_storage_collection(request: Request, machine: str) -> Response:
        path = f"{system_path(machine)}/SimpleStorage"
        grouped = controllers_of((await hardware(request, machine)).disks)
        return json_response(collection(path, "SimpleStorageCollection", "Simple storage",
                                        [f"{path}/{controller}" for controller in grouped]))

    @app.get("/redfish/v1/Systems/{machine}/SimpleStorage/{controller}")
    async def simple_storage_resource(request: Request, machine: str, controller: str) -> Response:
        disks = await controller_disks(request, machine, controller)
        return json_response(simple_storage(f"{system_path(machine)}/SimpleStorage/{controller}",
                                            storage_path(machine, controller), disks))

    @app.get("/redfish/v1/Systems/{machine}/EthernetInterfaces")
    async def ethernet_interfaces(request: Request, machine: str) -> Response:
        path = f"{system_path(machine)}/EthernetInterfaces"
        return json_response(collection(path, "EthernetInterfaceCollection", "Ethernet interfaces", [
            f"{path}/{nic.id}" for nic in (await hardware(request, machine)).nics]))

    @app.get("/redfish/v1/Systems/{machine}/EthernetInterfaces/{nic_id}")
    async def ethernet_interface_resource(request: Request, machine: str, nic_id: str) -> Response:
        nic = find((await hardware(request, machine)).nics, nic_id, "EthernetInterface")
        return json_response(ethernet_interface(f"{system_path(machine)}/EthernetInterfaces/{nic_id}", nic))

    @app.patch("/redfish/v1/Systems/{machine}/EthernetInterfaces/{nic_id}")
    async def patch_ethernet_interface(request: Request, machine: str, nic_id: str) -> Response:
        """InterfaceEnabled (ConfigureComponents): the NIC's link up or down; with If-Match, 412
        unless it is the current ETag."""
        await redfish.login(request, machine, "ConfigureComponents")
        body = await patch_body(request)
        path = f"{system_path(machine)}/EthernetInterfaces/{nic_id}"
        current = ethernet_interface(path, find((await hardware(request, machine)).nics, nic_id, "EthernetInterface"))
        check_if_match(request, current)
        enabled = interface_update(body, current)
        nic = await bus.request(redfish.nc, machine, subjects.NIC_SET, NicUpdate(id=nic_id, enabled=enabled), Nic)
        return json_response(ethernet_interface(path, nic))
