"""The managed launcher: the QEMU command line qemu-bmc adds to, starting and stopping the process.

Each managed VM gets a runtime directory (0700: its sockets are its owner's alone) with its QMP
socket, serial pipes and log, in-band IPMI socket, pid file and QEMU's own output. The launcher
adds, before the operator's arguments:

* ``-qmp`` on ``qmp.sock``, the human monitor (HMP, as qqmgr gives it) on ``monitor.sock``,
  ``-pidfile qemu.pid``, ``-no-shutdown`` (a guest power-off leaves
  QEMU in run state ``shutdown``, reported Off) and ``-S`` (the machine service applies the boot
  override, resets and continues);
* a serial chardev on the pipes ``serial.in`` and ``serial.out`` as the first serial port, logged
  to ``serial.log`` (the machine service's console reads and writes them);
* an AHCI controller with an empty CD drive ``qbmc-cd0`` for virtual media;
* ``-uuid`` (from the config, else one generated once and kept) unless the command has one;
* with in-band IPMI (``vmwire``), the ipmi-bmc-extern BMC on ``ipmi.sock`` and its KCS interface
  (see vmwire_args);
* with ``bare_metal_identity``, SMBIOS strings from the config and no VM markers (see identity_args);

and after them the host interfaces handed to the machine (lab mode, see host_nic_args), then the
disks the BMC made for the machine, its Redfish Volumes (see volume_args).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import uuid as uuid_module
from dataclasses import dataclass
from pathlib import Path

import msgspec
from qemu_bmc_shared.config import VmConfig
from qemu_bmc_shared.messages import BootMode, BootOverride, Volume
from qemu_bmc_shared.qemu_options import option_fields, options

log = logging.getLogger(__name__)

CD_DEVICE = "qbmc-cd0"
SERIAL_CHARDEV = "qbmc-serial0"
IPMI_CHARDEV = "qbmc-ipmi0"
UNIX_PATH_MAX = 107


class LaunchError(Exception):
    """QEMU did not start; the message has the end of QEMU's own output."""


class RuntimeFiles:
    """The files of one VM's runtime directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.qmp = directory / "qmp.sock"
        self.monitor = directory / "monitor.sock"
        """QEMU's human monitor (HMP), as qqmgr's ``monitor.socket``: ``info status`` and the like."""
        self.ipmi = directory / "ipmi.sock"
        """QEMU's ipmi-bmc-extern chardev (QEMU listens, the machine service connects): in-band IPMI."""
        self.vnc = directory / "vnc.sock"
        """QEMU's VNC server (the graphical console): only the machine service connects to it."""
        self.serial = directory / "serial"
        """The serial port's pipes: ``serial.out`` (what the machine writes) and ``serial.in``."""
        self.serial_log = directory / "serial.log"
        self.pid = directory / "qemu.pid"
        self.qemu_log = directory / "qemu.log"
        self.uuid = directory / "uuid"
        self.boot = directory / "boot.json"
        self.media = directory / "media.json"
        self.power = directory / "power"
        """The power state the machine last had ("On" or "Off"), not counting the machine service's
        own stop: what power restore policy "previous" restores."""
        self.boot_options = directory / "boot-options.json"
        self.launch = directory / "launch.json"
        """The LaunchProfile the running QEMU was started with."""
        self.ovmf_vars = directory / "ovmf-vars.fd"
        """The machine's UEFI variables (NVRAM) when qemu-bmc gives it OVMF: kept across boots."""
        self.firmware = directory / "firmware"
        """The system firmware images updates installed (UpdateService SimpleUpdate), at most one
        per boot mode, each named by its content's digest."""
        self.firmware_index = self.firmware / "installed.json"
        """Boot mode → the name of the image installed for it."""

    def prepare(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.directory.chmod(0o700)  # made by an older version or another umask: its sockets are no one else's
        for pipe in (self.serial.with_suffix(".in"), self.serial.with_suffix(".out")):
            if not pipe.is_fifo():
                pipe.unlink(missing_ok=True)
                os.mkfifo(pipe, 0o600)
        longest = max(len(str(socket)) for socket in (self.qmp, self.monitor, self.ipmi, self.vnc))
        if longest > UNIX_PATH_MAX:
            raise LaunchError(f"runtime directory {self.directory} is too long for a unix socket path "
                              f"({longest} > {UNIX_PATH_MAX} bytes): set a shorter runtime_dir")


def machine_uuid(vm: VmConfig, files: RuntimeFiles) -> str:
    """The configured UUID, else one generated at the first launch and kept in the runtime directory."""
    if vm.uuid:
        return vm.uuid.lower()
    if files.uuid.exists():
        return files.uuid.read_text().strip()
    value = str(uuid_module.uuid4())
    files.uuid.write_text(value + "\n")
    return value


# ---------------------------------------------------------------- launch profiles

@dataclass(frozen=True)
class LaunchProfile:
    """What a boot needs of QEMU's command line that cannot change while QEMU runs: the firmware
    (SeaBIOS for Legacy, OVMF for UEFI) and whether QEMU loads the operator's ``-kernel`` (its
    option ROM holds boot index 0, so a boot override to a device needs QEMU without it)."""

    firmware: BootMode
    kernel: bool = True
    firmware_image: str | None = None
    """The firmware file an update installed for this boot mode, in place of the configured one
    (named by its digest: another image is another profile, so it takes effect at the next boot)."""
    volumes: tuple[VolumeDisk, ...] = ()
    """The disks the BMC made for the machine (Redfish Volumes), after the operator's devices."""


@dataclass(frozen=True)
class VolumeDisk:
    """A disk the BMC gives the machine besides its command line's: a qcow2 image, as QEMU device
    ``device`` with qdev id (and serial number) ``id``, on ``bus`` (None: QEMU's choice, a PCI slot)."""

    id: str
    image: str
    device: str
    bus: str | None = None


VOLUMES_FILE = "volumes.json"
"""The machine service's record of the volumes it made for the machine (and their tasks)."""


class _SavedVolumes(msgspec.Struct):
    volumes: list[Volume] = []


def volume_image(files: RuntimeFiles, volume_id: str) -> Path:
    return files.directory / "volumes" / f"{volume_id}.qcow2"


def volume_disks(files: RuntimeFiles, volumes: list[Volume]) -> tuple[VolumeDisk, ...]:
    """The disks of the next launch: the volumes the BMC made for the machine, but those being deleted."""
    return tuple(VolumeDisk(id=volume.id, image=str(volume_image(files, volume.id)), device=volume.device,
                            bus=volume.bus) for volume in volumes if volume.state != "deleting")


def saved_volumes(files: RuntimeFiles) -> tuple[VolumeDisk, ...]:
    try:
        saved = msgspec.json.decode((files.directory / VOLUMES_FILE).read_bytes(), type=_SavedVolumes)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return ()
    return volume_disks(files, saved.volumes)


def volume_args(volumes: tuple[VolumeDisk, ...]) -> list[str]:
    """The options of the BMC's disks. They come last, so that the devices of the operator's command
    line that QEMU places itself (no ``bus=``) go where they go without them."""
    args: list[str] = []
    for volume in volumes:
        bus = f",bus={volume.bus}" if volume.bus else ""
        args += ["-drive", f"if=none,id={volume.id}-drive,format=qcow2,file={qemu_escape(volume.image)}",
                 "-device", f"{volume.device},drive={volume.id}-drive,id={volume.id},serial={volume.id}{bus}"]
    return args


#: Options that direct-boot a kernel, each with its value.
KERNEL_OPTIONS = {"kernel", "initrd", "append", "dtb"}


def _option(token: str) -> str:
    """``-kernel`` and ``--kernel`` are one option: its name without the dashes."""
    return token.lstrip("-") if token.startswith("-") else ""


def _pflash_drive(value: str) -> bool:
    return "if=pflash" in value.replace(" ", "")


def _machine_pflash(argv: list[str]) -> bool:
    """Firmware given as a block device of the machine (``-machine pflash0=``): not removable."""
    return any(_option(flag) in ("machine", "M") and "pflash0=" in value for flag, value in itertools.pairwise(argv))


def native_firmware(argv: list[str]) -> BootMode:
    """UEFI when the operator's command line gives QEMU pflash firmware (``-drive if=pflash``,
    ``-machine pflash0=``) or an OVMF/edk2 ``-bios``, else Legacy (SeaBIOS, QEMU's default)."""
    for flag, value in itertools.pairwise(argv):
        option = _option(flag)
        if (option == "drive" and _pflash_drive(value)) \
                or (option == "bios" and any(name in value.lower() for name in ("ovmf", "edk2"))):
            return "UEFI"
    return "UEFI" if _machine_pflash(argv) else "Legacy"


def firmwares(vm: VmConfig) -> list[BootMode]:
    """The boot modes a managed machine can be launched in: its own firmware's, and the other one
    when qemu-bmc can give it (OVMF installed, for a SeaBIOS machine; firmware given as
    ``-drive if=pflash`` or ``-bios``, which can be left out, for an OVMF machine)."""
    native = native_firmware(vm.argv)
    if native == "Legacy":
        return ["Legacy", "UEFI"] if vm.ovmf is not None else ["Legacy"]
    return ["UEFI"] if _machine_pflash(vm.argv) else ["UEFI", "Legacy"]


def has_kernel(vm: VmConfig) -> bool:
    return any(_option(arg) == "kernel" for arg in vm.argv[1:])


def saved_override(files: RuntimeFiles) -> BootOverride | None:
    try:
        return msgspec.json.decode(files.boot.read_bytes(), type=BootOverride)
    except (OSError, msgspec.DecodeError):
        return None


def installed_firmware(files: RuntimeFiles) -> dict[BootMode, str]:
    """Boot mode → the firmware image (its path) an update installed for it, for the modes that have one."""
    try:
        names = msgspec.json.decode(files.firmware_index.read_bytes(), type=dict[BootMode, str])
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return {}
    return {mode: str(files.firmware / name) for mode, name in names.items() if (files.firmware / name).is_file()}


def default_profile(vm: VmConfig, files: RuntimeFiles) -> LaunchProfile:
    """The profile of a launch that knows nothing of the machine's devices (the VM manager's): the
    boot mode last set, with the firmware an update installed for it, the kernel as the command line has it,
    the volumes the BMC made."""
    override = saved_override(files)
    mode = override.mode if override is not None and override.mode in firmwares(vm) else native_firmware(vm.argv)
    return LaunchProfile(firmware=mode, firmware_image=installed_firmware(files).get(mode),
                         volumes=saved_volumes(files))


def profile_args(vm: VmConfig, files: RuntimeFiles, user_args: list[str], profile: LaunchProfile) -> list[str]:
    """The operator's arguments for ``profile``: without the direct-boot kernel options when it
    has no kernel; without the operator's firmware options when it asks for the other firmware or
    an installed firmware image, plus that firmware: ``-bios`` for SeaBIOS, or OVMF (its variables
    a copy of the template, kept in the runtime directory) for UEFI."""
    replaced = profile.firmware != native_firmware(vm.argv) or profile.firmware_image is not None
    args: list[str] = []
    skip = False
    for flag, value in itertools.pairwise([*user_args, ""]):
        if skip:
            skip = False
            continue
        option = _option(flag)
        if (not profile.kernel and option in KERNEL_OPTIONS) or (replaced and option == "bios") \
                or (replaced and option == "drive" and _pflash_drive(value)):
            skip = True
            continue
        args.append(flag)
    if replaced and profile.firmware == "Legacy" and profile.firmware_image:
        args += ["-bios", profile.firmware_image]
    if replaced and profile.firmware == "UEFI":
        if vm.ovmf is None:
            raise LaunchError(f"{vm.name}: UEFI boot needs OVMF ([qemu] ovmf_code and ovmf_vars)")
        code, template = vm.ovmf
        if not files.ovmf_vars.exists():
            shutil.copyfile(template, files.ovmf_vars)
            files.ovmf_vars.chmod(0o600)
        code = profile.firmware_image or code
        args += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={qemu_escape(str(code))}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={qemu_escape(str(files.ovmf_vars))}"]
    return args


def save_profile(files: RuntimeFiles, profile: LaunchProfile) -> None:
    files.launch.write_text(msgspec.json.encode({"firmware": profile.firmware, "kernel": profile.kernel,
                                                 "firmware_image": profile.firmware_image,
                                                 "volumes": profile.volumes}).decode())


def load_profile(files: RuntimeFiles) -> LaunchProfile | None:
    try:
        saved = msgspec.json.decode(files.launch.read_bytes())
        return LaunchProfile(firmware=saved["firmware"], kernel=bool(saved["kernel"]),
                             firmware_image=saved.get("firmware_image"),
                             volumes=tuple(VolumeDisk(**volume) for volume in saved.get("volumes", [])))
    except (OSError, msgspec.DecodeError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class HostNic:
    """A host interface handed to the machine (``[vm.NAME] nics``; the machine service's host_nics makes
    it): QEMU's tap backend on the open macvtap character device ``fd``, or on the tap device ``tap``
    (on a bridge with the interface) that QEMU opens by name; a virtio NIC with MAC address ``mac``."""

    mac: str
    fd: int | None = None
    tap: str | None = None


def host_nic_args(nics: tuple[HostNic, ...]) -> list[str]:
    """After the operator's arguments (the devices QEMU places itself keep their slots), before the
    volumes (a volume made or deleted moves no NIC)."""
    args: list[str] = []
    for index, nic in enumerate(nics):
        backend = f"fd={nic.fd}" if nic.fd is not None else f"ifname={nic.tap},script=no,downscript=no"
        args += ["-netdev", f"tap,id=qbmc-nic{index},{backend}",
                 "-device", f"virtio-net-pci,netdev=qbmc-nic{index},mac={nic.mac}"]
    return args


def managed_argv(vm: VmConfig, files: RuntimeFiles, profile: LaunchProfile | None = None,
                 nics: tuple[HostNic, ...] = ()) -> list[str]:
    binary, *user_args = vm.argv
    if profile is not None:
        user_args = profile_args(vm, files, user_args, profile)
    argv = [
        binary,
        "-qmp", f"unix:{files.qmp},server=on,wait=off",
        "-monitor", f"unix:{files.monitor},server=on,wait=off",
        "-pidfile", str(files.pid),
        "-no-shutdown",
        "-S",
        "-vnc", f"unix:{files.vnc}",
        # pipes, not a socket: a pipe holds 64 KiB, so a console reader that is briefly late never
        # makes the UART drop bytes (a unix socket fills after a few hundred one-byte writes)
        "-chardev", f"pipe,id={SERIAL_CHARDEV},path={files.serial},"
                    f"logfile={files.serial_log},logappend=on",
        "-serial", f"chardev:{SERIAL_CHARDEV}",
        "-device", "ich9-ahci,id=qbmc-ahci",
        "-drive", f"if=none,id={CD_DEVICE}-drive,media=cdrom,readonly=on",
        "-device", f"ide-cd,id={CD_DEVICE},drive={CD_DEVICE}-drive,bus=qbmc-ahci.0",
    ]
    if "-uuid" not in user_args:
        argv += ["-uuid", machine_uuid(vm, files)]
    if not names_display(user_args):
        argv += ["-vga", "std"]
    argv += vmwire_args(vm, files)
    argv += identity_args(vm)
    return argv + user_args + host_nic_args(nics) + (volume_args(profile.volumes) if profile is not None else [])


#: ``-device`` drivers that are a machine's display adapter (``qemu-system-x86_64 -device help``).
DISPLAY_DEVICES = frozenset({
    "VGA", "ati-vga", "bochs-display", "cirrus-vga", "isa-cirrus-vga", "isa-vga", "qxl-vga", "ramfb",
    "vhost-user-vga", "virtio-gpu", "virtio-gpu-pci", "virtio-gpu-device", "virtio-gpu-gl", "virtio-gpu-gl-pci",
    "virtio-vga", "virtio-vga-gl", "vmware-svga"})


def names_display(user_args: list[str]) -> bool:
    """The operator's command line chooses the display adapter itself (``-vga``, a display
    ``-device``) or has none (``-nographic``): the launcher then adds no ``-vga std``."""
    if "-nographic" in user_args or "--nographic" in user_args:
        return True
    return any(option == "vga" or (option == "device" and option_fields(value, "driver").get("driver")
                                   in DISPLAY_DEVICES)
               for option, value in options(["", *user_args]))


def owns_ipmi_chardev(vm: VmConfig) -> bool:
    """The launcher gives the machine its in-band IPMI interface (see vmwire_args)."""
    return vm.mode == "managed" and vm.inband and not any("ipmi-bmc-extern" in arg for arg in vm.argv)


def vmwire_args(vm: VmConfig, files: RuntimeFiles) -> list[str]:
    """With in-band IPMI, an IPMI KCS interface whose BMC is behind a unix socket of the runtime
    directory: QEMU listens on it, the machine service connects and carries the frames over the
    bus to the VM-wire service (no TCP port, nothing another user can reach). Not when the
    operator's own arguments have an ipmi-bmc-extern device already."""
    if not owns_ipmi_chardev(vm):
        return []
    return ["-chardev", f"socket,id={IPMI_CHARDEV},path={qemu_escape(str(files.ipmi))},server=on,wait=off",
            "-device", f"ipmi-bmc-extern,id=qbmc-bmc0,chardev={IPMI_CHARDEV}",
            "-device", "isa-ipmi-kcs,bmc=qbmc-bmc0"]


SMBIOS_TYPE0_FILE = "smbios-type0.bin"


def identity_args(vm: VmConfig) -> list[str]:
    """With ``bare_metal_identity``: the options that make the guest see the configured machine and
    none of the markers ``systemd-detect-virt`` looks for on x86 (src/basic/virt.c):

    * DMI strings (``/sys/class/dmi/id/{product_name,sys_vendor,board_vendor,bios_vendor,product_version}``):
      SMBIOS types 1, 2 and 3 from ``-smbios type=N`` fields, and types 4 and 17 whose manufacturer
      (and processor version) would otherwise be QEMU's and its machine type;
    * the SMBIOS type 0 "system is a virtual machine" bit (BIOS characteristics extension byte 2,
      bit 4): QEMU's own ``-smbios type=0`` always sets it, so type 0 is a binary table written to the
      runtime directory and loaded with ``-smbios file=`` (SeaBIOS and OVMF then add no type 0 of their
      own);
    * the CPUID hypervisor bit (leaf 1, ECX bit 31; the hypervisor vendor leaf 0x40000000 is read only
      when it is set): ``hypervisor=off`` as a global property of every x86 CPU model, so it applies
      to the operator's ``-cpu`` (or QEMU's default model) without rewriting it; and, with
      ``cpu_model``, the CPU's model name (``QEMU Virtual CPU ...`` otherwise) the same way.
    """
    identity = vm.identity
    if identity is None:
        return []
    binary, *user_args = vm.argv
    serial = identity.serial or _uuid_of(vm, user_args)
    vendor, product, version = identity.vendor, identity.product, identity.version
    type1 = {"manufacturer": vendor, "product": product, "version": version, "serial": serial,
             "sku": identity.sku, "family": identity.family}
    type2 = {"manufacturer": identity.board_vendor or vendor, "product": identity.board_product or product,
             "version": version, "serial": serial}
    type3 = {"manufacturer": identity.chassis_vendor or vendor, "version": version, "serial": serial}
    cpu_type = "i386-cpu" if "i386" in Path(binary).name else "x86_64-cpu"
    return ["-smbios", f"file={qemu_escape(str(write_smbios_type0(vm)))}",
            "-smbios", _smbios_fields(1, type1),
            "-smbios", _smbios_fields(2, type2),
            "-smbios", _smbios_fields(3, type3),
            "-smbios", _smbios_fields(4, {"manufacturer": vendor, "version": ""}),
            "-smbios", _smbios_fields(17, {"manufacturer": vendor}),
            "-global", f"{cpu_type}.hypervisor=off",
            *(["-global", f"{cpu_type}.model-id={identity.cpu_model}"] if identity.cpu_model else [])]


def qemu_escape(value: str) -> str:
    """A value inside a QEMU ``key=value,...`` option: a comma is written twice."""
    return value.replace(",", ",,")


def _smbios_fields(table: int, fields: dict[str, str | None]) -> str:
    """``type=N,key=value,...``; a field that is None is left out (QEMU's default), an empty one is
    "Not Specified" (string number 0)."""
    return ",".join([f"type={table}"] + [f"{key}={qemu_escape(value)}" for key, value in fields.items()
                                         if value is not None])


def _uuid_of(vm: VmConfig, user_args: list[str]) -> str:
    """The machine's UUID as the launcher gives it: the operator's ``-uuid``, else machine_uuid."""
    for flag, value in itertools.pairwise(user_args):
        if flag == "-uuid":
            return value.lower()
    files = RuntimeFiles(vm.runtime_dir)
    files.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return machine_uuid(vm, files)


def smbios_type0(bios_vendor: str, bios_version: str, bios_date: str) -> bytes:
    """An SMBIOS type 0 (BIOS information) structure, version 2.4 layout, with its strings.

    Characteristics: PCI, flash upgradeable, shadowing, boot from CD, selectable boot, EDD; extension
    byte 1: ACPI and legacy USB; extension byte 2: targeted content distribution and UEFI supported,
    and NOT bit 4 (a virtual machine)."""
    release = re.match(r"(\d{1,3})\.(\d{1,3})", bios_version)
    major, minor = (int(release.group(1)), int(release.group(2))) if release else (1, 0)
    if major > 254 or minor > 254:
        major, minor = 1, 0
    characteristics = (1 << 7) | (1 << 11) | (1 << 12) | (1 << 15) | (1 << 16) | (1 << 19)
    formatted = struct.pack("<BBHBBHBBQBBBBBB",
                            0, 0x18, 0x0000,     # type, length, handle
                            1, 2, 0xE800, 3,     # vendor, version, start segment, release date
                            0x0F, characteristics,  # ROM size 1 MiB
                            0x03, 0x0C,          # extension bytes 1 and 2
                            major, minor, 0xFF, 0xFF)  # BIOS release, no embedded controller
    return formatted + b"".join(text.encode("ascii") + b"\0" for text in (bios_vendor, bios_version, bios_date)) + b"\0"


def write_smbios_type0(vm: VmConfig) -> Path:
    assert vm.identity is not None
    identity = vm.identity
    path = vm.runtime_dir / SMBIOS_TYPE0_FILE
    data = smbios_type0(identity.bios_vendor or identity.vendor, identity.bios_version, identity.bios_date)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)
    return path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) is not alive.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def running_pid(files: RuntimeFiles) -> int | None:
    """The pid of a QEMU this VM's runtime directory belongs to, if it still runs (adoption)."""
    try:
        pid = int(files.pid.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    if str(files.qmp).encode() in cmdline and pid_alive(pid):
        return pid
    return None


def _launch_argv(vm: VmConfig, files: RuntimeFiles, profile: LaunchProfile,
                 nics: tuple[HostNic, ...] = ()) -> list[str]:
    files.prepare()
    for stale in (files.pid, files.qmp, files.monitor, files.ipmi, files.vnc):
        stale.unlink(missing_ok=True)
    argv = managed_argv(vm, files, profile, nics)
    save_profile(files, profile)
    log.info("%s: launching %s", vm.name, " ".join(argv))
    return argv


async def launch(vm: VmConfig, files: RuntimeFiles, profile: LaunchProfile,
                 nics: tuple[HostNic, ...] = ()) -> asyncio.subprocess.Process:
    """Start QEMU paused (``-S``); the caller connects to QMP and continues it. QEMU inherits the
    file descriptors of ``nics``."""
    argv = _launch_argv(vm, files, profile, nics)
    with files.qemu_log.open("ab") as output:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=output, start_new_session=True,
            pass_fds=[nic.fd for nic in nics if nic.fd is not None])
    return process


def launch_detached(vm: VmConfig, files: RuntimeFiles) -> subprocess.Popen[bytes]:
    """The same, for a caller that exits and leaves QEMU running (the VM manager): asyncio would
    kill a child it started when its transport is closed."""
    if vm.nics:
        raise LaunchError(f"{vm.name}: its host interfaces (nics) are handed over by the machine service: "
                          "start the machine through it")
    argv = _launch_argv(vm, files, default_profile(vm, files))
    with files.qemu_log.open("ab") as output:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=output, start_new_session=True)


def launch_failure(files: RuntimeFiles, returncode: int | None) -> LaunchError:
    """QEMU's last two lines of output (its error, and often a hint after it)."""
    tail = ""
    with contextlib.suppress(OSError):
        tail = "; ".join(files.qemu_log.read_text(errors="replace").strip().splitlines()[-2:])
    status = "" if returncode is None else f" with status {returncode}"
    return LaunchError(f"QEMU exited{status}: {tail}")


async def wait_exit(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has gone; True if it did within ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pid_alive(pid):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def terminate(pid: int, term_timeout: float = 3.0) -> None:
    """SIGTERM, then SIGKILL if QEMU is still there after ``term_timeout``."""
    for sig, timeout in ((signal.SIGTERM, term_timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if await wait_exit(pid, timeout):
            return
    raise LaunchError(f"QEMU pid {pid} survived SIGKILL")


_SIZE = re.compile(r"^(?:size=)?(\d+)([KMGT]?)B?$", re.IGNORECASE)


def configured_memory_mib(argv: list[str]) -> int:
    """The -m value of a command line in MiB (QEMU's default is 128)."""
    for flag, value in itertools.pairwise(argv):
        if flag == "-m":
            match = _SIZE.match(value.split(",")[0])
            if match:
                number, unit = int(match.group(1)), match.group(2).upper()
                return {"": number, "M": number, "K": number // 1024, "G": number * 1024,
                        "T": number * 1024 * 1024}[unit]
    return 128


def configured_cpus(argv: list[str]) -> int:
    for flag, value in itertools.pairwise(argv):
        if flag == "-smp":
            first = value.split(",")[0]
            if first.isdigit():
                return int(first)
            match = re.search(r"cpus=(\d+)", value)
            if match:
                return int(match.group(1))
    return 1


def configured_macs(argv: list[str]) -> list[str]:
    return [match.lower() for arg in argv for match in re.findall(r"mac=([0-9A-Fa-f:]{17})", arg)]
