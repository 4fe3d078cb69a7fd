"""Volumes created and deleted over Redfish (OpenStack Ironic's RAID configuration) on real QEMU
machines: a volume POSTed to a virtio-blk, an AHCI or a SCSI controller is a new disk of QEMU's
from the machine's next power-on or reset on (and not before), with its Task pending until then
and completed by it; a deletion takes the disk and its image away at the next boot; the guest's
own reboot applies a pending change too; what cannot be made is refused, saying why; an attached
machine makes none. sushy (Ironic's library) creates and deletes a volume as Ironic does, and
DMTF's service validator checks the Tasks and the Storage resources.

sushy is synchronous: its calls run in a thread (``asyncio.to_thread``)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import redfish_data
import sushy
from conftest import free_tcp_port, serial_log, toml_list, wait_for, write_config
from guest_images import GuestImages
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import (
    BootOverride,
    BootOverrideUpdate,
    Hardware,
    MediaInsert,
    MediaStatus,
    PasswordSet,
    PowerStatus,
    User,
    UserAccessUpdate,
    UserUpdate,
)
from test_redfish import PASSWORD, USER, Service

MIB = 1 << 20
GIB = 1 << 30
BIN = Path(sys.executable).parent
TASKS = "/redfish/v1/TaskService/Tasks"


@pytest.fixture(scope="module")
def csdl() -> Path:
    """The DMTF CSDL bundle (tests/redfish_data.py), found before the machines start."""
    return redfish_data.directory("csdl")


def machine_argv(directory: Path, images: GuestImages) -> list[str]:
    """A q35 machine booting MARKER-HDD from disk0 on the AHCI controller ``sata`` (port 0), with a
    virtio-blk disk1, a SCSI disk2 on the LSI adapter ``scsi0`` and an NVMe disk (a controller that
    takes no new disk)."""
    qcow2, raw, nvme = directory / "disk1.qcow2", directory / "disk2.raw", directory / "nvme.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "200M"], check=True)
    for path in (raw, nvme):
        with path.open("wb") as image:
            image.truncate(100 * MIB)
    return ["-machine", "q35", "-accel", "tcg", "-m", "64", "-display", "none", "-nodefaults", "-vga", "none",
            "-device", "ich9-ahci,id=sata",
            "-drive", f"if=none,id=d0,file={images.disk},format=raw,snapshot=on",
            "-device", "ide-hd,drive=d0,bus=sata.0,id=disk0,bootindex=1",
            "-drive", f"if=none,id=d1,file={qcow2},format=qcow2", "-device", "virtio-blk-pci,drive=d1,id=disk1",
            "-device", "lsi53c895a,id=scsi0", "-drive", f"if=none,id=d2,file={raw},format=raw",
            "-device", "scsi-hd,drive=d2,bus=scsi0.0,id=disk2",
            "-drive", f"if=none,id=d3,file={nvme},format=raw", "-device", "nvme,drive=d3,serial=NV1,id=nvme0"]


def virtio_argv(directory: Path, name: str) -> list[str]:
    image = directory / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "10M"], check=True)
    return ["-machine", "q35", "-accel", "tcg", "-m", "64", "-display", "none", "-nodefaults",
            "-drive", f"if=none,id=v0,file={image},format=qcow2", "-device", "virtio-blk-pci,drive=v0,id=vda"]


@pytest.fixture
async def storage(nc, services, short_dir: Path, images: GuestImages) -> Service:
    """vm1 (1 GiB of volumes), roomy (a petabyte: the host's free space is what limits it) and
    none (volume_space = 0)."""
    port = free_tcp_port()
    config = write_config(short_dir, f'[redfish]\nlisten = "127.0.0.1:{port}"\n'
                                     f'[vm.vm1]\ncmd = {toml_list(machine_argv(short_dir, images))}\n'
                                     'volume_space = 1\n'
                                     f'[vm.roomy]\ncmd = {toml_list(virtio_argv(short_dir, "roomy"))}\n'
                                     'volume_space = 1048576\n'
                                     f'[vm.none]\ncmd = {toml_list(virtio_argv(short_dir, "none"))}\n'
                                     'volume_space = 0\n')
    await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD})
    await services("machine", config, "--stop-vms-on-exit")
    await services("redfish", config)
    return Service(nc, short_dir, f"https://127.0.0.1:{port}")


def volumes_path(controller: str, machine: str = "vm1") -> str:
    return f"/redfish/v1/Systems/{machine}/Storage/{controller}/Volumes"


def message_ids(response: httpx.Response) -> list[str]:
    return [info["MessageId"].rsplit(".", 1)[1] for info in response.json()["error"]["@Message.ExtendedInfo"]]


def members(body: dict[str, Any]) -> list[str]:
    return [member["@odata.id"].rsplit("/", 1)[1] for member in body["Members"]]


async def power(service: Service, machine: str = "vm1") -> PowerStatus:
    return await bus.request(service.nc, machine, subjects.POWER_GET, None, PowerStatus)


async def qemu_command_line(service: Service, machine: str = "vm1") -> str:
    pid = (await power(service, machine)).pid
    assert pid, "QEMU runs"
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


async def disks(service: Service, machine: str = "vm1") -> dict[str, tuple[str, int | None, str]]:
    """What the machine service reads of QEMU: disk → (controller, size, QEMU device)."""
    hardware = await bus.request(service.nc, machine, subjects.HARDWARE_GET, None, Hardware)
    return {disk.id: (disk.controller, disk.capacity_bytes, disk.device) for disk in hardware.disks}


def image(service: Service, volume: str, machine: str = "vm1") -> Path:
    return service.directory / "rt" / "vm" / machine / "volumes" / f"{volume}.qcow2"


async def create(client: httpx.AsyncClient, controller: str, body: dict[str, Any], machine: str = "vm1") -> str:
    """POST a volume: 202 with its pending Task and the monitor; the task's Id."""
    response = await client.post(volumes_path(controller, machine), json=body)
    assert response.status_code == 202, response.text
    task = response.json()
    assert (task["TaskState"], task["TaskStatus"], task["@Redfish.OperationApplyTime"]) == ("Pending", "OK", "OnReset")
    assert response.headers["Location"] == task["TaskMonitor"] == f"/redfish/v1/TaskService/TaskMonitors/{task['Id']}"
    return task["Id"]


async def task_state(client: httpx.AsyncClient, task_id: str) -> str:
    return (await client.get(f"{TASKS}/{task_id}")).json()["TaskState"]


async def test_volumes_made_and_deleted_at_the_next_power_on_or_reset(csdl: Path, storage: Service):
    async with storage.client() as client:
        # before the machine ever ran: where volumes can be made, and how
        sata = await client.get(volumes_path("sata"))
        assert sata.status_code == 200 and sata.headers["Allow"] == "GET, HEAD, POST", sata.headers
        assert sata.json()["@Redfish.OperationApplyTimeSupport"]["SupportedValues"] == ["OnReset"]
        assert members(sata.json()) == ["disk0"]
        controller = (await client.get("/redfish/v1/Systems/vm1/Storage/sata")).json()["StorageControllers"][0]
        assert controller["SupportedRAIDTypes"] == ["None", "RAID0"]
        nvme = await client.get(volumes_path("nvme0"))
        assert nvme.headers["Allow"] == "GET, HEAD" and "nvme" in nvme.json()["Description"]
        assert "@Redfish.OperationApplyTimeSupport" not in nvme.json()
        refused = await client.post(volumes_path("nvme0"), json={"CapacityBytes": 16 * MIB})
        assert refused.status_code == 405 and refused.headers["Allow"] == "GET, HEAD", refused.text
        # which SATA ports are free, the BMC learns from QEMU
        refused = await client.post(volumes_path("sata"), json={"CapacityBytes": 16 * MIB})
        assert refused.status_code == 409 and "power machine vm1 on once" in refused.text, refused.text

        # made while off: a virtio disk from the power-on
        first = await create(client, "disk1", {"CapacityBytes": 32 * MIB, "Name": "scratch"})
        monitor = await client.get(f"/redfish/v1/TaskService/TaskMonitors/{first}")
        assert monitor.status_code == 202 and monitor.json()["TaskState"] == "Pending"
        assert f"{TASKS}/{first}" in [member["@odata.id"] for member in (await client.get(TASKS)).json()["Members"]]
        assert members((await client.get(volumes_path("disk1"))).json()) == ["disk1"]
        assert image(storage, "qbmc-vol1").exists()
        reset = "/redfish/v1/Systems/vm1/Actions/ComputerSystem.Reset"
        assert (await client.post(reset, json={"ResetType": "On"})).status_code == 204
        assert await task_state(client, first) == "Completed"
        monitor = await client.get(f"/redfish/v1/TaskService/TaskMonitors/{first}")
        assert monitor.status_code == 201 and monitor.headers["Location"] == f"{volumes_path('disk1')}/qbmc-vol1"
        assert (monitor.json()["Name"], monitor.json()["CapacityBytes"]) == ("scratch", 32 * MIB)
        assert members((await client.get(volumes_path("disk1"))).json()) == ["disk1", "qbmc-vol1"]
        assert "virtio-blk-pci,drive=qbmc-vol1-drive,id=qbmc-vol1" in await qemu_command_line(storage)
        assert (await disks(storage))["qbmc-vol1"] == ("disk1", 32 * MIB, "virtio-blk-pci")
        drive = (await client.get("/redfish/v1/Systems/vm1/Storage/disk1/Drives/qbmc-vol1")).json()
        assert (drive["CapacityBytes"], drive["Protocol"], drive["SerialNumber"]) == (32 * MIB, "PCIe", "qbmc-vol1")
        await wait_for(lambda: "MARKER-HDD" in serial_log(storage.directory, "vm1"), timeout=60,
                       message="the guest booting from disk0 still")

        # made while on: a SATA and a SCSI disk at the next reset, not before
        sata_task = await create(client, "sata", {"CapacityBytes": 48 * MIB, "RAIDType": "RAID0", "Name": "data",
                                                  "@Redfish.OperationApplyTime": "OnReset"})
        scsi_task = await create(client, "scsi0", {"CapacityBytes": 16 * MIB, "RAIDType": "None",
                                                   "Links": {"Drives": []}, "Encrypted": False})
        before = (await power(storage)).pid
        assert members((await client.get(volumes_path("sata"))).json()) == ["disk0"]
        assert await task_state(client, sata_task) == "Pending"
        assert (await client.post(reset, json={"ResetType": "ForceRestart"})).status_code == 204
        assert (await power(storage)).pid != before  # QEMU launched again, with the new disks
        for task_id in (sata_task, scsi_task):
            task = (await client.get(f"{TASKS}/{task_id}")).json()
            assert (task["TaskState"], task["TaskStatus"], task["PercentComplete"]) == ("Completed", "OK", 100)
            assert task["Messages"][0]["MessageId"] == "TaskEvent.1.0.TaskCompletedOK"
        assert members((await client.get(volumes_path("sata"))).json()) == ["disk0", "qbmc-vol2"]
        volume = (await client.get(f"{volumes_path('sata')}/qbmc-vol2")).json()
        assert (volume["Name"], volume["RAIDType"], volume["CapacityBytes"]) == ("data", "RAID0", 48 * MIB)
        command_line = await qemu_command_line(storage)
        assert "ide-hd,drive=qbmc-vol2-drive,id=qbmc-vol2,serial=qbmc-vol2,bus=sata.1" in command_line
        assert "scsi-hd,drive=qbmc-vol3-drive,id=qbmc-vol3,serial=qbmc-vol3,bus=scsi0.0" in command_line
        found = await disks(storage)
        assert found["qbmc-vol2"] == ("sata", 48 * MIB, "ide-hd")
        assert found["qbmc-vol3"] == ("scsi0", 16 * MIB, "scsi-hd")
        drive = (await client.get("/redfish/v1/Systems/vm1/Storage/scsi0/Drives/qbmc-vol3")).json()
        assert drive["Protocol"] == "SAS"
        await wait_for(lambda: serial_log(storage.directory, "vm1").count("MARKER-HDD") == 2, timeout=60,
                       message="the guest booting after the reset")

        # a deletion: at the next boot, then the image goes
        volume_uri = f"{volumes_path('sata')}/qbmc-vol2"
        assert "DELETE" in (await client.get(volume_uri)).headers["Allow"]
        response = await client.request("DELETE", volume_uri, json={"@Redfish.OperationApplyTime": "OnReset"})
        assert response.status_code == 202 and response.json()["Payload"]["HttpOperation"] == "DELETE", response.text
        deletion = response.json()["Id"]
        pending = await client.get(volume_uri)
        assert pending.json()["Operations"] == [{"Operation": "Delete", "PercentageComplete": 0}]
        assert "DELETE" not in pending.headers["Allow"]
        again = await client.delete(volume_uri)
        assert again.status_code == 409 and "ResourceInUse" in message_ids(again)
        own = await client.delete(f"{volumes_path('sata')}/disk0")
        assert own.status_code == 405 and "ResourceCannotBeDeleted" in message_ids(own), own.text

        # the SATA ports: 6, disk0 on the first, qbmc-vol2 on the second until the next boot
        for _ in range(4):
            await create(client, "sata", {"CapacityBytes": MIB})
        full = await client.post(volumes_path("sata"), json={"CapacityBytes": MIB})
        assert full.status_code == 400 and message_ids(full) == ["ResourceExhaustion", "GeneralError"], full.text
        assert "no free SATA port" in full.text

        assert (await client.post(reset, json={"ResetType": "ForceOff"})).status_code == 204
        assert image(storage, "qbmc-vol2").exists() and await task_state(client, deletion) == "Pending"
        assert (await client.post(reset, json={"ResetType": "On"})).status_code == 204
        assert await task_state(client, deletion) == "Completed"
        assert not image(storage, "qbmc-vol2").exists()
        assert (await client.get(f"/redfish/v1/TaskService/TaskMonitors/{deletion}")).status_code == 204
        assert "qbmc-vol2" not in members((await client.get(volumes_path("sata"))).json())
        assert "qbmc-vol2" not in await qemu_command_line(storage)
        assert (await client.get(volume_uri)).status_code == 404

        # DMTF's service validator on the tasks (two left pending) and the storage resources
        await create(client, "disk1", {"CapacityBytes": MIB})
        assert (await client.delete(f"{volumes_path('scsi0')}/qbmc-vol3")).status_code == 202
    certificate = storage.directory / "rt" / "redfish" / "cert.pem"
    for start in ("/redfish/v1/TaskService", "/redfish/v1/Systems/vm1/Storage"):
        await service_validator(storage, start, certificate, csdl)


async def service_validator(service: Service, start: str, certificate: Path, csdl: Path) -> None:
    logs = service.directory / f"validator{start.replace('/', '-')}"
    env = {**os.environ, "REQUESTS_CA_BUNDLE": str(certificate), "SSL_CERT_FILE": str(certificate)}
    process = await asyncio.create_subprocess_exec(
        str(BIN / "rf_service_validator"), "--rhost", service.url, "--user", USER, "--password", PASSWORD,
        "--authtype", "Session", "--schema_directory", str(csdl), "--logdir", str(logs), "--payload", "Tree", start,
        env=env, cwd=service.directory, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output = (await asyncio.wait_for(process.communicate(), 600))[0].decode(errors="replace")
    counts = re.search(r"PASS\s*\|\s*WARN\s*\|\s*FAIL\s*\|\s*NOT TESTED\s*\|\s*\n[+-]+\n\|\s*(\d+)\s*\|\s*(\d+)\s*\|"
                       r"\s*(\d+)\s*\|\s*(\d+)", output)
    assert counts, output[-3000:]
    debug = "\n".join(path.read_text() for path in logs.rglob("RedfishServiceValidatorDebug*.log"))
    failures = sorted(set(re.findall(r" - ERROR - (FAIL - .*)", debug)))
    assert int(counts.group(3)) == 0 and int(counts.group(1)) > 20, "\n".join(failures) or output[-3000:]


async def test_what_cannot_be_made_is_refused(storage: Service):
    bodies = [({"CapacityBytes": GIB // 2, "RAIDType": "RAID1"}, ["PropertyValueNotInList", "GeneralError"]),
              ({"CapacityBytes": GIB // 2, "RAIDType": "RAID5"}, ["PropertyValueNotInList", "GeneralError"]),
              ({"CapacityBytes": GIB // 2, "VolumeType": "Mirrored"}, ["PropertyValueNotInList", "GeneralError"]),
              ({"CapacityBytes": GIB // 2, "Encrypted": True}, ["PropertyValueNotInList", "GeneralError"]),
              ({"CapacityBytes": GIB // 2, "Links": {"Drives": [{"@odata.id": f"{volumes_path('disk1')}/disk1"}]}},
               ["PropertyValueIncorrect", "GeneralError"]),
              ({"CapacityBytes": GIB // 2, "@Redfish.OperationApplyTime": "Immediate"},
               ["PropertyValueNotInList", "GeneralError"]),
              ({"RAIDType": "RAID0"}, ["CreateFailedMissingReqProperties"]),
              ({"CapacityBytes": "1G"}, ["PropertyValueTypeError"]),
              ({"CapacityBytes": 4096}, ["PropertyValueOutOfRange", "GeneralError"]),
              ({"CapacityBytes": MIB, "StripSizeBytes": 65536}, ["PropertyUnknown"]),
              ({"CapacityBytes": 2 * GIB}, ["ResourceExhaustion", "GeneralError"])]  # vm1 makes 1 GiB at most
    async with storage.client() as client:
        for body, expected in bodies:
            response = await client.post(volumes_path("disk1"), json=body)
            assert response.status_code == 400 and message_ids(response) == expected, (body, response.text)
        response = await client.post(volumes_path("disk1"), json={"CapacityBytes": GIB // 2, "RAIDType": "RAID1"})
        assert "no physical drives" in response.text
        response = await client.post(volumes_path("disk1"), json={"CapacityBytes": 2 * GIB})
        assert "volume_space" in response.text
        response = await client.post(volumes_path("disk1"), content=b"{not json")
        assert response.status_code == 400 and message_ids(response) == ["MalformedJSON"]
        assert (await client.post(volumes_path("nothing"), json={"CapacityBytes": MIB})).status_code == 404

        # the host's free space: a petabyte is more than this host has
        response = await client.post(volumes_path("vda", "roomy"), json={"CapacityBytes": 1 << 50})
        assert response.status_code == 400 and "free" in response.text, response.text
        for _ in range(8):
            await create(client, "vda", {"CapacityBytes": MIB}, "roomy")
        response = await client.post(volumes_path("vda", "roomy"), json={"CapacityBytes": MIB})
        assert response.status_code == 400 and "delete one first" in response.text, response.text

        collection = await client.get(volumes_path("vda", "none"))
        assert collection.headers["Allow"] == "GET, HEAD" and "volume_space = 0" in collection.json()["Description"]
        response = await client.post(volumes_path("vda", "none"), json={"CapacityBytes": MIB})
        assert response.status_code == 405 and message_ids(response) == ["OperationNotAllowed", "GeneralError"]
        assert not (storage.directory / "rt" / "vm" / "vm1" / "volumes").exists()  # nothing was made

    await bus.request(storage.nc, "vm1", subjects.USERS_SET, UserUpdate(slot=4, name="viewer", enabled=True), User)
    await bus.request(storage.nc, "vm1", subjects.USERS_PASSWORD, PasswordSet(slot=4, password="view-only-1"), User)
    await bus.request(storage.nc, "vm1", subjects.USERS_ACCESS,
                      UserAccessUpdate(slot=4, channel=1, privilege=2, ipmi_messaging=True), User)
    async with storage.client("viewer", "view-only-1") as viewer:
        assert (await viewer.get(volumes_path("disk1"))).status_code == 200
        response = await viewer.post(volumes_path("disk1"), json={"CapacityBytes": MIB})
        assert response.status_code == 403 and "InsufficientPrivilege" in message_ids(response)
        assert (await viewer.delete(f"{volumes_path('disk1')}/disk1")).status_code == 403
        assert (await viewer.get(TASKS)).json()["Members"] == []  # the viewer logs in to vm1 only


async def test_guest_reboot_applies_a_pending_volume(storage: Service, images: GuestImages):
    """An installer that reboots the machine itself (every few seconds, from the CD): its reboot
    is held and the machine service launches QEMU again, with the new disk; it stays On."""
    await bus.request(storage.nc, "vm1", subjects.MEDIA_INSERT, MediaInsert(image=str(images.installer_iso)),
                      MediaStatus)
    await bus.request(storage.nc, "vm1", subjects.BOOT_SET, BootOverrideUpdate(target="Cd", enabled="Continuous"),
                      BootOverride)
    async with storage.client() as client:
        assert (await client.post("/redfish/v1/Systems/vm1/Actions/ComputerSystem.Reset",
                                  json={"ResetType": "On"})).status_code == 204
        await wait_for(lambda: "MARKER-INSTALLER" in serial_log(storage.directory, "vm1"), timeout=60,
                       message="the installer")
        before = (await power(storage)).pid
        task_id = await create(client, "disk1", {"CapacityBytes": 8 * MIB})
        await wait_for(lambda: _completed(client, task_id), timeout=120, message="the guest's reboot applying it")
        status = await power(storage)
        assert status.state == "On" and status.pid != before
        assert "id=qbmc-vol1" in await qemu_command_line(storage)
        boots = serial_log(storage.directory, "vm1").count("MARKER-INSTALLER")
        await wait_for(lambda: serial_log(storage.directory, "vm1").count("MARKER-INSTALLER") > boots, timeout=60,
                       message="the installer running again in the new QEMU")


async def _completed(client: httpx.AsyncClient, task_id: str) -> bool:
    return await task_state(client, task_id) == "Completed"


async def test_a_change_qemu_refuses_fails_and_the_machine_boots_without_it(storage: Service):
    """The image of a pending volume gone before the boot (QEMU cannot open it): the task ends in
    Exception with QEMU's message, and the machine boots without the disk."""
    async with storage.client() as client:
        task_id = await create(client, "disk1", {"CapacityBytes": 8 * MIB})
        image(storage, "qbmc-vol1").unlink()
        assert (await client.post("/redfish/v1/Systems/vm1/Actions/ComputerSystem.Reset",
                                  json={"ResetType": "On"})).status_code == 204
        task = (await client.get(f"{TASKS}/{task_id}")).json()
        assert (task["TaskState"], task["TaskStatus"]) == ("Exception", "Critical")
        assert [message["MessageId"] for message in task["Messages"]] == ["TaskEvent.1.0.TaskAborted",
                                                                          "Base.1.22.GeneralError"]
        assert "QEMU did not start with this change" in task["Messages"][1]["Message"]
        monitor = await client.get(f"/redfish/v1/TaskService/TaskMonitors/{task_id}")
        assert monitor.status_code == 500 and "qbmc-vol1" in monitor.text
        assert (await power(storage)).state == "On" and "qbmc-vol1" not in await qemu_command_line(storage)
        assert members((await client.get(volumes_path("disk1"))).json()) == ["disk1"]
        await wait_for(lambda: "MARKER-HDD" in serial_log(storage.directory, "vm1"), timeout=60,
                       message="the guest booting without the volume")


def sushy_volumes(root: sushy.Sushy) -> Any:
    """disk1's volumes as Ironic reads them, afresh (sushy keeps what it read)."""
    system = root.get_system("/redfish/v1/Systems/vm1")
    return system.storage.get_member("/redfish/v1/Systems/vm1/Storage/disk1").volumes


def sushy_sizes(root: sushy.Sushy) -> list[int]:
    return sushy_volumes(root).volumes_sizes_bytes


async def test_sushy_creates_and_deletes_a_volume_as_ironic_does(storage: Service):
    call = asyncio.to_thread
    root = await call(sushy.Sushy, storage.url, verify=False, auth=sushy.auth.BasicAuth(USER, PASSWORD))
    system = await call(root.get_system, "/redfish/v1/Systems/vm1")
    controller = (await call(system.storage.get_member, "/redfish/v1/Systems/vm1/Storage/disk1")).storage_controllers[0]
    assert sushy.RAIDType.RAID0 in controller.raid_types  # Ironic skips controllers without RAID types
    volumes = await call(sushy_volumes, root)
    assert sushy.APPLY_TIME_ON_RESET in volumes.operation_apply_time_support.mapped_supported_values
    monitor = await call(volumes.create, {"CapacityBytes": 64 * MIB, "RAIDType": "RAID0", "Name": "root"},
                         apply_time=sushy.APPLY_TIME_ON_RESET)
    assert monitor.is_processing and monitor.task.task_state == sushy.TASK_STATE_PENDING
    assert await call(sushy_sizes, root) == [200 * MIB]  # not before the reset

    await call(system.reset_system, sushy.RESET_FORCE_RESTART)  # off: powers it on
    assert not await call(lambda: monitor.check_is_processing)
    task = await call(monitor.get_task)
    assert (task.task_state, task.task_status) == (sushy.TASK_STATE_COMPLETED, sushy.HEALTH_OK)
    assert await call(sushy_sizes, root) == [64 * MIB, 200 * MIB]
    made = await call((await call(sushy_volumes, root)).get_member, f"{volumes_path('disk1')}/qbmc-vol1")
    assert (made.name, made.raid_type, made.capacity_bytes) == ("root", sushy.RAIDType.RAID0, 64 * MIB)

    monitor = await call(made.delete, apply_time=sushy.APPLY_TIME_ON_RESET)
    assert monitor.is_processing
    await call(system.reset_system, sushy.RESET_FORCE_RESTART)
    assert not await call(lambda: monitor.check_is_processing)
    assert (await call(monitor.get_task)).task_state == sushy.TASK_STATE_COMPLETED
    assert await call(sushy_sizes, root) == [200 * MIB]


async def test_attached_machine_makes_no_volumes(nc, services, short_dir: Path, images: GuestImages):
    qmp = short_dir / "attached-qmp.sock"
    qemu = subprocess.Popen(["qemu-system-x86_64", *images.qemu_args(nic=False), "-S",
                             "-qmp", f"unix:{qmp},server=on,wait=off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port = free_tcp_port()
        config = write_config(short_dir, f'[redfish]\nlisten = "127.0.0.1:{port}"\n[vm.a1]\nqmp = "{qmp}"\n')
        await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD})
        await services("machine", config)
        await services("redfish", config)
        attached = Service(nc, short_dir, f"https://127.0.0.1:{port}")
        await wait_for(lambda: _connected(attached), timeout=30, message="the attached QEMU")
        async with attached.client() as client:
            storages = (await client.get("/redfish/v1/Systems/a1/Storage")).json()["Members"]
            assert storages, "the attached QEMU's disk"
            path = storages[0]["@odata.id"]
            assert (await client.get(path)).json()["StorageControllers"][0]["SupportedRAIDTypes"] == []
            collection = await client.get(f"{path}/Volumes")
            assert collection.headers["Allow"] == "GET, HEAD"
            assert "@Redfish.OperationApplyTimeSupport" not in collection.json()
            assert "attached" in collection.json()["Description"]
            response = await client.post(f"{path}/Volumes", json={"CapacityBytes": MIB})
            assert response.status_code == 405 and "does not launch" in response.text
    finally:
        qemu.kill()
        qemu.wait()


async def _connected(service: Service) -> bool:
    return (await power(service, "a1")).run_state != "disconnected"
