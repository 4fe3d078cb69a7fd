"""``qemu-bmc vm``: the VM manager (the qqmgr workflow) for the machines of the config.

``list``, ``status``, ``start``, ``stop``, ``ssh``, ``put``, ``get`` and ``disk``, each with ``--json``.
Starting and stopping go through the machine service when one serves the machine on the bus
(it owns the QEMU process and its QMP socket then); otherwise the VM manager launches QEMU itself
with the machine service's own launcher (same command line, runtime files and pid file, so a
machine service started later adopts the VM) and stops it over QMP. ``ssh``, ``put`` and ``get``
run OpenSSH's ``ssh``/``scp`` with an ssh config generated per VM from the global ``[ssh]``
options and the VM's ``[vm.NAME.ssh]`` (in the VM's runtime directory, ``ssh_config``). ``disk``
makes (``create``) and shows (``info``) the disk images the VM's command line names, with
``[qemu] img`` (qemu-img). docs/qqmgr.md maps qqmgr's commands and keys to these.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client
from qemu.qmp import QMPClient
from qemu_bmc_shared import bus, launcher, subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.config import Config, VmConfig
from qemu_bmc_shared.messages import PowerRequest, PowerStatus
from qemu_bmc_shared.qemu_options import option_fields
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

QMP_TIMEOUT = 10.0
"""Seconds a launched QEMU has to open its QMP socket."""
BUS_TIMEOUT = 0.5
"""Seconds to reach NATS, and a machine service to answer, before working without the bus."""
DEFAULT_STOP_TIMEOUT = 20.0


class VmError(Exception):
    """What went wrong with a VM, for the user."""


def add_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    vm = commands.add_parser("vm", parents=[common],
                             help="the VM manager: list, start, stop, status, ssh, put, get, disk")
    actions = vm.add_subparsers(dest="vm_command", required=True)
    actions.add_parser("list", parents=[common], help="every VM of the config")
    status = actions.add_parser("status", parents=[common], help="one VM: pid, runtime files, ports")
    status.add_argument("name")
    for name, text in (("start", "start VMs"), ("stop", "stop VMs: ACPI power button, then kill after --timeout")):
        action = actions.add_parser(name, parents=[common], help=text)
        action.add_argument("names", nargs="*", metavar="NAME")
        action.add_argument("--all", action="store_true", help="every managed VM of the config")
        if name == "stop":
            action.add_argument("--timeout", type=float, default=DEFAULT_STOP_TIMEOUT,
                                help=f"seconds the guest has to shut down (default {DEFAULT_STOP_TIMEOUT:g})")
    ssh = actions.add_parser("ssh", parents=[common], help="ssh into a VM, or run a command there")
    ssh.add_argument("name")
    ssh.add_argument("remote_command", nargs=argparse.REMAINDER, metavar="CMD")
    put = actions.add_parser("put", parents=[common], help="copy a local file or directory to a VM (scp)")
    put.add_argument("name")
    put.add_argument("local")
    put.add_argument("remote")
    get = actions.add_parser("get", parents=[common], help="copy a file or directory from a VM (scp)")
    get.add_argument("name")
    get.add_argument("remote")
    get.add_argument("local")
    disk = actions.add_parser("disk", parents=[common], help="make or show the disk images a VM's command line "
                              "names (qemu-img)", epilog="example: qemu-bmc vm disk node1 create 20G "
                              "--backing debian-12.qcow2")
    disk.add_argument("name")
    disk.add_argument("disk_command", choices=["create", "info"], metavar="{create,info}")
    disk.add_argument("size", nargs="?", help="create: the virtual size (qemu-img's: 20G, 512M); with --backing "
                      "the backing file's when left out")
    disk.add_argument("--drive", metavar="ID", help="the drive (its id=, hda..hdd, or driveN: the Nth -drive) when "
                      "the command line names several images")
    disk.add_argument("--backing", metavar="FILE", help="create: an overlay on this image (its format is detected)")
    disk.add_argument("--format", help="create: the image format (default: the drive's format=, else qcow2)")


# ---------------------------------------------------------------------- runtime files and status


def runtime_files(vm: VmConfig) -> launcher.RuntimeFiles:
    return launcher.RuntimeFiles(vm.runtime_dir)


def ssh_config_path(vm: VmConfig) -> Path:
    return vm.runtime_dir / "ssh_config"


def clean_stale(vm: VmConfig) -> list[str]:
    """Remove the pid file and QMP socket a QEMU left behind (killed, crashed, host rebooted); the
    files removed. A pid file naming a live process that is not this VM's QEMU is stale too."""
    files = runtime_files(vm)
    if vm.mode != "managed" or launcher.running_pid(files) is not None:
        return []
    removed = []
    for stale in (files.pid, files.qmp):
        if stale.exists() or stale.is_symlink():
            stale.unlink()
            removed.append(str(stale))
    return removed


def vm_status(vm: VmConfig) -> dict[str, Any]:
    """What the VM manager knows without the bus: the QEMU pid (None when not running), runtime
    files and ports."""
    cleaned = clean_stale(vm)
    files = runtime_files(vm)
    if vm.mode == "managed":
        pid = launcher.running_pid(files)
        state = "running" if pid else "stopped"
        runtime = {"dir": str(files.directory), "pid_file": str(files.pid), "qmp": str(files.qmp),
                   "monitor": str(files.monitor), "serial_log": str(files.serial_log), "qemu_log": str(files.qemu_log)}
        # qqmgr's names for them (its ``status --json``)
        qqmgr = {"pid_file": str(files.pid), "serial_file": str(files.serial_log), "qmp_file": str(files.qmp),
                 "monitor_file": str(files.monitor)}
    else:
        pid = None
        state = "attached" if vm.qmp and vm.qmp.exists() else "absent"
        runtime = {"dir": str(files.directory), "qmp": str(vm.qmp), "serial": str(vm.serial) if vm.serial else None}
        qqmgr = {"pid_file": None, "serial_file": None, "qmp_file": str(vm.qmp), "monitor_file": None}
    if vm.ssh is not None:
        runtime["ssh_config"] = str(ssh_config_path(vm))

    def address(value: tuple[str, int] | None) -> str | None:
        return f"{value[0]}:{value[1]}" if value else None

    return {"name": vm.name, "mode": vm.mode, "state": state, "pid": pid, "runtime": runtime,
            "ports": {"ssh": vm.ssh.port if vm.ssh else None, "ssh_vm": vm.ssh.vm_port if vm.ssh else None,
                      "ipmi": address(vm.ipmi), "vmwire": address(vm.vmwire) if vm.mode == "attach" else None},
            "stale_files_removed": cleaned, **qqmgr, "ssh": {"port": vm.ssh.port if vm.ssh else None},
            "cmdline": vm.argv if vm.mode == "managed" else None}


# ---------------------------------------------------------------------- ssh


def ssh_value(value: Any) -> list[str]:
    if isinstance(value, bool):
        return ["yes" if value else "no"]
    if isinstance(value, list):
        return [str(item) for item in value]
    return [str(value)]


def write_ssh_config(vm: VmConfig) -> Path:
    """The VM's ssh config: a ``Host NAME`` block on 127.0.0.1 (unless a HostName option says
    otherwise) and ``port``, with the merged ``[ssh]`` options."""
    if vm.ssh is None:
        raise VmError(missing_ssh(vm))
    lines = [f"# written by qemu-bmc for VM {vm.name}: [ssh] and [vm.{vm.name}.ssh] of the config",
             f"Host {vm.name}"]
    if not any(key.lower() == "hostname" for key in vm.ssh.options):
        lines.append("    HostName 127.0.0.1")
    lines.append(f"    Port {vm.ssh.port}")
    for key, value in vm.ssh.options.items():
        lines += [f"    {key} {item}" for item in ssh_value(value)]
    path = ssh_config_path(vm)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text("\n".join(lines) + "\n")
    return path


def missing_ssh(vm: VmConfig) -> str:
    return (f"vm.{vm.name}.ssh.port: missing: ssh, put and get need [vm.{vm.name}.ssh] port = HOST_PORT (the host "
            "port forwarded to the VM's sshd, as qqmgr requires)")


def require_running(vm: VmConfig) -> None:
    if vm.mode == "managed" and launcher.running_pid(runtime_files(vm)) is None:
        raise VmError(f"{vm.name} is not running (qemu-bmc vm start {vm.name})")


def run_openssh(argv: list[str], as_json: bool, report: dict[str, Any]) -> int:
    if not as_json:
        return subprocess.run(argv, check=False).returncode
    done = subprocess.run(argv, check=False, capture_output=True, stdin=subprocess.DEVNULL)
    print(json.dumps({**report, "exit_code": done.returncode, "stdout": done.stdout.decode(errors="replace"),
                      "stderr": done.stderr.decode(errors="replace")}, indent=2))
    return done.returncode


# ---------------------------------------------------------------------- start and stop


@contextlib.asynccontextmanager
async def optional_bus(url: str) -> AsyncIterator[Client | None]:
    """A NATS connection when the server answers at once, else None (the VM manager then works
    on its own)."""
    async def quiet(_: Exception) -> None:
        pass

    try:
        nc = await asyncio.wait_for(nats.connect(url, name="qemu-bmc-vm", connect_timeout=BUS_TIMEOUT,
                                                 allow_reconnect=False, max_reconnect_attempts=1, error_cb=quiet),
                                    BUS_TIMEOUT * 3)
    except Exception:
        yield None
        return
    try:
        yield nc
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


async def served(nc: Client | None, vm: VmConfig) -> bool:
    """A machine service serves this VM on the bus."""
    if nc is None:
        return False
    try:
        await bus.request(nc, vm.name, subjects.POWER_GET, None, PowerStatus, timeout=BUS_TIMEOUT * 4)
    except BusError:
        return False
    return True


async def qmp_connect(vm: VmConfig, pid: int, timeout: float) -> QMPClient:
    """A QMP connection to the VM's QEMU, waiting up to ``timeout`` for its socket."""
    files = runtime_files(vm)
    deadline = time.monotonic() + timeout
    while True:
        client = QMPClient(vm.name)
        try:
            await asyncio.wait_for(client.connect(str(files.qmp)), max(0.1, deadline - time.monotonic()))
            return client
        except Exception as exc:
            if not launcher.pid_alive(pid):
                raise VmError(f"{vm.name}: {launcher.launch_failure(files, None)}") from None
            if time.monotonic() >= deadline:
                raise VmError(f"{vm.name}: QEMU pid {pid} opened no QMP socket at {files.qmp}: {exc}") from None
        await asyncio.sleep(0.05)


async def start_vm(vm: VmConfig, nc: Client | None) -> dict[str, Any]:
    if vm.mode != "managed":
        raise VmError(f"{vm.name}: attach mode, its QEMU is the operator's to start")
    files = runtime_files(vm)
    if await served(nc, vm):
        assert nc is not None
        await bus.request(nc, vm.name, subjects.POWER_SET, PowerRequest(action="on"), PowerStatus, timeout=60)
        return {**vm_status(vm), "started_by": "machine service"}
    if launcher.running_pid(files) is not None:
        return {**vm_status(vm), "started_by": None}
    clean_stale(vm)
    try:
        process = launcher.launch_detached(vm, files)
    except (launcher.LaunchError, OSError) as exc:
        raise VmError(f"{vm.name}: {exc}") from None
    qmp = await qmp_connect(vm, process.pid, QMP_TIMEOUT)
    try:
        await qmp.execute("cont")  # the launcher starts QEMU paused (-S)
    finally:
        await qmp.disconnect()
    return {**vm_status(vm), "started_by": "vm manager"}


async def stop_vm(vm: VmConfig, nc: Client | None, timeout: float) -> dict[str, Any]:
    """The ACPI power button, then, when the guest has not powered off within ``timeout``, the
    process is ended anyway; ``how`` says which."""
    if vm.mode != "managed":
        raise VmError(f"{vm.name}: attach mode, its QEMU is the operator's to stop")
    files = runtime_files(vm)
    if await served(nc, vm):
        assert nc is not None
        how = await stop_on_bus(vm, nc, timeout)
    else:
        pid = launcher.running_pid(files)
        how = "not running" if pid is None else await stop_directly(vm, pid, timeout)
    return {**vm_status(vm), "how": how}


async def stop_on_bus(vm: VmConfig, nc: Client, timeout: float) -> str:
    status = await bus.request(nc, vm.name, subjects.POWER_GET, None, PowerStatus)
    if status.pid is None:
        return "not running"
    how = "forced"
    if status.state == "On":
        await bus.request(nc, vm.name, subjects.POWER_SET, PowerRequest(action="soft"), PowerStatus, timeout=30)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (await bus.request(nc, vm.name, subjects.POWER_GET, None, PowerStatus)).state == "Off":
                how = "graceful"
                break
            await asyncio.sleep(0.2)
    await bus.request(nc, vm.name, subjects.POWER_SET, PowerRequest(action="off"), PowerStatus, timeout=60)
    return how


async def stop_directly(vm: VmConfig, pid: int, timeout: float) -> str:
    try:
        qmp = await qmp_connect(vm, pid, 2.0)
    except VmError:
        await launcher.terminate(pid)
        return "forced"
    deadline = time.monotonic() + timeout
    try:
        await qmp.execute("system_powerdown")
        while time.monotonic() < deadline and launcher.pid_alive(pid):
            status = await qmp.execute("query-status")
            if isinstance(status, dict) and status.get("status") == "shutdown":  # -no-shutdown: QEMU waits
                with contextlib.suppress(Exception):
                    await qmp.execute("quit")
                break
            await asyncio.sleep(0.2)
    except Exception:  # QEMU went away under us: the guest powered off
        pass
    finally:
        with contextlib.suppress(Exception):
            await qmp.disconnect()
    if await launcher.wait_exit(pid, 5.0 if time.monotonic() < deadline else 0.0):
        return "graceful"
    await launcher.terminate(pid)
    return "forced"


# ---------------------------------------------------------------------- disk images

#: Options that give a disk image as their whole value.
HD_OPTIONS = ("hda", "hdb", "hdc", "hdd")
#: ``file=`` values that are not local files: ``nbd:...``, ``json:{...}``, ``https://...``.
PROTOCOL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


@dataclass(frozen=True)
class Disk:
    """A disk image the VM's command line names: ``-drive ...,file=F`` (not pflash firmware, not
    a CD) or ``-hda F``; ``id`` is the drive's ``id=``, else ``hda``..``hdd``, else ``driveN``."""

    id: str
    file: Path
    format: str | None


def vm_disks(vm: VmConfig) -> list[Disk]:
    """The disk images of the VM's command line; a relative path is relative to the current folder,
    where ``qemu-bmc vm start`` runs QEMU."""
    disks: list[Disk] = []
    drives = 0
    for flag, value in itertools.pairwise(vm.argv[1:]):
        option = flag.lstrip("-") if flag.startswith("-") else ""
        if option == "drive":
            drives += 1
            fields = option_fields(value)
            file = fields.get("file", "")
            if not file or PROTOCOL.match(file) or fields.get("if") == "pflash" or fields.get("media") == "cdrom":
                continue
            disks.append(Disk(id=fields.get("id") or f"drive{drives - 1}", file=Path(file).absolute(),
                              format=fields.get("format")))
        elif option in HD_OPTIONS and not PROTOCOL.match(value):
            disks.append(Disk(id=option, file=Path(value).absolute(), format=None))
    return disks


def picked_disks(vm: VmConfig, drive: str | None, one: bool) -> list[Disk]:
    """The VM's disks, or the one ``--drive`` names; ``one``: exactly one is needed."""
    if vm.mode != "managed":
        raise VmError(f"{vm.name}: attach mode, its command line (and its disks) is not in the config")
    disks = vm_disks(vm)
    if not disks:
        raise VmError(f"{vm.name}: its command line names no disk image (-drive file=..., -hda ...)")
    ids = ", ".join(disk.id for disk in disks)
    if drive is not None:
        disks = [disk for disk in disks if disk.id == drive]
        if not disks:
            raise VmError(f"{vm.name}: no drive {drive!r} (drives: {ids})")
    if one and len(disks) > 1:
        raise VmError(f"{vm.name}: its command line names {len(disks)} images ({ids}): pick one with --drive ID")
    return disks


def qemu_img(config: Config, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([config.qemu_img, *args], capture_output=True, text=True, check=False,
                              stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise VmError(f"[qemu] img: cannot run {config.qemu_img}: {exc.strerror or exc}") from None


def image_info(config: Config, file: Path) -> dict[str, Any]:
    """``qemu-img info`` of an image (``--force-share``: a running QEMU holds its lock)."""
    done = qemu_img(config, "info", "--force-share", "--output=json", str(file))
    if done.returncode != 0:
        raise VmError(done.stderr.strip() or f"qemu-img info {file} failed with status {done.returncode}")
    info: dict[str, Any] = json.loads(done.stdout)
    return info


def create_disk(config: Config, vm: VmConfig, disk: Disk, size: str | None, backing: str | None,
                image_format: str | None) -> dict[str, Any]:
    """Make the image ``disk`` names, never over an existing file (the name is taken with
    O_EXCL first, then qemu-img writes the image into it)."""
    if disk.format and image_format and image_format != disk.format:
        raise VmError(f"{vm.name}: --format {image_format}, but drive {disk.id} says format={disk.format}")
    image_format = image_format or disk.format or "qcow2"
    if size is None and backing is None:
        raise VmError("give the image's size (20G, 512M), or --backing FILE")
    argv = ["create", "-q", "-f", image_format]
    if backing is not None:
        backing_file = Path(backing).absolute()
        argv += ["-b", str(backing_file), "-F", str(image_info(config, backing_file)["format"])]
    disk.file.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(disk.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        raise VmError(f"{vm.name}: {disk.file} (drive {disk.id}) exists already; qemu-bmc does not overwrite an "
                      "image (remove it first)") from None
    done = qemu_img(config, *argv, str(disk.file), *([size] if size else []))
    if done.returncode != 0:
        disk.file.unlink(missing_ok=True)
        raise VmError(f"{vm.name}: {done.stderr.strip() or f'qemu-img create failed with status {done.returncode}'}")
    return {"name": vm.name, "drive": disk.id, "file": str(disk.file), "created": True,
            "image": image_info(config, disk.file)}


def describe_image(disk: Disk, image: dict[str, Any] | None) -> str:
    if image is None:
        return f"{disk.id}: {disk.file}: no image"
    backing = image.get("full-backing-filename") or image.get("backing-filename")
    return (f"{disk.id}: {disk.file} ({image.get('format')}, virtual size {image.get('virtual-size')} bytes, "
            f"{image.get('actual-size')} bytes on disk" + (f", backing file {backing}" if backing else "") + ")")


def disk_command(args: argparse.Namespace, config: Config, vm: VmConfig) -> int:
    if args.disk_command == "create":
        disk = picked_disks(vm, args.drive, one=True)[0]
        result = create_disk(config, vm, disk, args.size, args.backing, args.format)
        print(json.dumps(result, indent=2) if args.json else f"created {describe_image(disk, result['image'])}")
        return 0
    for option in ("size", "backing", "format"):
        if getattr(args, option):
            raise VmError(f"vm disk info takes no {option}")
    disks = picked_disks(vm, args.drive, one=False)
    images = [image_info(config, disk.file) if disk.file.exists() else None for disk in disks]
    if args.json:
        print(json.dumps({"name": vm.name, "disks": [{"drive": disk.id, "file": str(disk.file), "format": disk.format,
                                                       "exists": image is not None, "image": image}
                                                      for disk, image in zip(disks, images, strict=True)]}, indent=2))
    for disk, image in [] if args.json else zip(disks, images, strict=True):
        print(describe_image(disk, image) + ("" if image else f" (qemu-bmc vm disk {vm.name} create SIZE"
                                             + (f" --drive {disk.id})" if len(disks) > 1 else ")")))
    return 0


# ---------------------------------------------------------------------- the commands


def selected(config: Config, args: argparse.Namespace) -> list[VmConfig]:
    names = [name for name, vm in config.vms.items() if vm.mode == "managed"] if args.all else args.names
    if not names:
        raise VmError("name the VMs (or --all)")
    return [vm_named(config, name) for name in names]


def vm_named(config: Config, name: str) -> VmConfig:
    if name not in config.vms:
        known = ", ".join(config.vms) or "none"
        raise VmError(f"no VM {name!r} in {config.path or 'the config'} (VMs: {known})")
    return config.vms[name]


async def each_with_progress(vms: list[VmConfig], verb: str, as_json: bool,
                             work: Callable[[VmConfig], Any]) -> list[dict[str, Any]]:
    """Run ``work`` on each VM, at most 8 at a time, with a progress bar on a terminal."""
    results: dict[str, dict[str, Any]] = {}
    limit = asyncio.Semaphore(8)
    show = not as_json and sys.stderr.isatty()
    progress = Progress(TextColumn(f"{verb} {{task.description}}"), BarColumn(), TextColumn("{task.completed}/"
                        "{task.total}"), TimeElapsedColumn(), console=Console(stderr=True), transient=True,
                        disable=not show)

    async def one(vm: VmConfig, task: Any) -> None:
        async with limit:
            try:
                results[vm.name] = await work(vm)
            except (VmError, BusError) as exc:
                results[vm.name] = {"name": vm.name, "error": str(exc)}
            progress.advance(task)

    with progress:
        task = progress.add_task(", ".join(vm.name for vm in vms[:4]) + (" ..." if len(vms) > 4 else ""),
                                 total=len(vms))
        await asyncio.gather(*(one(vm, task) for vm in vms))
    return [results[vm.name] for vm in vms]


def print_status(status: dict[str, Any]) -> None:
    pid = status["pid"]
    print(f"{status['name']}: {status['state']}" + (f" (pid {pid})" if pid else ""))
    for key, value in status["runtime"].items():
        print(f"  {key}: {value}")
    ports = ", ".join(f"{key} {value}" for key, value in status["ports"].items() if value)
    print(f"  ports: {ports or 'none'}")
    if status["cmdline"]:
        print(f"  cmdline: {shlex.join(status['cmdline'])}")
    for removed in status["stale_files_removed"]:
        print(f"  removed stale {removed}")


async def vm_command(args: argparse.Namespace, config: Config, url: str) -> int:
    """Runs one ``vm`` command; its exit status."""
    as_json = args.json
    try:
        if args.vm_command == "list":
            statuses = [vm_status(vm) for vm in config.vms.values()]
            if as_json:
                print(json.dumps(statuses, indent=2))
                return 0
            print(f"{'NAME':<20} {'MODE':<8} {'STATE':<9} {'PID':>8}  SSH    IPMI")
            for status in statuses:
                print(f"{status['name']:<20} {status['mode']:<8} {status['state']:<9} {status['pid'] or '-':>8}  "
                      f"{status['ports']['ssh'] or '-':<6} {status['ports']['ipmi'] or '-'}")
            return 0
        if args.vm_command == "status":
            status = vm_status(vm_named(config, args.name))
            print(json.dumps(status, indent=2)) if as_json else print_status(status)
            return 0
        if args.vm_command in ("start", "stop"):
            vms = selected(config, args)
            async with optional_bus(url) as nc:
                if args.vm_command == "start":
                    results = await each_with_progress(vms, "starting", as_json, lambda vm: start_vm(vm, nc))
                else:
                    results = await each_with_progress(vms, "stopping", as_json,
                                                       lambda vm: stop_vm(vm, nc, args.timeout))
            failed = [result for result in results if "error" in result]
            if as_json:
                print(json.dumps(results, indent=2))
            for result in [] if as_json else results:
                if "error" in result:
                    print(f"qemu-bmc: {result['error']}", file=sys.stderr)
                elif args.vm_command == "start":
                    print(f"{result['name']}: running (pid {result['pid']})" if result["pid"] else
                          f"{result['name']}: {result['state']}")
                else:
                    print(f"{result['name']}: stopped ({result['how']})")
            return 1 if failed else 0
        vm = vm_named(config, args.name)
        if args.vm_command == "disk":
            return disk_command(args, config, vm)
        if vm.ssh is None:
            raise VmError(f"{config.path}: {missing_ssh(vm)}")
        require_running(vm)
        ssh_config = str(write_ssh_config(vm))
        if args.vm_command == "ssh":
            command = args.remote_command[1:] if args.remote_command[:1] == ["--"] else args.remote_command
            return run_openssh(["ssh", "-F", ssh_config, vm.name, *command], as_json,
                               {"name": vm.name, "command": command})
        if args.vm_command == "put":
            source, destination = args.local, f"{vm.name}:{args.remote}"
        else:
            source, destination = f"{vm.name}:{args.remote}", args.local
        return run_openssh(["scp", "-F", ssh_config, "-r", "-q", source, destination], as_json,
                           {"name": vm.name, "source": source, "destination": destination})
    except VmError as exc:
        if as_json:
            print(json.dumps({"error": str(exc)}))
        print(f"qemu-bmc: {exc}", file=sys.stderr)
        return 1
