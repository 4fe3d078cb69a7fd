"""The hardware inventory Ironic inspects, through the Redfish service, from real QEMU machines:
sushy read as Ironic's redfish inspection reads it (processor summary, memory summary, simple
storage, storage drives and volumes, NIC MACs and their state) on a 2-socket, 1 GiB machine with
a SATA disk and a virtio disk of different sizes and two NICs, while it is off (never launched,
then after it ran) and while it runs, and on a diskless machine; redfishtool and DMTF's Tacklebox
(rf_sys_inventory.py) listing it; a NIC's link set down and up through InterfaceEnabled, kept
across power off and on and seen by the firmware's network boot. And what the machine service
reads of a command line QEMU never ran with, against what QEMU then has (QMP).

sushy is synchronous: its calls run in a thread (``asyncio.to_thread``)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import sushy
from conftest import free_tcp_port, serial_log, toml_list, wait_for, write_config
from guest_images import GuestImages
from qemu.qmp import ExecuteError, QMPClient
from qemu_bmc_machine import command_line, hardware
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.messages import (
    BootOverride,
    BootOverrideUpdate,
    Disk,
    PasswordSet,
    PowerStatus,
    User,
    UserAccessUpdate,
    UserUpdate,
)
from test_redfish import PASSWORD, USER, Service
from test_redfish_clients import redfishtool_json

GIB = 1 << 30
MACS = ("52:54:00:00:10:01", "52:54:00:00:10:02")
BARE_MAC = "52:54:00:00:20:01"
PXE_MAC = "52:54:00:12:34:56"  # guest_images' NIC
BIN = Path(sys.executable).parent


def big_machine(directory: Path) -> list[str]:
    """2 sockets of 2 cores, 1 GiB, a 2 GiB SATA disk (ide-hd on AHCI, raw) and a 3 GiB virtio disk
    (qcow2), a virtio-net and an e1000 NIC. Nothing bootable: the firmware tries each in turn."""
    raw, qcow2 = directory / "big-sata.raw", directory / "big-virtio.qcow2"
    with raw.open("wb") as image:
        image.truncate(2 * GIB)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "3G"], check=True)
    return ["-machine", "q35", "-accel", "tcg", "-m", "1G", "-smp", "sockets=2,cores=2,threads=1", "-display", "none",
            "-nodefaults", "-vga", "none",
            "-device", "ich9-ahci,id=sata", "-drive", f"if=none,id=d0,file={raw},format=raw",
            "-device", "ide-hd,drive=d0,bus=sata.0,id=disk0",
            "-drive", f"if=none,id=d1,file={qcow2},format=qcow2", "-device", "virtio-blk-pci,drive=d1,id=disk1",
            "-netdev", "user,id=n0,restrict=on", "-device", f"virtio-net-pci,netdev=n0,id=nic0,mac={MACS[0]}",
            "-netdev", "user,id=n1,restrict=on", "-device", f"e1000,netdev=n1,id=nic1,mac={MACS[1]}"]


BARE_MACHINE = ["-machine", "q35", "-accel", "tcg", "-m", "64", "-display", "none", "-nodefaults",
                "-device", f"e1000,id=lan0,mac={BARE_MAC}"]  # no disk; a NIC with no network behind it


@pytest.fixture
async def inventory(nc, services, short_dir: Path, images: GuestImages) -> Service:
    port = free_tcp_port()
    config = write_config(short_dir, f'[redfish]\nlisten = "127.0.0.1:{port}"\n'
                                     f'[vm.big]\ncmd = {toml_list(big_machine(short_dir))}\n'
                                     f'[vm.bare]\ncmd = {toml_list(BARE_MACHINE)}\n'
                                     f'[vm.net]\ncmd = {toml_list(images.qemu_args())}\n')
    await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD})
    await services("machine", config, "--stop-vms-on-exit")
    await services("redfish", config)
    return Service(nc, short_dir, f"https://127.0.0.1:{port}")


async def power(service: Service, machine: str) -> PowerStatus:
    return await bus.request(service.nc, machine, subjects.POWER_GET, None, PowerStatus)


def inspect(root: sushy.Sushy, machine: str) -> dict[str, Any]:
    """What Ironic's redfish inspection reads of a system (ironic.drivers.modules.redfish.inspect)."""
    system = root.get_system(f"/redfish/v1/Systems/{machine}")
    return {"cpus": system.processors.summary, "memory_gib": system.memory_summary.size_gib,
            "simple_storage": system.simple_storage.disks_sizes_bytes,
            "drives": system.storage.drives_sizes_bytes, "volumes": system.storage.volumes_sizes_bytes,
            "nics": system.ethernet_interfaces.summary}


def details(root: sushy.Sushy, machine: str) -> dict[str, Any]:
    """The rest of what sushy shows: processors, drives (protocol, serial), firmware."""
    system = root.get_system(f"/redfish/v1/Systems/{machine}")
    drives = sorted((drive.capacity_bytes, drive.protocol.value, drive.serial_number)
                    for storage in system.storage.get_members() for drive in storage.drives)
    return {"processors": sorted((cpu.identity, cpu.total_cores, cpu.total_threads, cpu.model)
                                 for cpu in system.processors.get_members()),
            "drives": drives, "bios": system.bios_version, "sku": system.sku,
            "controllers": sorted(protocol.value for storage in system.storage.get_members()
                                  for controller in storage.storage_controllers
                                  for protocol in controller.device_protocols)}


async def test_sushy_inspection_off_running_and_off_again(inventory: Service):
    call = asyncio.to_thread
    root = await call(sushy.Sushy, inventory.url, verify=False, auth=sushy.auth.BasicAuth(USER, PASSWORD))
    expected = {"cpus": (4, sushy.PROCESSOR_ARCH_x86), "memory_gib": 1, "simple_storage": [2 * GIB, 3 * GIB],
                "drives": [2 * GIB, 3 * GIB], "volumes": [2 * GIB, 3 * GIB],
                "nics": {MACS[0]: sushy.STATE_ENABLED, MACS[1]: sushy.STATE_ENABLED}}

    # never launched: what the command line says
    assert (await power(inventory, "big")).pid is None
    assert await call(inspect, root, "big") == expected
    never_run = await call(details, root, "big")
    qemu_cpu = "QEMU Virtual CPU version 2.5+"
    assert never_run["processors"] == [("CPU0", 2, 2, qemu_cpu), ("CPU1", 2, 2, qemu_cpu)]
    assert never_run["controllers"] == ["PCIe", "SATA"]
    assert [(size, protocol) for size, protocol, _ in never_run["drives"]] == [
        (2 * GIB, "SATA"), (3 * GIB, "PCIe")]
    assert never_run["bios"] and never_run["sku"].startswith("pc-q35-"), never_run

    # running: what QEMU has (the SATA disk's serial number is QEMU's own, which the command line does not say)
    system = await call(root.get_system, "/redfish/v1/Systems/big")
    await call(system.reset_system, sushy.RESET_ON)
    assert (await power(inventory, "big")).state == "On"
    assert await call(inspect, root, "big") == expected
    running = await call(details, root, "big")
    sata_serial = running["drives"][0][2]
    assert sata_serial and sata_serial.startswith("QM"), running
    assert {key: value for key, value in running.items() if key != "drives"} == \
        {key: value for key, value in never_run.items() if key != "drives"}

    # off again: the hardware of its last run (the serial number is still there)
    await call(system.reset_system, sushy.RESET_FORCE_OFF)
    status = await power(inventory, "big")
    assert (status.state, status.pid) == ("Off", None)
    assert await call(inspect, root, "big") == expected
    assert await call(details, root, "big") == running


async def test_diskless_machine(inventory: Service):
    root = await asyncio.to_thread(sushy.Sushy, inventory.url, verify=False, auth=sushy.auth.BasicAuth(USER, PASSWORD))
    assert await asyncio.to_thread(inspect, root, "bare") == {
        "cpus": (1, sushy.PROCESSOR_ARCH_x86), "memory_gib": 0, "simple_storage": [], "drives": [], "volumes": [],
        "nics": {BARE_MAC: sushy.STATE_ENABLED}}
    async with inventory.client() as client:
        system = (await client.get("/redfish/v1/Systems/bare")).json()
        assert system["MemorySummary"]["TotalSystemMemoryGiB"] == 0.062  # 64 MiB
        assert system["ProcessorSummary"] == {"Count": 1, "CoreCount": 1, "LogicalProcessorCount": 1,
                                              "Model": "QEMU Virtual CPU version 2.5+",
                                              "Status": {"State": "Enabled", "Health": "OK", "HealthRollup": "OK"}}
        for path in ("Storage", "SimpleStorage"):
            assert (await client.get(f"/redfish/v1/Systems/bare/{path}")).json()["Members"] == []
        nic = (await client.get("/redfish/v1/Systems/bare/EthernetInterfaces/lan0")).json()
        assert (nic["MACAddress"], nic["LinkStatus"], nic["SpeedMbps"]) == (BARE_MAC, "NoLink", 1000)
        missing = await client.get("/redfish/v1/Systems/bare/Storage/nothing")
        assert missing.status_code == 404 and missing.json()["error"]["code"].endswith("ResourceNotFound")


async def test_redfishtool_and_tacklebox_list_the_inventory(inventory: Service):
    processors = await redfishtool_json(inventory, "Systems", "-I", "big", "Processors")
    assert processors["Members@odata.count"] == 2
    cpu = await redfishtool_json(inventory, "Systems", "-I", "big", "Processors", "-i", "CPU1")
    assert (cpu["Socket"], cpu["TotalCores"], cpu["TotalThreads"], cpu["ProcessorArchitecture"],
            cpu["InstructionSet"]) == ("Socket 1", 2, 2, "x86", "x86-64")
    memory = await redfishtool_json(inventory, "raw", "GET", "/redfish/v1/Systems/big/Memory")
    modules = [await redfishtool_json(inventory, "raw", "GET", member["@odata.id"]) for member in memory["Members"]]
    assert sum(module["CapacityMiB"] for module in modules) == 1024
    assert {module["MemoryType"] for module in modules} == {"DRAM"}

    rhost = inventory.url
    process = await asyncio.create_subprocess_exec(
        str(BIN / "rf_sys_inventory.py"), "-u", USER, "-p", PASSWORD, "-r", rhost, "--details",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output = (await asyncio.wait_for(process.communicate(), 120))[0].decode()
    assert process.returncode == 0, output
    for text in ("Processor: CPU0", "Processor: CPU1", "1024MB Logical DRAM", "2GB SATA HDD", "3GB PCIe HDD",
                 "SATA Controller", "PCIe Controller"):
        assert text in output, (text, output)


async def test_interface_enabled_kept_across_power_off_and_on(inventory: Service):
    """The link set down through Redfish is down in every QEMU the machine starts: the firmware's
    PXE boot finds no link and falls through to the disk; set up again, it network-boots."""
    nic = "/redfish/v1/Systems/net/EthernetInterfaces/nic0"
    reset = "/redfish/v1/Systems/net/Actions/ComputerSystem.Reset"

    def markers(marker: str) -> int:
        return serial_log(inventory.directory, "net").count(marker)

    async with inventory.client() as client:
        response = await client.get(nic)
        assert response.status_code == 200 and "PATCH" in response.headers["Allow"]
        assert (response.json()["LinkStatus"], response.json()["InterfaceEnabled"]) == ("LinkUp", True)
        assert (await client.post(reset, json={"ResetType": "On"})).status_code == 204
        await wait_for(lambda: markers("MARKER-HDD") == 1, timeout=60, message="the guest booting from its disk")

        etag = (await client.get(nic)).headers["ETag"]
        response = await client.patch(nic, headers={"If-Match": etag}, json={"InterfaceEnabled": False})
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["LinkStatus"], body["InterfaceEnabled"], body["Status"]["State"]) == (
            "LinkDown", False, "Disabled")
        stale = await client.patch(nic, headers={"If-Match": etag}, json={"InterfaceEnabled": True})
        assert stale.status_code == 412

        # power off and on, with PXE first: the new QEMU has the link down before its firmware runs
        await bus.request(inventory.nc, "net", subjects.BOOT_SET,
                          BootOverrideUpdate(target="Pxe", enabled="Continuous"), BootOverride)
        assert (await client.post(reset, json={"ResetType": "ForceOff"})).status_code == 204
        assert (await client.get(nic)).json()["LinkStatus"] == "LinkDown"
        assert (await client.post(reset, json={"ResetType": "On"})).status_code == 204
        await wait_for(lambda: markers("MARKER-HDD") == 2, timeout=120,
                       message="PXE finding no link, then the disk booting")
        assert markers("MARKER-PXE") == 0
        root = await asyncio.to_thread(sushy.Sushy, inventory.url, verify=False,
                                       auth=sushy.auth.BasicAuth(USER, PASSWORD))
        assert (await asyncio.to_thread(inspect, root, "net"))["nics"] == {PXE_MAC: sushy.STATE_DISABLED}

        response = await client.patch(nic, json={"InterfaceEnabled": True})
        assert response.status_code == 200 and response.json()["LinkStatus"] == "LinkUp", response.text
        assert (await client.post(reset, json={"ResetType": "ForceRestart"})).status_code == 204
        await wait_for(lambda: markers("MARKER-PXE") == 1, timeout=90, message="the network boot")
        assert (await asyncio.to_thread(inspect, root, "net"))["nics"] == {PXE_MAC: sushy.STATE_ENABLED}


async def test_interface_patch_errors_and_privileges(inventory: Service):
    nic = "/redfish/v1/Systems/bare/EthernetInterfaces/lan0"
    await bus.request(inventory.nc, "bare", subjects.USERS_SET, UserUpdate(slot=4, name="viewer", enabled=True), User)
    await bus.request(inventory.nc, "bare", subjects.USERS_PASSWORD, PasswordSet(slot=4, password="view-only-1"), User)
    await bus.request(inventory.nc, "bare", subjects.USERS_ACCESS,
                      UserAccessUpdate(slot=4, channel=1, privilege=2, ipmi_messaging=True), User)
    async with inventory.client("viewer", "view-only-1") as viewer:
        assert (await viewer.get(nic)).status_code == 200
        response = await viewer.patch(nic, json={"InterfaceEnabled": False})
        assert response.status_code == 403 and "InsufficientPrivilege" in response.json()["error"]["code"]
    async with inventory.client() as client:
        for body, message_id in (({"MACAddress": "52:54:00:00:00:99"}, "PropertyNotWritable"),
                                 ({"Flavour": "x"}, "PropertyUnknown"),
                                 ({"InterfaceEnabled": "no"}, "PropertyValueTypeError"),
                                 ({}, "NoOperation")):
            response = await client.patch(nic, json=body)
            assert response.status_code == 400, (body, response.text)
            assert response.json()["error"]["@Message.ExtendedInfo"][0]["MessageId"].endswith(message_id)
        response = await client.patch("/redfish/v1/Systems/bare/EthernetInterfaces/nope",
                                      json={"InterfaceEnabled": False})
        assert response.status_code == 404
        assert (await client.get(nic)).json()["InterfaceEnabled"] is True  # nothing changed
    async with httpx.AsyncClient(base_url=inventory.url, verify=False) as anonymous:
        assert (await anonymous.patch(nic, json={"InterfaceEnabled": False})).status_code == 401


#: Command lines whose hardware the machine service reads without QEMU, each checked against QEMU.
COMMAND_LINES = {
    "q35, partial -smp, default NIC and drives by index, -nic": [
        "-machine", "q35", "-m", "128", "-smp", "4", "-cpu", "Skylake-Server-v1", "-drive", "file={raw},format=raw",
        "-drive", "file={qcow2}", "-drive", "file={raw2},if=virtio,format=raw", "-nic", "user,mac=52:54:00:aa:bb:cc",
        "-nic", "user"],
    "pc, CPUs left to plug, NUMA and a DIMM, -hda, -net nic": [
        "-machine", "pc", "-m", "512M,slots=2,maxmem=2G", "-smp", "cpus=3,maxcpus=4,sockets=2",
        "-object", "memory-backend-ram,id=m0,size=256M", "-object", "memory-backend-ram,id=m1,size=256M",
        "-numa", "node,memdev=m0,cpus=0-1", "-numa", "node,memdev=m1,cpus=2-3",
        "-object", "memory-backend-ram,id=dm,size=128M", "-device", "pc-dimm,id=dimm1,memdev=dm",
        "-hda", "{raw}", "-net", "nic,model=rtl8139", "-net", "user"],
    "-blockdev on NVMe, SCSI, SATA SSD, virtio-net speed, unconnected NIC": [
        "-machine", "q35", "-m", "128", "-nodefaults", "-smp", "sockets=2,cores=1,threads=2",
        "-blockdev", "driver=file,node-name=f0,filename={qcow2}", "-blockdev", "driver=qcow2,node-name=q0,file=f0",
        "-device", "nvme,drive=q0,serial=NV1,id=nvme0", "-device", "virtio-scsi-pci,id=scsi0",
        "-drive", "if=none,id=s0,file={raw},format=raw", "-device", "scsi-hd,drive=s0,bus=scsi0.0,id=sd0",
        "-device", "ich9-ahci,id=sata", "-drive", "if=none,id=s1,file={raw2},format=raw",
        "-device", "ide-hd,drive=s1,bus=sata.1,id=ssd,rotation_rate=1",
        "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,speed=2500,mac=52:54:00:00:00:33",
        "-device", "vmxnet3,id=spare"],
}


async def qemu_hardware(argv: list[str], directory: Path) -> dict[str, list[Any]]:
    """What the machine service reads over QMP of QEMU started (paused) with ``argv``."""
    socket = directory / "qmp.sock"
    process = await asyncio.create_subprocess_exec(
        *argv, "-qmp", f"unix:{socket},server=on,wait=off", "-S", "-display", "none", "-accel", "tcg",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    qmp = QMPClient("test")
    try:
        await wait_for(lambda: socket.exists(), message="QEMU's QMP socket")
        await qmp.connect(str(socket))

        async def execute(command: str, arguments: dict[str, Any] | None = None) -> Any:
            try:
                return await qmp.execute(command, arguments)
            except ExecuteError as exc:
                raise BusError("qemu_error", str(exc)) from None

        return {"processors": await hardware.read_processors(execute), "memory": await hardware.read_memory(execute),
                "disks": await hardware.read_disks(execute, set()), "nics": await hardware.read_nics(execute)}
    finally:
        with contextlib.suppress(Exception):
            await qmp.disconnect()
        process.kill()
        await process.wait()


def comparable(items: list[Any]) -> list[dict[str, Any]]:
    """Without what QEMU makes up and a command line does not say (disks' default serial numbers
    and models, the CPUID vendor), in id order."""
    rows = []
    for item in items:
        unknown = {"serial", "model"} if isinstance(item, Disk) else {"manufacturer"}
        rows.append({key: value for key, value in msgspec.structs.asdict(item).items() if key not in unknown})
    return sorted(rows, key=lambda row: str(row.get("id", row.get("socket"))))


@pytest.mark.parametrize("name", COMMAND_LINES)
async def test_command_line_reads_what_qemu_has(name: str, short_dir: Path):
    raw, raw2, qcow2 = short_dir / "a.raw", short_dir / "b.raw", short_dir / "c.qcow2"
    for path, size in ((raw, 96 << 20), (raw2, 64 << 20)):
        with path.open("wb") as image:
            image.truncate(size)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "200M"], check=True)
    argv = ["qemu-system-x86_64", *(arg.format(raw=raw, raw2=raw2, qcow2=qcow2) for arg in COMMAND_LINES[name])]
    described = await command_line.read(argv)
    running = await qemu_hardware(argv, short_dir)
    for part, found in running.items():
        assert found, part
        assert comparable(getattr(described, part)) == comparable(found), part
    assert described.machine_type.startswith("pc-q35-" if "q35" in argv else "pc-i440fx-")
