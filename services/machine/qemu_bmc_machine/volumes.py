"""The disks the BMC creates for a managed machine: Redfish Volumes POSTed to one of its storage
controllers, and deleted again (``volume.create``, ``volume.delete``, ``volume.list``).

A real storage controller makes a volume of its drives; a VM has no drives to make one of, so a
volume here is a new virtual disk: a qcow2 image (``qemu-img create``) in the machine's runtime
directory (``volumes/<id>.qcow2``) that QEMU gets as a disk on the controller it was made on:
another virtio-blk device beside a virtio-blk one (shown as that controller's, see ``place``), a
free port of an AHCI controller (``ide-hd``) or a target of a SCSI host adapter (``scsi-hd``).
It is one disk: RAIDType None, or RAID0 of that one disk.

The change takes effect at the machine's next boot, as a real controller's configuration job
does (DSP0266 "Operation apply time": OnReset is the one apply time offered): the machine's launch
profile carries its volumes, so its next BMC reset or power-on, or the guest's own reboot (held
while the profile differs), launches QEMU again with them. A deletion takes the disk away at the
next boot and then removes its image. Each creation and deletion is a task, Pending until the
boot that applies it, then Completed; when QEMU does not start with the change, the task ends in
Exception with QEMU's message, and the machine boots without it.

Where a new AHCI or SCSI disk can go is read from QEMU (QOM: the controller's buses and the
devices on them) whenever it runs, and kept for the command line it ran with: a disk never goes
on a port one of the operator's devices holds, wherever QEMU put it. The volumes, the last tasks
and that layout are kept in ``volumes.json``: a pending task outlives a restart of the machine
service (DSP0266 asks that of scheduled tasks)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec
from qemu_bmc_shared import launcher
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.messages import Disk, Volume, VolumeCreate, VolumeDelete, VolumeList, VolumeTask

from .command_line import SCSI_CONTROLLERS
from .hardware import qom, short_id

if TYPE_CHECKING:
    from .machine import Machine

log = logging.getLogger(__name__)

VOLUME_PREFIX = "qbmc-vol"
GIB = 1 << 30
SECTOR = 512
MIN_BYTES = 1 << 20
MAX_VOLUMES = 8
"""Volumes the BMC keeps for one machine at most."""
KEPT_TASKS = 32
"""Finished tasks kept per machine (the oldest go first: TaskService CompletedTaskOverWritePolicy Oldest)."""
QEMU_IMG_TIMEOUT = 60.0
#: Targets of a SCSI host adapter's bus that can hold a disk (QEMU's, less the adapter's own id).
SCSI_TARGETS = {"virtio-scsi-pci": 256, "lsi53c895a": 7, "lsi53c810": 7, "am53c974": 7, "dc390": 7,
                "mptsas1068": 8, "megasas": 64, "megasas-gen2": 64, "pvscsi": 64}


class Layout(msgspec.Struct):
    """Where QEMU put the devices of the machine's command line on its AHCI and SCSI controllers:
    controller → bus → how many of them are on it (the BMC's own disks not counted)."""

    key: str
    """The hardware key (command line and identity) of the QEMU it was read from."""
    buses: dict[str, dict[str, int]]


class Saved(msgspec.Struct):
    volumes: list[Volume] = []
    tasks: list[VolumeTask] = []
    next_volume: int = 1
    next_task: int = 1
    layout: Layout | None = None


def new_device(controller_device: str) -> str | None:
    """The QEMU device a new disk on a controller of this type is (None: it takes none)."""
    if controller_device.startswith("virtio-blk"):
        return "virtio-blk-pci"
    if "ahci" in controller_device:
        return "ide-hd"
    return "scsi-hd" if controller_device in SCSI_CONTROLLERS else None


def size(count: int) -> str:
    return f"{count / GIB:.3g} GiB"


class Volumes:
    """One machine's volumes and volume tasks."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self._path = machine.files.directory / launcher.VOLUMES_FILE
        self._saved = self._load()
        self._lock = asyncio.Lock()

    def _load(self) -> Saved:
        try:
            return msgspec.json.decode(self._path.read_bytes(), type=Saved)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return Saved()

    def _save(self) -> None:
        saved = self._saved
        finished = [task.number for task in saved.tasks if task.state != "Pending"]
        dropped = set(finished[:-KEPT_TASKS])
        saved.tasks = [task for task in saved.tasks if task.number not in dropped]
        temporary = self._path.with_suffix(".tmp")
        temporary.write_bytes(msgspec.json.encode(saved))
        temporary.replace(self._path)

    def image(self, volume_id: str) -> Path:
        return launcher.volume_image(self.machine.files, volume_id)

    # ------------------------------------------------------------------ what QEMU gets

    def next_disks(self) -> tuple[launcher.VolumeDisk, ...]:
        """The disks of the machine's next boot."""
        return launcher.volume_disks(self.machine.files, self._saved.volumes)

    def place(self, disks: list[Disk]) -> list[Disk]:
        """The disks QEMU has, a virtio-blk volume as a disk of the controller it was made on
        (QEMU has it as a PCI device of its own: its own controller)."""
        made_on = {volume.id: volume.controller for volume in self._saved.volumes if volume.bus is None}
        return [msgspec.structs.replace(disk, controller=made_on[disk.id]) if disk.id in made_on else disk
                for disk in disks]

    def applied(self, profile: launcher.LaunchProfile) -> None:
        """QEMU runs with ``profile``: the pending tasks it carries out are done."""
        self._end_tasks(profile, "Completed")

    def launch_failed(self, profile: launcher.LaunchProfile, reason: str) -> bool:
        """QEMU did not start with ``profile``: the pending changes it carried fail. True when there
        were any: the machine can then boot without them."""
        return self._end_tasks(profile, "Exception", f"QEMU did not start with this change, the machine booted "
                                                     f"without it: {reason}")

    def _end_tasks(self, profile: launcher.LaunchProfile, state: Literal["Completed", "Exception"],
                   message: str = "") -> bool:
        """End the pending tasks whose change ``profile`` carries: Completed, a new volume is
        attached and a deleted one removed with its image; Exception, the other way round."""
        attached = {disk.id for disk in profile.volumes}
        ended = False
        for task, volume in self._pending():
            creates = task.operation == "create"
            if (task.volume in attached) != creates:
                continue
            if (state == "Completed") == creates:
                volume.state = "attached"
            else:
                self._remove(volume)
            task.state, task.finished, task.message = state, time.time(), message
            ended = True
        if ended:
            self._save()
        return ended

    def _pending(self) -> list[tuple[VolumeTask, Volume]]:
        volumes = {volume.id: volume for volume in self._saved.volumes}
        return [(task, volumes[task.volume]) for task in self._saved.tasks
                if task.state == "Pending" and task.volume in volumes]

    def _remove(self, volume: Volume) -> None:
        self._saved.volumes.remove(volume)
        self.image(volume.id).unlink(missing_ok=True)

    # ------------------------------------------------------------------ requests

    async def listing(self) -> VolumeList:
        controllers = {disk.controller: disk.controller_device for disk in (await self.machine.hardware.read()).disks}
        refused = {controller: reason for controller, device in controllers.items()
                   if (reason := self._refusal(device)) is not None}
        return VolumeList(volumes=list(self._saved.volumes), tasks=list(self._saved.tasks), cannot_create=refused)

    def _refusal(self, controller_device: str) -> str | None:
        """Why no volume can be made on a controller of this type (None: one can)."""
        vm = self.machine.vm
        if vm.mode != "managed":
            return (f"machine {vm.name} is attached to a QEMU that qemu-bmc does not launch: the BMC cannot give it "
                    "new disks")
        if vm.volume_space_gib <= 0:
            return f"the BMC makes no volumes for machine {vm.name} ([vm.{vm.name}] volume_space = 0)"
        if new_device(controller_device) is None:
            return (f"a {controller_device} controller takes no new disk here (volumes are made on virtio-blk, AHCI "
                    "and SCSI controllers)")
        return None

    async def create(self, request: VolumeCreate) -> VolumeTask:
        """A new volume, given to the machine at its next boot."""
        name = self.machine.name
        async with self._lock:
            hardware = await self.machine.hardware.read()
            disks = [disk for disk in hardware.disks if disk.controller == request.controller]
            if not disks:
                raise BusError("not_found", f"machine {name} has no storage controller {request.controller!r}")
            controller_device = disks[0].controller_device
            device, refusal = new_device(controller_device), self._refusal(controller_device)
            if device is None or refusal is not None:
                raise BusError("invalid_state", str(refusal))
            capacity = -(-request.capacity_bytes // SECTOR) * SECTOR
            self._check_space(capacity)
            bus = await self._free_bus(request.controller, controller_device, device)
            number = self._saved.next_volume
            volume = Volume(id=f"{VOLUME_PREFIX}{number}", controller=request.controller, capacity_bytes=capacity,
                            raid_type=request.raid_type, name=request.name or f"Volume {number}", state="creating",
                            device=device, bus=bus)
            await self._make_image(volume)
            self._saved.next_volume = number + 1
            self._saved.volumes.append(volume)
            task = self._new_task("create", volume)
        log.info("%s: volume %s (%s) made on %s, for the next boot", name, volume.id, size(capacity), volume.controller)
        await self.machine.launch_changed()
        return task

    async def delete(self, request: VolumeDelete) -> VolumeTask:
        """The volume goes at the machine's next boot, then its image."""
        name = self.machine.name
        async with self._lock:
            volume = next((volume for volume in self._saved.volumes if volume.id == request.id), None)
            if volume is None:
                raise BusError("not_found", f"machine {name} has no volume {request.id!r} that the BMC made (the disks "
                               "of its command line cannot be deleted)")
            if volume.state != "attached":
                raise BusError("invalid_state", f"volume {volume.id} of machine {name} is "
                               f"{'not on the machine yet' if volume.state == 'creating' else 'being deleted already'}"
                               ": that change waits for the machine's next boot")
            volume.state = "deleting"
            task = self._new_task("delete", volume)
        log.info("%s: volume %s goes at the next boot", name, volume.id)
        await self.machine.launch_changed()
        return task

    def _new_task(self, operation: Literal["create", "delete"], volume: Volume) -> VolumeTask:
        task = VolumeTask(number=self._saved.next_task, operation=operation, volume=volume.id,
                          controller=volume.controller, state="Pending", requested=time.time())
        self._saved.next_task += 1
        self._saved.tasks.append(task)
        self._save()
        return task

    def _check_space(self, capacity: int) -> None:
        """At most MAX_VOLUMES volumes of at least MIN_BYTES, within the machine's volume space,
        and room on the host's file system for the image to grow to its size."""
        vm = self.machine.vm
        volumes = self._saved.volumes
        if len(volumes) >= MAX_VOLUMES:
            raise BusError("bad_request", f"machine {vm.name} has {MAX_VOLUMES} volumes the BMC made, the most it "
                           "keeps: delete one first")
        if capacity < MIN_BYTES:
            raise BusError("bad_request", f"a volume has at least {MIN_BYTES} bytes (1 MiB), not {capacity}")
        space, used = int(vm.volume_space_gib * GIB), sum(volume.capacity_bytes for volume in volumes)
        if used + capacity > space:
            raise BusError("bad_request", f"{size(capacity)} more is beyond the {size(space)} of volumes the BMC "
                           f"makes for machine {vm.name} ({size(used)} made; [vm.{vm.name}] volume_space)")
        free = shutil.disk_usage(self.machine.files.directory).free
        if capacity > free:
            raise BusError("bad_request", f"the host has {size(free)} free for the machine's runtime directory, less "
                           f"than the {size(capacity)} the volume's image can grow to")

    async def _make_image(self, volume: Volume) -> None:
        image = self.image(volume.id)
        image.parent.mkdir(mode=0o700, exist_ok=True)
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(volume.capacity_bytes)]
        try:
            process = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                           stdout=asyncio.subprocess.PIPE,
                                                           stderr=asyncio.subprocess.STDOUT)
            output, _ = await asyncio.wait_for(process.communicate(), QEMU_IMG_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            raise BusError("qemu_error", f"qemu-img (qemu-utils) could not make {image}: {exc}") from None
        if process.returncode != 0:
            image.unlink(missing_ok=True)
            raise BusError("qemu_error", f"qemu-img could not make {image}: {output.decode(errors='replace').strip()}")

    # ------------------------------------------------------------------ where new disks go

    async def _free_bus(self, controller: str, controller_device: str, device: str) -> str | None:
        """The bus a new disk of the controller goes on: a free AHCI port, a SCSI adapter's bus
        with a free target; None for a virtio-blk disk (a PCI device)."""
        if device == "virtio-blk-pci":
            return None
        buses = await self._buses(controller)
        if buses is None:
            raise BusError("invalid_state", f"the BMC learns which ports of controller {controller} are free when the "
                           f"machine's QEMU runs: power machine {self.machine.name} on once, then create the volume")
        mine = [volume.bus for volume in self._saved.volumes if volume.controller == controller]
        if device == "ide-hd":
            free = [bus for bus in sorted(buses, key=bus_number) if not buses[bus] and bus not in mine]
            if not free:
                raise BusError("bad_request", f"controller {controller} has no free SATA port: its {len(buses)} ports "
                               "hold disks already")
            return free[0]
        bus = min(buses, key=bus_number)
        targets = SCSI_TARGETS.get(controller_device, 7)
        if buses[bus] + len(mine) >= targets:
            raise BusError("bad_request", f"controller {controller} ({controller_device}) has no free SCSI target: "
                           f"its {targets} hold devices already")
        return bus

    async def _buses(self, controller: str) -> dict[str, int] | None:
        """Controller ``controller``'s buses and the operator's devices on each: read from QEMU when
        it runs, else as kept from the last QEMU with this command line (None: never seen)."""
        if self.machine._connected.is_set():
            with contextlib.suppress(BusError):  # QEMU went away meanwhile: what was kept
                await self.read_layout()
        layout = self._saved.layout
        if layout is None or layout.key != self.machine.hardware._key():
            return None
        return layout.buses.get(controller)

    async def connected(self) -> None:
        """A QEMU is connected: where its AHCI and SCSI controllers have room is read and kept."""
        if self.machine.vm.mode != "managed":
            return
        try:
            await self.read_layout()
        except BusError as exc:
            log.info("%s: the storage controllers' ports not read: %s", self.machine.name, exc.message)

    async def read_layout(self) -> None:
        """Read from the connected QEMU, and keep, how full the buses of each AHCI and SCSI
        controller are (QOM), each controller found through one of its disks."""
        execute = self.machine._execute
        wanted = {disk.id: disk.controller for disk in (await self.machine.hardware.read()).disks
                  if new_device(disk.controller_device) in ("ide-hd", "scsi-hd")}
        buses: dict[str, dict[str, int]] = {}
        for block in await execute("query-block"):
            qdev = block.get("qdev")
            path = qdev if not qdev or qdev.startswith("/") else f"/machine/peripheral/{qdev}"
            controller = wanted.get(short_id(path) or block.get("device", "")) if path else None
            if controller is None or controller in buses:
                continue
            bus = await qom(execute, path, "parent_bus")
            if bus:
                buses[controller] = await controller_buses(execute, str(bus).rpartition("/")[0])
        self._saved.layout = Layout(key=self.machine.hardware._key(), buses=buses)
        self._save()


def bus_number(bus: str) -> tuple[int, str]:
    """``sata.4`` → (4, ``sata.4``): buses in their order."""
    number = bus.rpartition(".")[2]
    return (int(number) if number.isdigit() else 0, bus)


async def controller_buses(execute: Any, controller_path: str) -> dict[str, int]:
    """A controller's IDE or SCSI buses (QOM ``child<IDE>``, ``child<SCSI>``), each with how many
    devices that are not the BMC's volumes are on it (its ``child[N]`` links)."""
    buses: dict[str, int] = {}
    for child in await execute("qom-list", {"path": controller_path}):
        if child["type"] not in ("child<IDE>", "child<SCSI>"):
            continue
        bus_path = f"{controller_path}/{child['name']}"
        devices = [await qom(execute, bus_path, link["name"]) for link in await execute("qom-list", {"path": bus_path})
                   if link["name"].startswith("child[")]
        buses[child["name"]] = sum(not (short_id(str(device)) or "").startswith(VOLUME_PREFIX) for device in devices)
    return buses
