"""Boot overrides on any command line, as orchestrators use them: a machine that direct-boots a
kernel (``-kernel``: its option ROM holds boot index 0) and one whose disk has its own bootindex,
over Redfish (Ironic, Metal3) and IPMI (ipmitool's chassis bootdev); the guest's marker says which
boot program ran, and the machine always powers on."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import httpx
import pytest
from clients import ipmitool
from conftest import (
    INTERNAL_TARGETS,
    ServiceProcess,
    free_tcp_port,
    free_udp_port,
    serial_log,
    toml_list,
    wait_for,
    write_config,
)
from guest_images import GuestImages
from http_server import FileServer
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.config import parse
from qemu_bmc_shared.launcher import firmwares
from qemu_bmc_shared.messages import BootOverride, PowerStatus

USER, PASSWORD = "admin", "s3cret-Pass"
SYSTEM = "/redfish/v1/Systems/n1"


class Lab:
    """One machine behind the state, machine, IPMI over LAN and Redfish services."""

    def __init__(self, nc, directory: Path, url: str, ipmi_port: int, machine: ServiceProcess) -> None:
        self.nc, self.directory, self.url, self.ipmi_port, self.machine = nc, directory, url, ipmi_port, machine
        self.seen = 0

    def markers(self) -> list[str]:
        return re.findall(r"MARKER-[A-Z]+", serial_log(self.directory, "n1"))

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, auth=(USER, PASSWORD), verify=False, timeout=90)

    async def patch_boot(self, **boot: str) -> httpx.Response:
        async with self.client() as client:
            return await client.patch(SYSTEM, json={"Boot": boot})

    async def reset(self, reset_type: str) -> None:
        async with self.client() as client:
            response = await client.post(f"{SYSTEM}/Actions/ComputerSystem.Reset", json={"ResetType": reset_type})
            assert response.status_code == 204, response.text

    async def system(self) -> dict:
        async with self.client() as client:
            response = await client.get(SYSTEM)
            assert response.status_code == 200, response.text
            return response.json()

    async def power(self) -> str:
        return (await bus.request(self.nc, "n1", subjects.POWER_GET, None, PowerStatus)).state

    async def power_is(self, state: str) -> bool:
        try:
            return await self.power() == state
        except BusError:  # no machine service on the bus for a moment
            return False

    async def override(self) -> BootOverride:
        return await bus.request(self.nc, "n1", subjects.BOOT_GET, None, BootOverride)

    async def next_boot(self, timeout: float = 90.0) -> str:
        """The marker of the next boot program that runs."""
        def marker() -> str | None:
            markers = self.markers()
            return markers[self.seen] if len(markers) > self.seen else None

        found = await wait_for(marker, timeout=timeout, message="a boot marker")
        self.seen += 1
        return found


async def start_lab(nc, services, directory: Path, cmd: list[str], extra: str = "", stop_vms: bool = True) -> Lab:
    """``extra``: more keys of the machine's table. ``stop_vms``: the machine service powers the
    machine off when it stops."""
    port, ipmi_port = free_tcp_port(), free_udp_port()
    config = write_config(directory, f'[redfish]\nlisten = "127.0.0.1:{port}"\n{INTERNAL_TARGETS}'
                                     f'[vm.n1]\ncmd = {toml_list(cmd)}\nipmi = "127.0.0.1:{ipmi_port}"\n{extra}')
    env = {"IPMI_USER": USER, "IPMI_PASS": PASSWORD}
    await services("state", config, env=env)
    machine = await services("machine", config, *(["--stop-vms-on-exit"] if stop_vms else []))
    await services("ipmi-lan", config)
    await services("redfish", config)
    return Lab(nc, directory, f"https://127.0.0.1:{port}", ipmi_port, machine)


@pytest.fixture
def files(images: GuestImages):
    with FileServer(images.iso.parent) as server:
        yield server


async def test_override_on_a_direct_kernel_boot_machine(nc, services, short_dir: Path, images: GuestImages,
                                                         files: FileServer):
    """-kernel holds boot index 0: an override to a device is still what the next boot runs
    (QEMU is launched without the kernel for it), and the kernel comes back after it."""
    lab = await start_lab(nc, services, short_dir, images.qemu_args(kernel=True))

    # an override stored while the machine is off never stops it from powering on
    response = await lab.patch_boot(BootSourceOverrideTarget="Pxe", BootSourceOverrideEnabled="Once")
    assert response.status_code == 200, response.text
    await lab.reset("On")
    assert await lab.next_boot() == "MARKER-PXE"
    assert await lab.power() == "On"
    assert (await lab.override()).enabled == "Disabled"  # used by that boot
    await lab.reset("ForceRestart")
    assert await lab.next_boot() == "MARKER-KERNEL"  # the machine's own first boot entry again

    # Continuous disk while it runs, two boots; then Disabled: the kernel again
    response = await lab.patch_boot(BootSourceOverrideTarget="Hdd", BootSourceOverrideEnabled="Continuous")
    assert response.status_code == 200, response.text
    await lab.reset("ForceRestart")
    assert await lab.next_boot() == "MARKER-HDD"
    await lab.reset("PowerCycle")
    assert await lab.next_boot() == "MARKER-HDD"
    assert (await lab.override()).enabled == "Continuous"

    # virtual media, once, as Ironic's redfish-virtualmedia boots its deploy ISO
    async with lab.client() as client:
        response = await client.post(f"{SYSTEM}/VirtualMedia/Cd/Actions/VirtualMedia.InsertMedia",
                                     json={"Image": files.url(images.iso.name), "Inserted": True})
        assert response.status_code in (200, 204), response.text
    response = await lab.patch_boot(BootSourceOverrideTarget="Cd", BootSourceOverrideEnabled="Once")
    assert response.status_code == 200, response.text
    await lab.reset("ForceRestart")
    assert await lab.next_boot() == "MARKER-CD"
    await lab.reset("ForceRestart")
    assert await lab.next_boot() == "MARKER-KERNEL"  # the Once CD replaced the Continuous disk: none left

    # IPMI: ipmitool's bootdev (0xFF before), then the BMC's reset over IPMI
    code, output = await ipmitool(lab.ipmi_port, "chassis", "bootdev", "pxe", user=USER, password=PASSWORD)
    assert code == 0, output
    code, output = await ipmitool(lab.ipmi_port, "chassis", "power", "reset", user=USER, password=PASSWORD)
    assert code == 0, output
    assert await lab.next_boot() == "MARKER-PXE"
    assert (await lab.system())["PowerState"] == "On"


async def test_override_with_a_disk_bootindex(nc, services, short_dir: Path, images: GuestImages):
    """The disk has bootindex=1 on the command line; every target, Once and Continuous."""
    lab = await start_lab(nc, services, short_dir, images.qemu_args())
    await lab.reset("On")
    assert await lab.next_boot() == "MARKER-HDD"
    for target, marker in (("Pxe", "MARKER-PXE"), ("Hdd", "MARKER-HDD")):
        response = await lab.patch_boot(BootSourceOverrideTarget=target, BootSourceOverrideEnabled="Once")
        assert response.status_code == 200, response.text
        await lab.reset("ForceRestart")
        assert await lab.next_boot() == marker
        assert (await lab.override()).enabled == "Disabled"
    response = await lab.patch_boot(BootSourceOverrideTarget="Pxe", BootSourceOverrideEnabled="Continuous")
    assert response.status_code == 200, response.text
    for _ in range(2):
        await lab.reset("ForceRestart")
        assert await lab.next_boot() == "MARKER-PXE"
    # UEFI boot options: one-time BootNext and a UEFI device path target, each a single device
    async with lab.client() as client:
        listed = (await client.get(f"{SYSTEM}/BootOptions")).json()["Members"]
        options = [(await client.get(member["@odata.id"])).json() for member in listed]
    by_alias = {option["Alias"]: option for option in options}
    assert set(by_alias) == {"Pxe", "Hdd", "Cd"}, options
    assert by_alias["Pxe"]["UefiDevicePath"].startswith("PciRoot(0x0)/Pci(") and \
        by_alias["Pxe"]["UefiDevicePath"].endswith("/MAC(525400123456,0x1)")
    assert (await lab.system())["Boot"]["BootOrder"] == [by_alias["Hdd"]["BootOptionReference"]]  # bootindex=1
    response = await lab.patch_boot(BootSourceOverrideTarget="UefiBootNext", BootSourceOverrideEnabled="Once",
                                    BootNext=by_alias["Hdd"]["BootOptionReference"])
    assert response.status_code == 200, response.text
    await lab.reset("ForceRestart")
    assert await lab.next_boot() == "MARKER-HDD"
    response = await lab.patch_boot(BootSourceOverrideTarget="UefiTarget", BootSourceOverrideEnabled="Once",
                                    UefiTargetBootSourceOverride=by_alias["Pxe"]["UefiDevicePath"])
    assert response.status_code == 200, response.text
    await lab.reset("ForceRestart")
    assert await lab.next_boot() == "MARKER-PXE"
    assert (await lab.override()).enabled == "Disabled"
    for bad in ({"BootNext": "Boot0F0F"}, {"UefiTargetBootSourceOverride": "PciRoot(0x9)"},
                {"BootSourceOverrideTarget": "UefiBootNext", "BootSourceOverrideEnabled": "Continuous"}):
        response = await lab.patch_boot(**bad)
        assert response.status_code == 400, (bad, response.text)

    # ForceRestart of a machine that is off powers it on (DMTF's power control checker expects On)
    await lab.reset("ForceOff")
    assert await lab.power() == "Off"
    await lab.reset("ForceRestart")
    assert await lab.next_boot() == "MARKER-HDD"  # the one-time UEFI target was the last override
    assert await lab.power() == "On"


async def test_boot_mode_switch_reaches_the_guest(nc, services, short_dir: Path, images: GuestImages,
                                                  files: FileServer):
    """A SeaBIOS machine booted in UEFI mode (OVMF, its variables kept in the runtime directory) and
    back, over Redfish and over IPMI's boot flags; the CD says in which mode it was booted, and
    Redfish and IPMI agree on the mode."""
    lab = await start_lab(nc, services, short_dir, images.qemu_args(disk=False, nic=False))
    boot = (await lab.system())["Boot"]
    assert boot["BootSourceOverrideMode"] == "Legacy"
    assert boot["BootSourceOverrideMode@Redfish.AllowableValues"] == ["Legacy", "UEFI"]
    async with lab.client() as client:
        response = await client.post(f"{SYSTEM}/VirtualMedia/Cd/Actions/VirtualMedia.InsertMedia",
                                     json={"Image": files.url(images.mode_iso.name), "Inserted": True})
        assert response.status_code in (200, 204), response.text

    response = await lab.patch_boot(BootSourceOverrideTarget="Cd", BootSourceOverrideEnabled="Continuous",
                                    BootSourceOverrideMode="UEFI")
    assert response.status_code == 200, response.text
    await lab.reset("On")
    assert await lab.next_boot(timeout=180) == "MARKER-UEFI"
    code, output = await ipmitool(lab.ipmi_port, "chassis", "bootparam", "get", "5", user=USER, password=PASSWORD)
    assert code == 0 and "BIOS EFI boot" in output, output
    variables = short_dir / "rt" / "vm" / "n1" / "ovmf-vars.fd"
    assert variables.stat().st_size > 0

    # ipmitool's bootdev without efiboot asks for a PC compatible (Legacy) boot
    code, output = await ipmitool(lab.ipmi_port, "chassis", "bootdev", "cdrom", "options=persistent",
                                  user=USER, password=PASSWORD)
    assert code == 0, output
    boot = (await lab.system())["Boot"]
    assert (boot["BootSourceOverrideMode"], boot["BootSourceOverrideTarget"]) == ("Legacy", "Cd")
    await lab.reset("ForceRestart")
    assert await lab.next_boot() == "MARKER-LEGACY"
    code, output = await ipmitool(lab.ipmi_port, "chassis", "bootparam", "get", "5", user=USER, password=PASSWORD)
    assert code == 0 and "BIOS PC Compatible (legacy) boot" in output, output

    code, output = await ipmitool(lab.ipmi_port, "chassis", "bootdev", "cdrom", "options=persistent,efiboot",
                                  user=USER, password=PASSWORD)
    assert code == 0, output
    assert (await lab.system())["Boot"]["BootSourceOverrideMode"] == "UEFI"
    await lab.reset("ForceRestart")
    assert await lab.next_boot(timeout=180) == "MARKER-UEFI"
    assert variables.exists()  # the same NVRAM across boots


def test_boot_modes_a_machine_can_have(tmp_path: Path):
    """Both modes when qemu-bmc can give the machine the other firmware, else its own only."""
    def vm(cmd: list[str]):
        return parse({"vm": {"a": {"cmd": cmd}}}, tmp_path / "qemu-bmc.toml").vms["a"]

    assert firmwares(vm(["-m", "64"])) == ["Legacy", "UEFI"]
    assert firmwares(dataclasses.replace(vm(["-m", "64"]), ovmf=None)) == ["Legacy"]  # no OVMF installed
    assert firmwares(vm(["-drive", "if=pflash,format=raw,readonly=on,file=/x/OVMF_CODE.fd"])) == ["UEFI", "Legacy"]
    assert firmwares(vm(["-machine", "q35,pflash0=code"])) == ["UEFI"]
