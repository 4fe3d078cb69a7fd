"""Boot override and virtual media, proven by which boot program the guest runs."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from conftest import Events, bmc_request, serial_log, toml_list, wait_for, write_config
from guest_images import GuestImages
from http_server import FileServer
from qemu_bmc_shared import subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.messages import (
    BootOverride,
    BootOverrideUpdate,
    MediaInsert,
    MediaStatus,
    PowerRequest,
    PowerStatus,
)


class Guest:
    """One managed machine and what its serial port printed."""

    def __init__(self, nc, directory: Path, name: str = "n1") -> None:
        self.nc, self.directory, self.name = nc, directory, name
        self.seen = 0

    def log(self) -> str:
        return serial_log(self.directory, self.name)

    async def power(self, action: str) -> PowerStatus:
        return await bmc_request(self.nc, self.name, subjects.POWER_SET, PowerRequest(action=action), PowerStatus,
                                 timeout=60)

    async def boot(self, **changes) -> BootOverride:
        return await bmc_request(self.nc, self.name, subjects.BOOT_SET, BootOverrideUpdate(**changes), BootOverride)

    async def boot_get(self) -> BootOverride:
        return await bmc_request(self.nc, self.name, subjects.BOOT_GET, None, BootOverride)

    async def media(self, image: str | None = None) -> MediaStatus:
        if image is None:
            return await bmc_request(self.nc, self.name, subjects.MEDIA_GET, None, MediaStatus)
        return await bmc_request(self.nc, self.name, subjects.MEDIA_INSERT, MediaInsert(image=image), MediaStatus,
                                 timeout=30)

    async def eject(self) -> MediaStatus:
        return await bmc_request(self.nc, self.name, subjects.MEDIA_EJECT, None, MediaStatus)

    async def next_boot(self, timeout: float = 30.0) -> str:
        """The marker of the next boot program that runs."""
        def marker() -> str | None:
            markers = re.findall(r"MARKER-[A-Z]+", self.log())
            return markers[self.seen] if len(markers) > self.seen else None

        found = await wait_for(marker, timeout=timeout, message="a boot marker")
        self.seen += 1
        return found


@pytest.fixture
async def guest(nc, services, short_dir: Path, images: GuestImages) -> Guest:
    config = write_config(short_dir, f"[vm.n1]\ncmd = {toml_list(images.qemu_args())}\n")
    await services("machine", config, "--stop-vms-on-exit")
    return Guest(nc, short_dir)


async def test_boot_override_reaches_the_guest(guest: Guest, images: GuestImages):
    events = await Events.subscribe(guest.nc, "n1")
    await guest.power("on")
    assert await guest.next_boot() == "MARKER-HDD"
    assert (await guest.media(str(images.iso))).inserted

    # Once: the next boot is from CD, the one after from disk again; Once is cleared when used
    assert await guest.boot(target="Cd", enabled="Once") == BootOverride(target="Cd", enabled="Once", mode="Legacy")
    await guest.power("reset")
    assert await guest.next_boot() == "MARKER-CD"
    await wait_for(lambda: any(e.cause == "used" for e in events.of("event.boot")), message="override used")
    assert (await guest.boot_get()).enabled == "Disabled"
    await guest.power("reset")
    assert await guest.next_boot() == "MARKER-HDD"

    # Continuous PXE: a real network boot (iPXE, DHCP and TFTP from QEMU's user network), twice
    await guest.boot(target="Pxe", enabled="Continuous")
    await guest.power("reset")
    assert await guest.next_boot(timeout=60) == "MARKER-PXE"
    await guest.power("reset")
    assert await guest.next_boot(timeout=60) == "MARKER-PXE"
    assert (await guest.boot_get()).enabled == "Continuous"

    # Disabled: back to the machine's own order
    await guest.boot(enabled="Disabled")
    await guest.power("reset")
    assert await guest.next_boot() == "MARKER-HDD"

    # From power off: the override is kept, applied when QEMU is launched, and the media held
    await guest.power("off")
    await guest.boot(target="Cd", enabled="Once")
    assert (await guest.media()).inserted
    await guest.power("on")
    assert await guest.next_boot() == "MARKER-CD"
    assert (await guest.boot_get()).enabled == "Disabled"


async def test_once_override_when_the_guest_reboots_itself(guest: Guest, images: GuestImages):
    """Ironic's flow: boot the deploy media once; when it reboots by itself, the disk boots."""
    await guest.power("on")
    assert await guest.next_boot() == "MARKER-HDD"
    events = await Events.subscribe(guest.nc, "n1")
    await guest.media(str(images.installer_iso))
    await guest.boot(target="Cd", enabled="Once")
    await guest.power("reset")
    assert await guest.next_boot() == "MARKER-INSTALLER"
    assert (await guest.boot_get()).enabled == "Disabled"
    assert await guest.next_boot() == "MARKER-HDD"  # the installer's own reboot comes up from disk
    assert (await guest.media()).inserted  # although its media is still in the drive
    assert (await bmc_request(guest.nc, "n1", subjects.POWER_GET, None, PowerStatus)).state == "On"
    assert not any(e.state == "Off" for e in events.of("event.power"))  # the held reboot never showed as Off


async def test_boot_override_with_uefi_firmware(nc, services, short_dir: Path, images: GuestImages):
    """The same override mechanism under OVMF: UEFI boot from CD, from the network, from disk."""
    config = write_config(short_dir, f"[vm.u1]\ncmd = {toml_list(images.qemu_args(uefi=True))}\n")
    await services("machine", config, "--stop-vms-on-exit")
    guest = Guest(nc, short_dir, "u1")
    assert (await guest.boot_get()).mode == "UEFI"
    await guest.media(str(images.iso))  # held by the BMC while off, inserted at launch
    await guest.boot(target="Cd", enabled="Once", mode="UEFI")
    await guest.power("on")
    assert await guest.next_boot(timeout=60) == "MARKER-CD"
    await guest.boot(target="Pxe", enabled="Once")
    await guest.power("reset")
    assert await guest.next_boot(timeout=90) == "MARKER-PXE"
    await guest.power("reset")
    assert await guest.next_boot(timeout=60) == "MARKER-HDD"


async def test_boot_override_survives_a_machine_service_restart(nc, services, short_dir: Path, images: GuestImages):
    config = write_config(short_dir, f"[vm.n1]\ncmd = {toml_list(images.qemu_args(nic=False))}\n")
    first = await services("machine", config)  # leaves the VM running when it stops
    guest = Guest(nc, short_dir)
    on = await guest.power("on")
    assert await guest.next_boot() == "MARKER-HDD"
    await guest.media(str(images.iso))
    await guest.boot(target="Cd", enabled="Once")
    await first.stop()

    await services("machine", config, "--stop-vms-on-exit")  # adopts the running QEMU
    status = await wait_for(lambda: _on(guest), message="adopted")
    assert status.pid == on.pid
    assert (await guest.boot_get()).target == "Cd"
    await guest.power("reset")
    assert await guest.next_boot() == "MARKER-CD"
    await guest.power("reset")
    assert await guest.next_boot() == "MARKER-HDD"


async def _on(guest: Guest) -> PowerStatus | None:
    status = await bmc_request(guest.nc, "n1", subjects.POWER_GET, None, PowerStatus)
    return status if status.state == "On" else None


async def test_virtual_media_from_http_and_refusals(guest: Guest, images: GuestImages, short_dir: Path):
    await guest.power("on")
    assert await guest.next_boot() == "MARKER-HDD"
    empty = await guest.media()
    assert not empty.inserted and empty.device == "qbmc-cd0"

    # refused before QEMU: not a file, not http(s)
    for image, error in ((str(short_dir / "missing.iso"), "bad_request"), ("ftp://host/x.iso", "bad_request")):
        with pytest.raises(BusError) as refused:
            await guest.media(image)
        assert refused.value.error == error
    assert not (await guest.media()).inserted

    with FileServer(images.iso.parent) as server, FileServer(images.iso.parent, ranges=False) as no_ranges:
        # refused by QEMU itself: a 404, and a server without byte ranges
        for url in (server.url("missing.iso"), no_ranges.url(images.iso.name)):
            with pytest.raises(BusError) as refused:
                await guest.media(url)
            assert refused.value.error == "qemu_error" and "CURL" in refused.value.message, refused.value
            assert not (await guest.media()).inserted

        inserted = await guest.media(server.url(images.iso.name))
        assert inserted.inserted and inserted.image == server.url(images.iso.name) and inserted.write_protected
        # a refused change keeps the media QEMU still has
        with pytest.raises(BusError):
            await guest.media(server.url("missing.iso"))
        assert (await guest.media()).image == server.url(images.iso.name)

        await guest.boot(target="Cd", enabled="Once")
        await guest.power("reset")
        assert await guest.next_boot() == "MARKER-CD"  # booted from the ISO over HTTP

    ejected = await guest.eject()
    assert not ejected.inserted and ejected.image is None
    await guest.boot(target="Cd", enabled="Once")
    await guest.power("reset")
    assert await guest.next_boot() == "MARKER-HDD"  # empty CD drive: the firmware falls through to disk


async def test_inventory(guest: Guest, nc):
    from qemu_bmc_shared.messages import Inventory

    off = await bmc_request(nc, "n1", subjects.INVENTORY_GET, None, Inventory)
    assert off.memory_mib == 64 and off.cpus == 1 and off.macs == ["52:54:00:12:34:56"]
    await guest.power("on")
    on = await bmc_request(nc, "n1", subjects.INVENTORY_GET, None, Inventory)
    assert on.uuid == off.uuid and on.uuid != "00000000-0000-0000-0000-000000000000"
    assert on.memory_mib == 64 and on.cpus == 1 and on.macs == ["52:54:00:12:34:56"] and on.firmware == "Legacy"
    uuid_file = guest.directory / "rt" / "vm" / "n1" / "uuid"
    assert uuid_file.read_text().strip() == on.uuid
    json.dumps(time.time())
