"""The Volumes of a storage controller (VolumeCollection, Volume v1_10): a volume per disk of the
machine, and the volumes created and deleted here (ConfigureComponents), as OpenStack Ironic's
RAID configuration does (sushy ``VolumeCollection.create``, ``Volume.delete``).

A volume made here is one new virtual disk the machine service gives a managed machine on that
controller (its ``volumes`` module: a qcow2 image, a virtio-blk, SATA or SCSI disk), so RAIDType
None, or RAID0 of that one disk; nothing else, as a VM has no physical drives to mirror or stripe
with parity, and none to build it of (``Links/Drives`` empty). QEMU gets the disk, or loses it,
when it starts: at the machine's next reset or power-on, so the collection offers the one apply
time OnReset (``@Redfish.OperationApplyTimeSupport``, DSP0266 "Operation apply time"), and a
creation or deletion is answered 202 Accepted with a Task, which completes at that boot (see
``tasks``). The disks of the machine's command line cannot be deleted (405, ResourceCannotBeDeleted).

No volume can be made on a controller of an attached machine (qemu-bmc does not launch its
QEMU), of a machine whose ``volume_space`` is 0, or of a kind that takes no new disk (IDE, NVMe,
USB): its collection allows GET only and its Description says why."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.messages import VolumeCreate, VolumeDelete, VolumeTask

from . import tasks
from .errors import RedfishError, message
from .inventory import VOLUME_RAID_TYPES, find, made_volume, storage_path, storage_view, volume
from .resources import Redfish, collection, json_body, json_response

VOLUMES_PATH = "/redfish/v1/Systems/{machine}/Storage/{controller}/Volumes"
APPLY_TIME = "@Redfish.OperationApplyTime"
APPLY_TIME_SUPPORT = {"@odata.type": "#Settings.v1_4_0.OperationApplyTimeSupport", "SupportedValues": ["OnReset"]}
READ_ONLY = "GET, HEAD"
CREATE_PROPERTIES = {"CapacityBytes", "RAIDType", "Name", "Links", "VolumeType", "Encrypted", APPLY_TIME}
MIN_BYTES = 1 << 20
MAX_NAME = 64
CREATE_TIMEOUT = 60.0
"""Seconds the machine service has to make the image (qemu-img) and find the disk a place."""
ONE_DISK = ("a volume made here is one new virtual disk: a VM has no physical drives to mirror, stripe or protect "
            "with parity, so RAIDType is None, or RAID0 of that one disk")
AT_START = ("QEMU gets a new disk, or loses one, when it starts: at the machine's next reset or power-on "
            "(OnReset), the one apply time here")


def refused(status: int, message_id: str, *args: Any, why: str, headers: dict[str, str] | None = None) -> RedfishError:
    """An error with the reason it was refused as a second message."""
    return RedfishError(status, message_id, *args, headers=headers, extra=[message("GeneralError", why)])


def check_apply_time(body: dict[str, Any]) -> None:
    value = body.get(APPLY_TIME, "OnReset")
    if value != "OnReset":
        raise refused(400, "PropertyValueNotInList", value, APPLY_TIME, why=AT_START)


def create_request(body: dict[str, Any], controller: str) -> VolumeCreate:
    """The volume a POST asks for, checked (400 naming what is wrong)."""
    body = {key: value for key, value in body.items() if not key.startswith("@odata.")}
    unknown = next((key for key in body if key not in CREATE_PROPERTIES), None)
    if unknown is not None:
        raise RedfishError(400, "PropertyUnknown", unknown)
    check_apply_time(body)
    if "CapacityBytes" not in body:
        raise RedfishError(400, "CreateFailedMissingReqProperties", "CapacityBytes")
    capacity, raid_type, name = body["CapacityBytes"], body.get("RAIDType", "None"), body.get("Name", "")
    if not isinstance(capacity, int) or isinstance(capacity, bool):
        raise RedfishError(400, "PropertyValueTypeError", capacity, "CapacityBytes")
    if capacity < MIN_BYTES:
        raise refused(400, "PropertyValueOutOfRange", capacity, "CapacityBytes", why="a volume has at least 1 MiB")
    if raid_type not in VOLUME_RAID_TYPES:
        raise refused(400, "PropertyValueNotInList", raid_type, "RAIDType", why=ONE_DISK)
    volume_type = body.get("VolumeType", "NonRedundant")
    if volume_type != "NonRedundant":
        raise refused(400, "PropertyValueNotInList", volume_type, "VolumeType", why=ONE_DISK)
    if body.get("Encrypted", False) is not False:
        raise refused(400, "PropertyValueNotInList", body["Encrypted"], "Encrypted",
                      why="the BMC does not encrypt the disks it makes")
    if not isinstance(name, str):
        raise RedfishError(400, "PropertyValueTypeError", name, "Name")
    if len(name) > MAX_NAME:
        raise refused(400, "PropertyValueFormatError", name, "Name", why=f"a volume's name has {MAX_NAME} characters "
                      "at most")
    links = body.get("Links", {})
    if not isinstance(links, dict) or set(links) - {"Drives"} or links.get("Drives", []) != []:
        raise refused(400, "PropertyValueIncorrect", "Links", links, why="a new volume is not made of the machine's "
                      "drives (a VM's disks are image files already, none to spare): leave Links/Drives out or empty")
    return VolumeCreate(controller=controller, capacity_bytes=capacity, raid_type=raid_type, name=name)


async def delete_request(request: Request) -> None:
    """A DELETE may say when (``@Redfish.OperationApplyTime``), and nothing else."""
    if not (await request.body()).strip():
        return
    body = {key: value for key, value in (await json_body(request)).items() if not key.startswith("@odata.")}
    unknown = next((key for key in body if key != APPLY_TIME), None)
    if unknown is not None:
        raise RedfishError(400, "PropertyUnknown", unknown)
    check_apply_time(body)


def register(app: FastAPI, redfish: Redfish) -> None:
    @app.get(VOLUMES_PATH)
    async def volumes(request: Request, machine: str, controller: str) -> Response:
        """The controller's volumes; where volumes can be made, the apply times of a creation."""
        disks, listing = await storage_view(redfish, request, machine, controller)
        path = f"{storage_path(machine, controller)}/Volumes"
        body = collection(path, "VolumeCollection", "Volumes", [f"{path}/{disk.id}" for disk in disks])
        refusal = listing.cannot_create.get(controller)
        if refusal is None:
            body["@Redfish.OperationApplyTimeSupport"] = APPLY_TIME_SUPPORT
        else:
            body["Description"] = f"No volume can be created here: {refusal}."
        return json_response(body, headers={"Allow": READ_ONLY if refusal else f"{READ_ONLY}, POST"})

    @app.post(VOLUMES_PATH)
    async def create_volume(request: Request, machine: str, controller: str) -> Response:
        """A new volume at the machine's next reset or power-on: 202 with its Task (400 for what
        cannot be made, naming why; 405 where none can)."""
        _, listing = await storage_view(redfish, request, machine, controller, "ConfigureComponents")
        refusal = listing.cannot_create.get(controller)
        if refusal is not None:
            raise refused(405, "OperationNotAllowed", why=refusal, headers={"Allow": READ_ONLY})
        create = create_request(await json_body(request), controller)
        try:
            task = await bus.request(redfish.nc, machine, subjects.VOLUME_CREATE, create, VolumeTask,
                                     timeout=CREATE_TIMEOUT)
        except BusError as exc:
            if exc.error != "bad_request":
                raise
            raise refused(400, "ResourceExhaustion", storage_path(machine, controller), why=exc.message) from None
        return tasks.accepted(machine, task)

    @app.get(f"{VOLUMES_PATH}/{{volume_id}}")
    async def volume_resource(request: Request, machine: str, controller: str, volume_id: str) -> Response:
        disks, listing = await storage_view(redfish, request, machine, controller)
        disk = find(disks, volume_id, "Volume")
        made = made_volume(listing, volume_id)
        deletable = made is not None and made.state == "attached"
        return json_response(volume(storage_path(machine, controller), disk, made),
                             headers={"Allow": f"DELETE, {READ_ONLY}" if deletable else READ_ONLY})

    @app.delete(f"{VOLUMES_PATH}/{{volume_id}}")
    async def delete_volume(request: Request, machine: str, controller: str, volume_id: str) -> Response:
        """A volume the BMC made goes at the machine's next reset or power-on: 202 with its Task."""
        disks, listing = await storage_view(redfish, request, machine, controller, "ConfigureComponents")
        find(disks, volume_id, "Volume")
        made = made_volume(listing, volume_id)
        if made is None:
            raise refused(405, "ResourceCannotBeDeleted", headers={"Allow": READ_ONLY}, why=(
                "it is a disk of the machine's own command line; only volumes made here can be deleted"))
        if made.state != "attached":
            raise refused(409, "ResourceInUse", why=f"volume {volume_id} is being deleted already: it goes at the "
                          "machine's next reset or power-on")
        await delete_request(request)
        task = await bus.request(redfish.nc, machine, subjects.VOLUME_DELETE, VolumeDelete(id=volume_id), VolumeTask)
        return tasks.accepted(machine, task)
