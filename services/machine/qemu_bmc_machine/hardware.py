"""What a machine is made of, as QEMU has it: CPU sockets, memory, disks and NICs, for the
Redfish inventory (Processors, Memory, Storage, EthernetInterfaces).

Read over QMP once per QEMU instance and kept until a device is added or removed. The last read
is also kept in the runtime directory, keyed by a hash of the command line, so that a machine
that is off (as Ironic inspects it) shows what its QEMU had; a command line QEMU never ran with
is read as command_line reads it. The NIC links the BMC sets down (QMP ``set_link``) stay down
for the machine: they are set down again in every QEMU it starts, before the guest runs."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from qemu_bmc_shared import launcher
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.messages import Disk, Hardware, MemoryModule, Nic, NicUpdate, Processor

from . import command_line
from .boot import DEVICE_CONTAINERS
from .firmware import OVMF_MANUFACTURER, OVMF_VERSION, FirmwareImage, seabios_image

if TYPE_CHECKING:
    from .machine import Machine

log = logging.getLogger(__name__)

Execute = Callable[..., Awaitable[Any]]
MIB = 1 << 20
HARDWARE_FILE = "hardware.json"
LINKS_FILE = "links.json"
#: CPUID vendor → manufacturer.
VENDORS = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD", "HygonGenuine": "Hygon", "CentaurHauls": "Centaur",
           "  Shanghai  ": "Zhaoxin"}
MEMORY_KINDS = {"nvdimm": "NVDIMM_N", "virtio-pmem": "NVDIMM_N"}
#: ``info network``: ``nic0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56``
NIC_LINE = re.compile(r"(\S+): index=\d+,type=nic,model=([^,\s]+),macaddr=([0-9a-fA-F:]{17})")
#: ``info roms``: ``addr=00000000fffc0000 size=0x040000 mem=rom name="bios-256k.bin"``
BIOS_ROM = re.compile(r'addr=0*f[0-9a-f]{7} size=\S+ mem=rom name="([^"]+)"')


class Saved(msgspec.Struct):
    """The runtime directory's copy of the last hardware read from QEMU."""

    key: str
    hardware: Hardware


class HardwareInventory:
    """One machine's hardware (``hardware.get``) and the NIC links its BMC sets (``nic.set``)."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self._kept: Hardware | None = None
        self._kept_live = False
        """The kept hardware was read from the QEMU that is connected now."""
        self._generation = 0
        self._lock = asyncio.Lock()
        self._links: dict[str, bool] | None = None
        self._firmware: tuple[str, FirmwareImage | None] | None = None
        """(BIOS file, what it is) as last read."""
        self._uuid: str | None = None

    @property
    def _files(self) -> tuple[Path, Path]:
        directory = self.machine.files.directory
        return directory / HARDWARE_FILE, directory / LINKS_FILE

    def forget(self) -> None:
        """QEMU started, or a device came or went: read again at the next request."""
        self._generation += 1
        self._kept = self._uuid = None

    async def read(self) -> Hardware:
        """From the cache; else from QEMU when it is connected, else from the runtime directory or
        the command line."""
        live = self.machine._connected.is_set()
        kept = self._kept
        if kept is not None and (self._kept_live or not live):
            return kept
        async with self._lock:
            generation = self._generation
            if self._kept is not None and (self._kept_live or not live):
                return self._kept
            try:
                hardware = await self._read_qemu() if live else await self._read_offline()
            except BusError:
                if not live or self.machine._connected.is_set():
                    raise
                live, hardware = False, await self._read_offline()  # QEMU went away while it was read
            if generation == self._generation:
                self._kept, self._kept_live = hardware, live
            return hardware

    def known(self) -> bool:
        """The hardware and UUID of the QEMU connected last are kept (an attached QEMU whose QMP
        session is being made again is still that QEMU)."""
        return self._kept is not None and self._kept_live and self._uuid is not None

    async def uuid(self) -> str:
        """The UUID of the connected QEMU (``query-uuid``), asked once per QEMU instance."""
        if self._uuid is None:
            self._uuid = str((await self.machine._execute("query-uuid"))["UUID"])
        return self._uuid

    # ------------------------------------------------------------------ NIC links

    def _link_settings(self) -> dict[str, bool]:
        """MAC → link up, as the BMC set it (only NICs it was asked about)."""
        if self._links is None:
            try:
                self._links = msgspec.json.decode(self._files[1].read_bytes(), type=dict[str, bool])
            except (OSError, msgspec.DecodeError):
                self._links = {}
        return self._links

    def _with_links(self, nics: list[Nic]) -> list[Nic]:
        links = self._link_settings()
        return [msgspec.structs.replace(nic, enabled=links.get(nic.mac, True)) for nic in nics]

    async def connected(self) -> None:
        """A QEMU is connected, before the guest runs: the links the BMC set are set in it (down,
        or up again after a change made while it was not connected)."""
        links = self._link_settings()
        if not links:
            return
        try:
            for name, _, mac in await nic_names(self.machine._execute):
                if mac in links:
                    await self.machine._execute("set_link", {"name": name, "up": links[mac]})
        except BusError as exc:
            log.error("%s: could not set the NIC links: %s", self.machine.name, exc.message)

    async def set_nic(self, request: NicUpdate) -> Nic:
        """Link a NIC up or down: at once in a running QEMU, and for every QEMU the machine starts."""
        hardware = await self.read()
        nic = next((nic for nic in hardware.nics if nic.id == request.id), None)
        if nic is None:
            raise BusError("not_found", f"machine {self.machine.name}: no NIC {request.id!r} "
                           f"(it has {', '.join(nic.id for nic in hardware.nics) or 'none'})")
        if self.machine._connected.is_set():
            await self.machine._execute("set_link", {"name": nic.id, "up": request.enabled})
        links = self._link_settings()
        links[nic.mac] = request.enabled
        self._files[1].write_bytes(msgspec.json.encode(links))
        self._generation += 1  # a read under way has the links as they were: it is not kept
        if self._kept is not None:
            self._kept = msgspec.structs.replace(self._kept, nics=self._with_links(self._kept.nics))
        return msgspec.structs.replace(nic, enabled=request.enabled)

    # ------------------------------------------------------------------ from QEMU

    async def _read_qemu(self) -> Hardware:
        execute = self.machine._execute
        skip = {launcher.CD_DEVICE, self.machine.vm.media_device}
        roms = await execute("human-monitor-command", {"command-line": "info roms"})
        bios = BIOS_ROM.search(str(roms))
        machine_type = str(await execute("qom-get", {"path": "/machine", "property": "type"})).removesuffix("-machine")
        disks = self.machine.volumes.place(await read_disks(execute, skip))
        hardware = Hardware(machine=self.machine.name, processors=await read_processors(execute),
                            memory=await read_memory(execute), disks=disks,
                            nics=self._with_links(await read_nics(execute)),
                            sku=self._sku(machine_type), **await self._firmware_fields(bios.group(1) if bios else None))
        self._save(hardware)
        return hardware

    # ------------------------------------------------------------------ while QEMU is not running

    def _key(self) -> str:
        """What the machine's hardware depends on besides QEMU: its command line and identity."""
        identity = self.machine.vm.identity
        data = msgspec.json.encode([self.machine.vm.argv, dataclasses.asdict(identity) if identity else None])
        return hashlib.sha256(data).hexdigest()

    def _save(self, hardware: Hardware) -> None:
        path = self._files[0]
        with contextlib.suppress(OSError):
            temporary = path.with_suffix(".tmp")
            temporary.write_bytes(msgspec.json.encode(Saved(key=self._key(), hardware=hardware)))
            temporary.replace(path)

    async def _read_offline(self) -> Hardware:
        try:
            saved = msgspec.json.decode(self._files[0].read_bytes(), type=Saved)
            if saved.key == self._key():
                firmware = await self._firmware_fields(self._bios_file()) if self.machine.vm.mode == "managed" else {}
                return msgspec.structs.replace(saved.hardware, nics=self._with_links(saved.hardware.nics), **firmware)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            pass
        if self.machine.vm.mode != "managed":  # attach mode, never seen: nothing is known
            return Hardware(machine=self.machine.name, processors=[], memory=[], disks=[], nics=[],
                            **await self._firmware_fields(None))
        identity = self.machine.vm.identity
        described = await command_line.read(self.machine.vm.argv, identity.cpu_model if identity else None)
        return Hardware(machine=self.machine.name, processors=described.processors, memory=described.memory,
                        disks=described.disks, nics=self._with_links(described.nics),
                        sku=self._sku(described.machine_type), **await self._firmware_fields(self._bios_file()))

    # ------------------------------------------------------------------ firmware and SKU

    def _sku(self, machine_type: str | None) -> str | None:
        identity = self.machine.vm.identity
        return identity.sku if identity is not None and identity.sku else machine_type or None

    def _bios_file(self) -> str:
        """The BIOS file of the machine's next launch: an installed update, else the command line's."""
        configured = (value for option, value in command_line.options(self.machine.vm.argv) if option == "bios")
        return self.machine.system_firmware.images.get("Legacy") or next(configured, "bios-256k.bin")

    async def _firmware_fields(self, bios_file: str | None) -> dict[str, Any]:
        """The firmware's version and maker: a bare-metal identity's (what the guest's SMBIOS says),
        else OVMF's, else those of the BIOS image QEMU loads (found as QEMU finds it, in its data
        directories); and whether an update can replace it."""
        machine = self.machine
        fields: dict[str, Any] = {"bios_updateable": machine.system_firmware.updateable(machine.firmware)}
        identity = machine.vm.identity
        if identity is not None:
            return {**fields, "bios_version": identity.bios_version,
                    "bios_manufacturer": identity.bios_vendor or identity.vendor}
        if machine.firmware == "UEFI":
            return {**fields, "bios_version": OVMF_VERSION, "bios_manufacturer": OVMF_MANUFACTURER}
        if bios_file is None:
            return fields
        if self._firmware is None or self._firmware[0] != bios_file:
            argv = machine.vm.argv
            qemu = await command_line.qemu_binary(argv[0] if argv else "qemu-system-x86_64")
            path = command_line.find_firmware(bios_file, qemu.data_dirs)
            self._firmware = (bios_file, seabios_image(path) if path else None)
        image = self._firmware[1]
        return {**fields, "bios_version": image.version, "bios_manufacturer": image.manufacturer} if image else fields


# ---------------------------------------------------------------- QMP readers

async def qom(execute: Execute, path: str, name: str) -> Any:
    """A QOM property, None when the object has no such property."""
    try:
        return await execute("qom-get", {"path": path, "property": name})
    except BusError as exc:
        if exc.error != "qemu_error":
            raise
        return None


async def read_processors(execute: Execute) -> list[Processor]:
    """One Processor per socket with present CPUs (``query-cpus-fast``): its cores (distinct
    die/cluster/core ids), its threads (CPUs), the model-id and CPUID vendor of its first CPU."""
    sockets: dict[int, list[dict[str, Any]]] = {}
    for cpu in await execute("query-cpus-fast"):
        sockets.setdefault(cpu.get("props", {}).get("socket-id", 0), []).append(cpu)
    processors = []
    for socket, cpus in sorted(sockets.items()):
        first = cpus[0]["qom-path"]
        model = await qom(execute, first, "model-id") or \
            str(await qom(execute, first, "type") or "").rsplit("-", 2)[0] or "unknown"
        vendor = await qom(execute, first, "vendor")
        cores = {(cpu.get("props", {}).get("die-id"), cpu.get("props", {}).get("cluster-id"),
                  cpu.get("props", {}).get("core-id", cpu["cpu-index"])) for cpu in cpus}
        architecture, instruction_set = command_line.architecture(cpus[0].get("target", ""))
        processors.append(Processor(socket=socket, cores=len(cores), threads=len(cpus), model=str(model).strip(),
                                    architecture=architecture, instruction_set=instruction_set,
                                    manufacturer=VENDORS.get(vendor, vendor) if vendor else None))
    return processors


async def read_memory(execute: Execute) -> list[MemoryModule]:
    """The boot memory (one module per NUMA node, ``info numa``, when the nodes account for all of
    it) and each memory device; the sizes add up to ``query-memory-size-summary``."""
    summary = await execute("query-memory-size-summary")
    numa = str(await execute("human-monitor-command", {"command-line": "info numa"}))
    sizes = {int(node): int(size) for node, size in re.findall(r"node (\d+) size: (\d+) MB", numa)}
    plugged = {int(node): int(size) for node, size in re.findall(r"node (\d+) plugged: (\d+) MB", numa)}
    nodes = {node: size - plugged.get(node, 0) for node, size in sorted(sizes.items())}
    boot_mib = summary["base-memory"] // MIB
    if nodes and sum(nodes.values()) == boot_mib:
        modules = [MemoryModule(id=f"node{node}", size_mib=size, node=node) for node, size in nodes.items()]
    else:
        modules = [MemoryModule(id="ram", size_mib=boot_mib)]
    for index, device in enumerate(await execute("query-memory-devices")):
        data, kind = device.get("data", {}), device.get("type", "")
        if "size" not in data:
            continue
        modules.append(MemoryModule(id=data.get("id") or f"{kind}{index}", size_mib=data["size"] // MIB,
                                    kind=MEMORY_KINDS.get(kind, "DRAM"), device="pc-dimm" if kind == "dimm" else kind,
                                    node=data.get("node")))
    return modules


def short_id(path: str) -> str | None:
    """The qdev id of a device that has one (``/machine/peripheral/<id>``)."""
    container, _, name = path.rpartition("/")
    return name if container == "/machine/peripheral" else None


async def read_disks(execute: Execute, skip: set[str | None]) -> list[Disk]:
    """The block devices with a medium and a device (not pflash, CD drives or ``skip``), each with
    the controller it hangs on: its bus's owner, or itself when it sits on a PCI bus."""
    disks: list[Disk] = []
    controllers: dict[str, tuple[str, str]] = {}
    for block in await execute("query-block"):
        inserted, qdev = block.get("inserted"), block.get("qdev")
        if not inserted or not qdev or block.get("device", "").startswith("pflash"):
            continue
        path = qdev.removesuffix("/virtio-backend")
        if not path.startswith("/"):
            path = f"/machine/peripheral/{path}"
        device = str(await qom(execute, path, "type") or "")
        disk_id = short_id(path) or block.get("device") or f"disk{len(disks)}"
        if not device or device.endswith("-cd") or device == "floppy" or {disk_id, block.get("device")} & skip:
            continue
        bus = await qom(execute, path, "parent_bus")
        bus_type = await qom(execute, bus, "type") if bus else None
        owner = path if bus_type in (None, "PCI", "PCIE") else \
            str(bus).rpartition("/")[0].removesuffix("/virtio-backend")
        if owner not in controllers:
            owner_type = device if owner == path else str(await qom(execute, owner, "type"))
            owner_id = disk_id if owner == path else short_id(owner) or owner_type
            if any(owner_id == known for known, _ in controllers.values()):
                owner_id = f"{owner_id}.{len(controllers)}"
            controllers[owner] = (owner_id, owner_type)
        controller, controller_device = controllers[owner]
        serial = await qom(execute, path, "serial")
        model = await qom(execute, path, "model") or await qom(execute, path, "product")
        solid = await qom(execute, path, "rotation_rate") == 1 or device.startswith("nvme")
        disks.append(Disk(id=disk_id, device=device, capacity_bytes=inserted.get("image", {}).get("virtual-size"),
                          protocol=command_line.protocol(device, controller_device), controller=controller,
                          controller_device=controller_device, media="SSD" if solid else "HDD",
                          read_only=bool(inserted.get("ro")), model=command_line.disk_model(device, model),
                          serial=serial or None))
    return disks


async def nic_names(execute: Execute) -> list[tuple[str, str, str]]:
    """(network client name, device type, MAC) of every NIC (``info network``); the name is what
    ``set_link`` takes."""
    network = str(await execute("human-monitor-command", {"command-line": "info network"}))
    return [(name, model, mac.lower()) for name, model, mac in NIC_LINE.findall(network)]


async def read_nics(execute: Execute) -> list[Nic]:
    """The NICs the network layer knows, found as devices of their type (with a ``mac``)."""
    listed = await nic_names(execute)
    names = {mac: name for name, _, mac in listed}
    models = {model for _, model, _ in listed}
    nics = []
    for container in DEVICE_CONTAINERS:
        for child in await execute("qom-list", {"path": container}):
            device = child["type"][6:-1] if child["type"].startswith("child<") else ""
            if device not in models:
                continue
            path = f"{container}/{child['name']}"
            mac = str(await qom(execute, path, "mac")).lower()
            speed = await qom(execute, path, "speed") if device.startswith("virtio-net") else None
            nics.append(Nic(id=names.get(mac) or short_id(path) or f"{device}.{len(nics)}", mac=mac, device=device,
                            connected=bool(await qom(execute, path, "netdev")),
                            speed_mbps=command_line.nic_speed(device, speed)))
    return nics
