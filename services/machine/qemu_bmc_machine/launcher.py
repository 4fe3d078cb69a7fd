"""The managed launcher: the QEMU command line qemu-bmc adds to, starting and stopping the process.

Each managed VM gets a runtime directory with its QMP socket, serial socket and log, pid file and
QEMU's own output. The launcher adds, before the operator's arguments:

* ``-qmp`` on ``qmp.sock``, ``-pidfile qemu.pid``, ``-no-shutdown`` (a guest power-off leaves
  QEMU in run state ``shutdown``, reported Off) and ``-S`` (the machine service applies the boot
  override, resets and continues);
* a serial chardev socket ``serial.sock`` as the first serial port, logged to ``serial.log``;
* an AHCI controller with an empty CD drive ``qbmc-cd0`` for virtual media;
* ``-uuid`` (from the config, else one generated once and kept) unless the command has one;
* with a ``vmwire`` address, the ipmi-bmc-extern BMC and its KCS interface (see vmwire_args).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import signal
import uuid as uuid_module
from pathlib import Path

from qemu_bmc_shared.config import VmConfig

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
        self.serial = directory / "serial.sock"
        self.serial_log = directory / "serial.log"
        self.pid = directory / "qemu.pid"
        self.qemu_log = directory / "qemu.log"
        self.uuid = directory / "uuid"
        self.boot = directory / "boot.json"
        self.media = directory / "media.json"

    def prepare(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        longest = max(len(str(self.qmp)), len(str(self.serial)))
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


def managed_argv(vm: VmConfig, files: RuntimeFiles) -> list[str]:
    binary, *user_args = vm.argv
    argv = [
        binary,
        "-qmp", f"unix:{files.qmp},server=on,wait=off",
        "-pidfile", str(files.pid),
        "-no-shutdown",
        "-S",
        "-chardev", f"socket,id={SERIAL_CHARDEV},path={files.serial},server=on,wait=off,"
                    f"logfile={files.serial_log},logappend=on",
        "-serial", f"chardev:{SERIAL_CHARDEV}",
        "-device", "ich9-ahci,id=qbmc-ahci",
        "-drive", f"if=none,id={CD_DEVICE}-drive,media=cdrom,readonly=on",
        "-device", f"ide-cd,id={CD_DEVICE},drive={CD_DEVICE}-drive,bus=qbmc-ahci.0",
    ]
    if "-uuid" not in user_args:
        argv += ["-uuid", machine_uuid(vm, files)]
    argv += vmwire_args(vm)
    return argv + user_args


def vmwire_args(vm: VmConfig) -> list[str]:
    """With a ``vmwire`` address, an IPMI KCS interface whose BMC is the VM-wire service: QEMU
    connects to it, and reconnects every second while it is not there. Not when the operator's
    own arguments have an ipmi-bmc-extern device already."""
    if vm.vmwire is None or any("ipmi-bmc-extern" in arg for arg in vm.argv):
        return []
    host, port = vm.vmwire
    return ["-chardev", f"socket,id={IPMI_CHARDEV},host={'127.0.0.1' if host == '0.0.0.0' else host},port={port},"
                        "reconnect=1",
            "-device", f"ipmi-bmc-extern,id=qbmc-bmc0,chardev={IPMI_CHARDEV}",
            "-device", "isa-ipmi-kcs,bmc=qbmc-bmc0"]


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


async def launch(vm: VmConfig, files: RuntimeFiles) -> asyncio.subprocess.Process:
    """Start QEMU paused (``-S``); the caller connects to QMP and continues it."""
    files.prepare()
    for stale in (files.pid, files.qmp):
        stale.unlink(missing_ok=True)
    argv = managed_argv(vm, files)
    log.info("%s: launching %s", vm.name, " ".join(argv))
    with files.qemu_log.open("ab") as output:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=output, start_new_session=True)
    return process


def launch_failure(files: RuntimeFiles, returncode: int | None) -> LaunchError:
    tail = ""
    with contextlib.suppress(OSError):
        tail = files.qemu_log.read_text(errors="replace").strip().splitlines()[-1]
    return LaunchError(f"QEMU exited with status {returncode}: {tail}")


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
