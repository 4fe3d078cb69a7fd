"""What a QEMU command line says of the machine's hardware, for a machine whose QEMU is not
running and never ran with this command line (otherwise the hardware of its last run is kept):
the ``-smp`` topology, ``-m`` and memory devices, the ``-cpu`` model, the disks of ``-drive``,
``-hda``, ``-blockdev`` and ``-device`` (with the image's size), the NICs of ``-device``, ``-nic``
and ``-net nic`` with their MACs, the machine type and the BIOS image.

It follows QEMU 7's own rules where they decide what the guest gets: the topology QEMU derives
from a partial ``-smp`` (cores preferred over sockets since machine types 6.2), the names of
drives without an id (``ide0-hd0``, ``virtio0``) and of NICs without one (``e1000.0``), the MACs
it gives NICs without one (52:54:00:12:34:56 onwards), the NIC it adds without ``-nodefaults``.
Models, machine aliases and firmware directories come from the QEMU binary itself (``-cpu help``,
``-machine help``, ``-L help``), asked once per binary."""

from __future__ import annotations

import asyncio
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from qemu_bmc_shared.messages import Disk, MemoryModule, Nic, Processor
from qemu_bmc_shared.qemu_options import option_fields, options

#: QEMU target → (Redfish ProcessorArchitecture, InstructionSet).
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "x86_64": ("x86", "x86-64"), "i386": ("x86", "x86"), "aarch64": ("ARM", "ARM-A64"), "arm": ("ARM", "ARM-A32"),
    "riscv64": ("RISC-V", "RV64"), "riscv32": ("RISC-V", "RV32"), "ppc64": ("Power", "PowerISA"),
    "ppc": ("Power", "PowerISA"), "mips64": ("MIPS", "MIPS64"), "mips64el": ("MIPS", "MIPS64"),
    "mips": ("MIPS", "MIPS32"), "mipsel": ("MIPS", "MIPS32")}
#: Link speed of the NIC models that have a fixed one (virtio-net: its ``speed`` property).
NIC_SPEEDS = {"e1000": 1000, "e1000-82544gc": 1000, "e1000-82545em": 1000, "e1000e": 1000, "igb": 1000,
              "rtl8139": 100, "vmxnet3": 10000}
NIC_DEVICES = {*NIC_SPEEDS, "virtio-net-pci", "virtio-net-pci-non-transitional", "virtio-net-device", "ne2k_pci",
               "pcnet", "i82550", "i82551", "i82557b", "i82558b", "i82559er", "tulip", "usb-net"}
DISK_DEVICES = {"ide-hd", "ide-drive", "scsi-hd", "scsi-block", "virtio-blk-pci", "virtio-blk-pci-non-transitional",
                "virtio-blk-device", "nvme", "nvme-ns", "usb-storage"}
SCSI_CONTROLLERS = {"virtio-scsi-pci", "lsi53c895a", "lsi53c810", "megasas", "megasas-gen2", "mptsas1068", "am53c974",
                    "dc390", "pvscsi"}
USB_CONTROLLERS = {"qemu-xhci", "nec-usb-xhci", "usb-ehci", "ich9-usb-ehci1", "piix3-usb-uhci", "piix4-usb-uhci",
                   "pci-ohci"}
MEMORY_DEVICES = {"pc-dimm": "DRAM", "nvdimm": "NVDIMM_N", "virtio-mem-pci": "DRAM", "virtio-pmem-pci": "NVDIMM_N"}
QCOW2_MAGIC = b"QFI\xfb"
FIRST_MAC = 0x525400123456
HOST_CPU_MODELS = ("host", "max")


def architecture(target: str) -> tuple[str | None, str | None]:
    return ARCHITECTURES.get(target, (None, None))


def disk_model(device: str, model: str | None) -> str | None:
    """The model the guest reads from a disk: its ``model`` (or ``product``) property, else the
    one QEMU's emulation answers (ATA IDENTIFY, SCSI INQUIRY, NVMe Identify). A virtio disk has
    none."""
    if model:
        return model
    if device.startswith(("ide-", "scsi-")):
        return "QEMU HARDDISK"
    return "QEMU NVMe Ctrl" if device.startswith("nvme") else None


def protocol(device: str, controller_device: str) -> str | None:
    """The Redfish Protocol of a drive: the bus the guest sees it on. IDE only counts as SATA
    behind an AHCI controller (Redfish has no parallel ATA); SCSI disks as SAS, the SCSI
    transport Redfish knows."""
    if device.startswith("ide-"):
        return "SATA" if "ahci" in controller_device else None
    if device.startswith("scsi-"):
        return "SAS"
    if device.startswith("virtio-blk"):
        return "PCIe" if device.endswith(("-pci", "-pci-non-transitional")) else None
    if device.startswith("nvme"):
        return "NVMe"
    if device.startswith("usb-"):
        return "USB"
    return None


def nic_speed(device: str, speed_property: int | None) -> int | None:
    if device.startswith("virtio-net"):
        return speed_property if speed_property and speed_property > 0 else None
    return NIC_SPEEDS.get(device)


def size_bytes(text: str) -> int | None:
    """A QEMU size: bytes, or with a k/M/G/T suffix (a bare ``-m`` number is MiB: the caller's)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)[bB]?", text.strip())
    if not match:
        return None
    factor = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[match.group(2).lower()]
    return int(float(match.group(1)) * factor)


def image_size(path: str, image_format: str | None) -> int | None:
    """The size a disk image gives the guest: a qcow2 image's virtual size (its header's size
    field, big-endian at offset 24), else (raw) the file's size; None when it cannot be read."""
    try:
        with open(path, "rb") as image:
            header = image.read(32)
            if image_format in (None, "qcow2") and header[:4] == QCOW2_MAGIC and len(header) == 32:
                return int(struct.unpack(">Q", header[24:32])[0])
            if image_format not in (None, "raw"):
                return None
            return image.seek(0, 2)
    except OSError:
        return None


# ---------------------------------------------------------------- what the QEMU binary knows

@dataclass
class QemuBinary:
    """What a QEMU binary says of itself (``-cpu help``, ``-machine help``, ``-L help``)."""

    cpu_models: dict[str, str] = field(default_factory=dict)
    """CPU model → its model-id (aliases resolved)."""
    machines: dict[str, str] = field(default_factory=dict)
    """Machine type alias → machine type; ``""`` → the default machine type."""
    data_dirs: list[Path] = field(default_factory=list)


_binaries: dict[str, QemuBinary] = {}


async def _help(binary: str, *argv: str) -> str:
    try:
        process = await asyncio.create_subprocess_exec(binary, *argv, stdin=asyncio.subprocess.DEVNULL,
                                                       stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.DEVNULL)
        output, _ = await asyncio.wait_for(process.communicate(), 10)
    except (OSError, TimeoutError):
        return ""
    return output.decode(errors="replace")


async def qemu_binary(binary: str) -> QemuBinary:
    known = _binaries.get(binary)
    if known is None:
        cpus, machines, dirs = await asyncio.gather(_help(binary, "-cpu", "help"), _help(binary, "-machine", "help"),
                                                    _help(binary, "-L", "help"))
        known = _binaries[binary] = QemuBinary(parse_cpu_models(cpus), parse_machines(machines),
                                               [Path(line.strip()) for line in dirs.splitlines() if line.strip()])
    return known


def parse_cpu_models(text: str) -> dict[str, str]:
    """``x86 Skylake-Server-v1  Intel Xeon Processor (Skylake)`` lines → model → model-id. An
    alias "configured by machine type" is taken as its first version; ``[feature notes]`` dropped."""
    described: dict[str, str] = {}
    aliases: dict[str, str] = {}
    for line in text.splitlines():
        match = re.match(r"\S+\s+(\S+)\s*(.*)$", line.strip())
        if not match or line.startswith("Available"):
            continue
        name, description = match.group(1), match.group(2).strip()
        alias = re.fullmatch(r"\(alias of (\S+)\)", description)
        if alias:
            aliases[name] = alias.group(1)
        elif description == "(alias configured by machine type)":
            aliases[name] = f"{name}-v1"
        elif description:
            described[name] = re.sub(r"\s*\[.*\]$", "", description)
    return {**described, **{name: described[target] for name, target in aliases.items() if target in described}}


def parse_machines(text: str) -> dict[str, str]:
    machines: dict[str, str] = {}
    for line in text.splitlines():
        name = line.split(" ", 1)[0]
        alias = re.search(r"\(alias of (\S+)\)", line)
        if alias:
            machines[name] = alias.group(1)
        if line.rstrip().endswith("(default)"):
            machines[""] = name
    return machines


def host_cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def seabios_version(path: Path) -> str | None:
    """The version string of a SeaBIOS image (what its SMBIOS type 0 tells the guest), e.g.
    ``1.16.2-debian-1.16.2-1`` or ``rel-1.16.3-0-ga6ed6b70``; None for another firmware."""
    try:
        image = path.read_bytes()
    except OSError:
        return None
    if b"SeaBIOS (version %s)" not in image:
        return None
    match = re.search(rb"\0((?:rel-)?\d+\.\d+(?:\.\d+)?-[\w.+~-]+|\d+\.\d+\.\d+)\0", image)
    return match.group(1).decode() if match else None


def find_firmware(name: str, data_dirs: list[Path]) -> Path | None:
    """A firmware file as QEMU finds it: a path, else by name in its data directories."""
    if "/" in name:
        return Path(name)
    return next((directory / name for directory in data_dirs if (directory / name).is_file()), None)


# ---------------------------------------------------------------- the command line

@dataclass
class CommandLineHardware:
    """The hardware one QEMU command line describes (see the module's docstring)."""

    processors: list[Processor]
    memory: list[MemoryModule]
    disks: list[Disk]
    nics: list[Nic]
    machine_type: str
    bios_file: str


async def read(argv: list[str], cpu_model: str | None = None) -> CommandLineHardware:
    """``argv``: the QEMU binary and its arguments; ``cpu_model``: the model-id set for every CPU
    (a bare-metal identity's)."""
    binary = argv[0] if argv else "qemu-system-x86_64"
    qemu = await qemu_binary(binary)
    pairs = options(argv)
    machine: dict[str, str] = {}
    for option, value in pairs:
        if option in ("machine", "M"):
            machine.update(option_fields(value, "type"))
    machine_type = machine.get("type", "")
    machine_type = qemu.machines.get(machine_type, machine_type) or qemu.machines.get("", "")
    reader = _Reader(pairs, machine_type, defaults="nodefaults" not in {arg.lstrip("-") for arg in argv})
    target = re.sub(r"^.*qemu-system-", "", Path(binary).name)
    bios = next((value for option, value in pairs if option == "bios"), "bios-256k.bin")
    return CommandLineHardware(processors=reader.processors(target, cpu_model, qemu.cpu_models), memory=reader.memory(),
                               disks=reader.disks(), nics=reader.nics(), machine_type=machine_type, bios_file=bios)


class _Reader:
    def __init__(self, pairs: list[tuple[str, str]], machine_type: str, defaults: bool) -> None:
        self.pairs = pairs
        self.q35 = "q35" in machine_type
        self.defaults = defaults
        self.devices = [option_fields(value, "driver") for option, value in pairs if option == "device"]
        self.objects = {fields.get("id", ""): fields for fields in
                        (option_fields(value, "qom-type") for option, value in pairs if option == "object")}

    def values(self, *names: str) -> list[str]:
        return [value for option, value in self.pairs if option in names]

    # -- processors

    def processors(self, target: str, cpu_model: str | None, models: dict[str, str]) -> list[Processor]:
        cores, threads, cpus = smp_topology(self.values("smp"))
        cpu = option_fields(self.values("cpu")[-1], "model") if self.values("cpu") else {"model": "qemu64"}
        name = cpu.get("model", "qemu64")
        model = cpu_model or cpu.get("model-id") or (host_cpu_model() if name in HOST_CPU_MODELS else None) \
            or models.get(name) or name
        arch, instruction_set = architecture(target)
        per_socket = cores * threads
        result = []
        for socket in range((cpus + per_socket - 1) // per_socket):
            present = min(per_socket, cpus - socket * per_socket)
            result.append(Processor(socket=socket, cores=(present + threads - 1) // threads, threads=present,
                                    model=model, architecture=arch, instruction_set=instruction_set))
        return result

    # -- memory

    def memory(self) -> list[MemoryModule]:
        boot_mib = configured_memory_mib(self.values("m"))
        nodes = []
        for value in self.values("numa"):
            fields = option_fields(value, "type")
            backend = self.objects.get(fields.get("memdev", ""), {})
            size = size_bytes(backend.get("size", "")) if fields.get("type") == "node" else None
            if size is not None:
                nodes.append(size >> 20)
        modules = [MemoryModule(id=f"node{index}", size_mib=size, node=index) for index, size in enumerate(nodes)] \
            if sum(nodes) == boot_mib else [MemoryModule(id="ram", size_mib=boot_mib)]
        for index, device in enumerate(self.devices):
            kind = MEMORY_DEVICES.get(device.get("driver", ""))
            backend = self.objects.get(device.get("memdev", ""), {})
            size = size_bytes(device.get("requested-size", backend.get("size", "")))
            if kind and size is not None:
                node = device.get("node", "0")  # QEMU's default
                modules.append(MemoryModule(id=device.get("id", f"{device['driver']}{index}"), size_mib=size >> 20,
                                            kind=kind, device=device["driver"].removesuffix("-pci"),
                                            node=int(node) if node.isdigit() else None))
        return modules

    # -- disks

    def disks(self) -> list[Disk]:
        drives = self.drives()
        blockdevs = {fields.get("node-name", ""): fields for fields in
                     (option_fields(value) for value in self.values("blockdev"))}
        disks = []
        for drive_id, drive in drives.items():  # the drives QEMU attaches itself (if=ide, virtio, scsi)
            device = {"ide": "ide-hd", "virtio": "virtio-blk-pci", "scsi": "scsi-hd"}.get(drive["if"])
            if device is not None and drive.get("media") != "cdrom":
                controller = (drive_id, device) if device == "virtio-blk-pci" else self.controller(device, None)
                disks.append(self.disk(drive_id, device, drive, {}, *controller))
        for index, device in enumerate(self.devices):
            driver = device.get("driver", "")
            backend = drives.get(device.get("drive", "")) or blockdev_drive(blockdevs, device.get("drive", ""))
            if driver not in DISK_DEVICES or backend is None or backend.get("media") == "cdrom":
                continue
            disk_id = device.get("id") or device.get("drive") or f"disk{index}"
            on_bus = driver == "nvme-ns" or driver.startswith(("ide-", "scsi-", "usb-"))
            controller = self.controller(driver, device.get("bus")) if on_bus else (disk_id, driver)
            disks.append(self.disk(disk_id, driver, backend, device, *controller))
        return disks

    def controller(self, driver: str, bus: str | None) -> tuple[str, str]:
        """(id, device type) of the controller a disk device hangs on: its ``bus=`` option's
        (``ahci.0`` is controller ``ahci``'s first bus), else the first of its kind; IDE without a
        bus of its own is on the machine's own controller."""
        onboard = "ich9-ahci" if self.q35 else "piix3-ide"
        if bus is not None:
            name = bus.rsplit(".", 1)[0]
            owner = next((device for device in self.devices if device.get("id") == name), None)
            if owner is not None:
                return name, owner["driver"]
            return (onboard, onboard) if name == "ide" else (name, name)
        if driver.startswith("ide-"):
            return onboard, onboard
        kinds = {"scsi-": SCSI_CONTROLLERS, "usb-": USB_CONTROLLERS, "nvme-ns": {"nvme"}}
        kind = next(controllers for prefix, controllers in kinds.items() if driver.startswith(prefix))
        owner = next((device for device in self.devices if device.get("driver") in kind), None)
        if owner is None:
            return "unknown", "unknown"
        return owner.get("id", owner["driver"]), owner["driver"]

    def drives(self) -> dict[str, dict[str, str]]:
        """The ``-drive`` options (and ``-hda``…) by block device name, as QEMU names them: the id,
        else from the interface and index (``ide0-hd0``, ``virtio0``)."""
        drives: dict[str, dict[str, str]] = {}
        per_bus = 1 if self.q35 else 2
        used: dict[str, set[int]] = {"ide": set(), "virtio": set(), "scsi": set()}
        for option, value in self.pairs:
            if option in ("hda", "hdb", "hdc", "hdd"):
                fields = {"file": value, "if": "ide", "index": str("abcd".index(option[2]))}
            elif option == "cdrom":
                fields = {"file": value, "if": "ide", "index": "2", "media": "cdrom"}
            elif option == "drive":
                fields = option_fields(value, "file")
            else:
                continue
            interface = fields.setdefault("if", "ide")
            if interface in ("pflash", "floppy", "mtd", "sd"):
                continue
            name = fields.get("id", f"drive{len(drives)}")
            if interface in used:
                index = int(fields["index"]) if fields.get("index", "").isdigit() else \
                    next(number for number in range(64) if number not in used[interface])
                used[interface].add(index)
                media = "cd" if fields.get("media") == "cdrom" else "hd"
                name = fields.get("id") or {"ide": f"ide{index // per_bus}-{media}{index % per_bus}",
                                            "virtio": f"virtio{index}", "scsi": f"scsi0-{media}{index}"}[interface]
            drives[name] = fields
        return drives

    @staticmethod
    def disk(disk_id: str, device: str, drive: dict[str, str], properties: dict[str, str], controller: str,
             controller_device: str) -> Disk:
        image_format = drive.get("format")
        capacity = image_size(drive["file"], image_format) if drive.get("file") else None
        solid = properties.get("rotation_rate") == "1" or device.startswith("nvme")
        return Disk(id=disk_id, device=device, capacity_bytes=capacity,
                    protocol=protocol(device, controller_device), controller=controller,
                    controller_device=controller_device, media="SSD" if solid else "HDD",
                    read_only=drive.get("readonly") == "on", model=disk_model(device, properties.get("model")),
                    serial=properties.get("serial") or drive.get("serial") or None)

    # -- NICs

    def nics(self) -> list[Nic]:
        """In QEMU's order of creation, which names them and hands out MACs: ``-nic`` and ``-net
        nic`` (and the default NIC, without ``-nodefaults`` and any network option) with the
        machine, then the ``-device`` ones."""
        default_model = "e1000e" if self.q35 else "e1000"
        found: list[tuple[str | None, str, str | None, bool, str]] = []  # id, model, MAC, connected, speed
        for value in self.values("nic"):
            fields = option_fields(value, "type")
            if fields.get("type") != "none":
                found.append((None, fields.get("model", default_model), fields.get("mac"), True, ""))
        legacy = [option_fields(value, "type") for value in self.values("net")]
        backends = any(fields.get("type") not in ("nic", "none") for fields in legacy)
        for fields in legacy:
            if fields.get("type") == "nic":
                found.append((fields.get("id") or fields.get("name"), fields.get("model", default_model),
                              fields.get("macaddr"), backends, ""))
        if self.defaults and not self.values("nic", "net", "netdev"):
            found.append((None, default_model, None, True, ""))
        for device in self.devices:
            driver = device.get("driver", "")
            if driver in NIC_DEVICES or "netdev" in device:
                found.append((device.get("id"), driver, device.get("mac"), bool(device.get("netdev")),
                              device.get("speed", "")))
        nics: list[Nic] = []
        counts: dict[str, int] = {}
        automatic = 0
        for nic_id, model, mac, connected, speed in found:
            number = counts.get(model, 0)
            counts[model] = number + 1
            if not mac:
                mac = ":".join(f"{FIRST_MAC + automatic:012x}"[i:i + 2] for i in range(0, 12, 2))
                automatic += 1
            nics.append(Nic(id=nic_id or f"{model}.{number}", mac=mac.lower(), device=model, connected=connected,
                            speed_mbps=nic_speed(model, int(speed) if speed.lstrip("-").isdigit() else None)))
        return nics


def blockdev_drive(blockdevs: dict[str, dict[str, str]], node: str) -> dict[str, str] | None:
    """A ``-blockdev`` node as a drive: its format and the file under it (following ``file``)."""
    top = blockdevs.get(node)
    if top is None:
        return None
    current, depth = top, 0
    while "filename" not in current and "file.filename" not in current and depth < 4:
        current = blockdevs.get(current.get("file", ""), {})
        depth += 1
    driver = top.get("driver")
    return {"file": current.get("filename") or current.get("file.filename", ""),
            "format": driver if driver not in ("file", "host_device") else "raw",
            "readonly": top.get("read-only", "off")}


def smp_topology(values: list[str]) -> tuple[int, int, int]:
    """(cores per socket, threads per core, present CPUs) of ``-smp``, by QEMU 7's rules
    for machine types since 6.2: missing values derived, cores preferred over sockets; dies and
    clusters count as more cores of the socket."""
    fields = option_fields(values[-1], "cpus") if values else {}

    def number(key: str) -> int:
        text = fields.get(key, "0")
        return int(text) if text.isdigit() else 0

    cpus, maxcpus = number("cpus"), number("maxcpus")
    sockets, cores, threads = number("sockets"), number("cores"), number("threads")
    dies = max(number("dies"), 1) * max(number("clusters"), 1)
    if cpus == 0 and maxcpus == 0:
        sockets, cores, threads = sockets or 1, cores or 1, threads or 1
    else:
        maxcpus = maxcpus or cpus
        if cores == 0:
            sockets, threads = sockets or 1, threads or 1
            cores = max(maxcpus // (sockets * dies * threads), 1)
        elif sockets == 0:
            threads = threads or 1
            sockets = max(maxcpus // (dies * cores * threads), 1)
        threads = threads or max(maxcpus // (sockets * dies * cores), 1)
    return cores * dies, threads, cpus or sockets * dies * cores * threads


def configured_memory_mib(values: list[str]) -> int:
    """``-m`` in MiB (a bare number is MiB; QEMU's default 128)."""
    if not values:
        return 128
    text = option_fields(values[-1], "size").get("size", "128")
    size = size_bytes(text if text[-1:].isalpha() else f"{text}M")
    return size >> 20 if size else 128
