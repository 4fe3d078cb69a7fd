"""The TaskService, its Tasks and their task monitors (TaskService v1_3, Task v1_7; DSP0266
"Asynchronous operations").

The tasks are the machines' volume creations and deletions (see ``volumes``), which wait for
the machine's next boot (OnReset). They are not kept here: each machine service keeps its own
(``volume.list``, in the machine's runtime directory, so a pending one outlives a restart), and
every replica of this service shows them from there, so all replicas agree. A task's Id is
``<machine>-<number>``; its task monitor is ``/redfish/v1/TaskService/TaskMonitors/<Id>``:

* while the task is pending, 202 Accepted with the Task (and the monitor as ``Location``);
* once it completed, the answer its operation would have had done at once: 201 Created with the
  new Volume for a creation, 204 No Content for a deletion;
* when the boot that was to apply it could not (QEMU refused the change), the error (500).

The machines' firmware updates (UpdateService SimpleUpdate, done within their request: see
``update_service``) are tasks too, completed ones, kept by each machine service as well
(``firmware.updates``): Id ``<machine>.firmware.<number>``, and their monitor answers as
SimpleUpdate did (200, Base Success).

Tasks are seen by whoever may log in to their machine; the oldest finished ones go first
(``CompletedTaskOverWritePolicy`` Oldest)."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request, Response
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import FirmwareUpdated, FirmwareUpdates, VolumeList, VolumeTask

from . import inventory
from .errors import RedfishError, message
from .resources import ENABLED, Redfish, collection, json_response, link

SERVICE_PATH = "/redfish/v1/TaskService"
TASKS_PATH = f"{SERVICE_PATH}/Tasks"
MONITORS_PATH = f"{SERVICE_PATH}/TaskMonitors"
TASK_REGISTRY = "TaskEvent.1.0"
#: The TaskEvent registry's messages a task says (our wording; the ids and arguments are the registry's).
TASK_MESSAGES = {"TaskCompletedOK": ("OK", "The task %1 has completed."),
                 "TaskAborted": ("Critical", "The task %1 ended with an error.")}
TASK_STATUS = {"Pending": "OK", "Completed": "OK", "Exception": "Critical"}


def task_id(machine: str, task: VolumeTask) -> str:
    return f"{machine}-{task.number}"


def monitor_path(machine: str, task: VolumeTask) -> str:
    return f"{MONITORS_PATH}/{task_id(machine, task)}"


def timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def task_message(message_id: str, task: str) -> dict[str, Any]:
    severity, text = TASK_MESSAGES[message_id]
    return {"@odata.type": "#Message.v1_1_2.Message", "MessageId": f"{TASK_REGISTRY}.{message_id}",
            "Message": text.replace("%1", task), "MessageArgs": [task], "MessageSeverity": severity,
            "Resolution": "None."}


def task_resource(machine: str, task: VolumeTask, listing: VolumeList | None = None) -> dict[str, Any]:
    """A volume task as a Task: what it does (Payload: the request that made it), its state, and
    once done, its end, the volume it made (while ``listing`` has it), or what went wrong."""
    identifier = task_id(machine, task)
    volumes = f"{inventory.storage_path(machine, task.controller)}/Volumes"
    creates = task.operation == "create"
    pending = task.state == "Pending"
    messages = [] if pending else [task_message("TaskCompletedOK" if task.state == "Completed" else "TaskAborted",
                                                identifier)]
    if task.message:
        messages.append(message("GeneralError", task.message))
    body: dict[str, Any] = {
        "@odata.id": f"{TASKS_PATH}/{identifier}", "@odata.type": "#Task.v1_7_4.Task", "Id": identifier,
        "Name": f"{'Create' if creates else 'Delete'} volume {task.volume} of {machine}",
        "TaskState": task.state, "TaskStatus": TASK_STATUS[task.state], "PercentComplete": 0 if pending else 100,
        "StartTime": timestamp(task.requested), "TaskMonitor": monitor_path(machine, task), "Messages": messages,
        "Payload": {"TargetUri": volumes if creates else f"{volumes}/{task.volume}",
                    "HttpOperation": "POST" if creates else "DELETE"}}
    if pending:
        body["@Redfish.OperationApplyTime"] = "OnReset"
    if task.finished is not None:
        body["EndTime"] = timestamp(task.finished)
    made = inventory.made_volume(listing, task.volume) if listing is not None else None
    if creates and task.state == "Completed" and made is not None:
        body["Links"] = {"CreatedResources": [link(f"{volumes}/{task.volume}")]}
    return body


def accepted(machine: str, task: VolumeTask) -> Response:
    """202 Accepted: the Task, and its monitor as ``Location`` (DSP0266 "Asynchronous operations")."""
    return json_response(task_resource(machine, task), 202, headers={"Location": monitor_path(machine, task)})


FIRMWARE_TASK = re.compile(r"([A-Za-z0-9][A-Za-z0-9_-]*)\.firmware\.(\d+)")
"""A firmware update's task Id (a machine name has no dot)."""


def firmware_task_path(machine: str, update: FirmwareUpdated) -> str:
    return f"{TASKS_PATH}/{machine}.firmware.{update.number}"


def firmware_task_resource(machine: str, update: FirmwareUpdated) -> dict[str, Any]:
    """A firmware update as the completed Task it is: what it installed, and from when it runs."""
    path = firmware_task_path(machine, update)
    identifier = path.rsplit("/", 1)[1]
    installed = "the configured firmware back" if update.restored else \
        " ".join(filter(None, (update.manufacturer, update.version))) or "the image"
    return {
        "@odata.id": path, "@odata.type": "#Task.v1_7_4.Task", "Id": identifier,
        "Name": f"Update the system firmware of {machine}",
        "Description": f"{update.image_uri}: {installed} for {update.mode} boot, "
                       + ("from the machine's next boot on" if update.next_boot else "from its next power-on"),
        "TaskState": "Completed", "TaskStatus": "OK", "PercentComplete": 100,
        "StartTime": timestamp(update.requested), "EndTime": timestamp(update.finished),
        "TaskMonitor": f"{MONITORS_PATH}/{identifier}", "Messages": [task_message("TaskCompletedOK", identifier)]}


def register(app: FastAPI, redfish: Redfish) -> None:
    async def firmware_updates(machine: str) -> list[FirmwareUpdated]:
        return (await bus.request(redfish.nc, machine, subjects.FIRMWARE_UPDATES, None, FirmwareUpdates)).updates

    async def find_firmware_task(request: Request, identifier: str) -> tuple[str, FirmwareUpdated] | None:
        """The machine and update of a firmware update's task Id (None for another Id)."""
        match = FIRMWARE_TASK.fullmatch(identifier)
        if match is None:
            return None
        machine, number = match.groups()
        if machine not in await redfish.machines.list():
            await redfish.login(request)
            raise RedfishError(404, "ResourceNotFound", "Task", identifier)
        await redfish.login(request, machine)
        update = next((update for update in await firmware_updates(machine) if update.number == int(number)), None)
        if update is None:
            raise RedfishError(404, "ResourceNotFound", "Task", identifier)
        return machine, update

    async def find_task(request: Request, identifier: str) -> tuple[str, VolumeTask, VolumeList]:
        """The machine and task of a task Id, and the machine's volumes, for a caller who may log
        in to that machine."""
        machine, _, number = identifier.rpartition("-")
        if not number.isdigit() or machine not in await redfish.machines.list():
            await redfish.login(request)
            raise RedfishError(404, "ResourceNotFound", "Task", identifier)
        await redfish.login(request, machine)
        listing = await inventory.machine_volumes(redfish, machine)
        task = next((task for task in listing.tasks if task.number == int(number)), None)
        if task is None:
            raise RedfishError(404, "ResourceNotFound", "Task", identifier)
        return machine, task, listing

    @app.get(SERVICE_PATH)
    async def task_service(request: Request) -> Response:
        await redfish.login(request)
        return json_response({
            "@odata.id": SERVICE_PATH, "@odata.type": "#TaskService.v1_3_0.TaskService", "Id": "TaskService",
            "Name": "Task service", "ServiceEnabled": True, "DateTime": timestamp(datetime.now(UTC).timestamp()),
            "CompletedTaskOverWritePolicy": "Oldest", "LifeCycleEventOnTaskStateChange": False, "Status": ENABLED,
            "Tasks": link(TASKS_PATH)})

    @app.get(TASKS_PATH)
    async def tasks(request: Request) -> Response:
        machines = await redfish.visible_machines(request)
        listings = await asyncio.gather(*(inventory.machine_volumes(redfish, machine) for machine in machines))
        updates = await asyncio.gather(*(firmware_updates(machine) for machine in machines))
        return json_response(collection(TASKS_PATH, "TaskCollection", "Tasks", [
            f"{TASKS_PATH}/{task_id(machine, task)}" for machine, listing in zip(machines, listings, strict=True)
            for task in listing.tasks] + [firmware_task_path(machine, update) for machine, done in
                                          zip(machines, updates, strict=True) for update in done]))

    @app.get(f"{TASKS_PATH}/{{identifier}}")
    async def task(request: Request, identifier: str) -> Response:
        firmware = await find_firmware_task(request, identifier)
        if firmware is not None:
            return json_response(firmware_task_resource(*firmware))
        return json_response(task_resource(*await find_task(request, identifier)))

    @app.get(f"{MONITORS_PATH}/{{identifier}}")
    async def task_monitor(request: Request, identifier: str) -> Response:
        if await find_firmware_task(request, identifier) is not None:
            return json_response({"@Message.ExtendedInfo": [message("Success")]})
        machine, task, listing = await find_task(request, identifier)
        if task.state == "Pending":
            return accepted(machine, task)
        if task.state == "Exception":
            raise RedfishError(500, "GeneralError", task.message)
        if task.operation == "delete":
            return Response(status_code=204)
        volume_path = f"{inventory.storage_path(machine, task.controller)}/Volumes/{task.volume}"
        hardware = await inventory.machine_hardware(redfish, machine)
        disk = next((disk for disk in hardware.disks if disk.id == task.volume), None)
        if disk is None:  # deleted since
            return Response(status_code=201, headers={"Location": volume_path})
        body = inventory.volume(inventory.storage_path(machine, task.controller), disk,
                                inventory.made_volume(listing, task.volume))
        return json_response(body, 201, headers={"Location": volume_path})
