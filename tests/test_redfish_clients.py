"""Real Redfish clients against the Redfish service and real QEMU machines behind the machine service:
sushy (Ironic's library) with a session login, boot options, resets and virtual media, as Ironic's
redfish driver uses them; redfishtool (the DMTF's command line client) reading systems and resetting.

sushy is synchronous: each of its calls runs in a thread (``asyncio.to_thread``) so that the event
loop, which the bus requests of the test need, keeps running."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sushy  # Ironic's client (sushy.auth and sushy.exceptions come with it)
from conftest import serial_log, wait_for
from guest_images import GuestImages
from http_server import FileServer
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import BootOverride, MediaStatus
from test_redfish import PASSWORD, USER, Service, redfish  # noqa: F401

SYSTEM, MANAGER = "/redfish/v1/Systems/n1", "/redfish/v1/Managers/n1"
SESSIONS = "/redfish/v1/SessionService/Sessions"
REDFISHTOOL = Path(sys.executable).with_name("redfishtool")


@pytest.fixture
def files(images: GuestImages) -> Iterator[FileServer]:
    with FileServer(images.iso.parent) as server:
        yield server


def markers(service: Service, marker: str) -> int:
    return serial_log(service.directory, "n1").count(marker)


async def boot_override(service: Service) -> tuple[str, str, str]:
    override = await bus.request(service.nc, "n1", subjects.BOOT_GET, None, BootOverride)
    return override.target, override.enabled, override.mode


async def media(service: Service) -> MediaStatus:
    return await bus.request(service.nc, "n1", subjects.MEDIA_GET, None, MediaStatus)


async def session_members(service: Service) -> list[str]:
    async with service.client() as client:
        response = await client.get(SESSIONS)
        assert response.status_code == 200, response.text
        return [member["@odata.id"] for member in response.json()["Members"]]


def etag_retries(caplog: pytest.LogCaptureFixture) -> list[str]:
    """sushy's warnings when the service refused a PATCH's If-Match (it then retries without)."""
    return [record.getMessage() for record in caplog.records
            if record.name.startswith("sushy") and "eTag" in record.getMessage()]


async def test_sushy_ironic_flow(redfish: Service, files: FileServer, images: GuestImages,  # noqa: F811
                                 caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="sushy")
    call = asyncio.to_thread

    # session login (what Ironic does): POST to the Sessions collection, then X-Auth-Token
    auth = sushy.auth.SessionAuth(USER, PASSWORD)
    root = await call(sushy.Sushy, redfish.url, verify=False, auth=auth)
    token, session_uri = auth.get_session_key(), auth.get_session_resource_id()
    assert token, "sushy got no X-Auth-Token from POST /redfish/v1/SessionService/Sessions"
    assert session_uri and session_uri.startswith(f"{SESSIONS}/"), session_uri
    assert session_uri in await session_members(redfish)
    async with httpx.AsyncClient(base_url=redfish.url, verify=False, headers={"X-Auth-Token": token}) as by_token:
        response = await by_token.get(session_uri)
        assert response.status_code == 200 and response.json()["UserName"] == USER, response.text
    assert root.redfish_version and root.uuid
    session = await call(root.get_session, session_uri)
    assert session.username == USER

    system = await call(root.get_system, SYSTEM)
    assert (system.identity, system.power_state) == ("n1", sushy.POWER_STATE_OFF)
    assert sushy.BOOT_SOURCE_TARGET_PXE in system.get_allowed_system_boot_source_values()
    assert system.json["Boot"]["BootSourceOverrideMode@Redfish.AllowableValues"] == ["Legacy", "UEFI"]  # OVMF too
    assert {sushy.RESET_ON, sushy.RESET_FORCE_OFF, sushy.RESET_GRACEFUL_RESTART,
            sushy.RESET_FORCE_RESTART} <= system.get_allowed_reset_system_values()

    # boot options: PXE once in the firmware's own mode (SeaBIOS: Legacy), with the GET's ETag
    await call(system.set_system_boot_options, sushy.BOOT_SOURCE_TARGET_PXE,
               enabled=sushy.BOOT_SOURCE_ENABLED_ONCE, mode=sushy.BOOT_SOURCE_MODE_BIOS)
    assert not etag_retries(caplog), f"the PATCH with the ETag of the GET was refused: {etag_retries(caplog)}"
    assert await boot_override(redfish) == ("Pxe", "Once", "Legacy")
    await call(system.refresh)
    assert (system.boot.target, system.boot.enabled, system.boot.mode) == (
        sushy.BOOT_SOURCE_TARGET_PXE, sushy.BOOT_SOURCE_ENABLED_ONCE, sushy.BOOT_SOURCE_MODE_BIOS)
    # UEFI, Ironic's default boot mode: this SeaBIOS machine would be launched with OVMF; back to BIOS
    await call(system.set_system_boot_options, mode=sushy.BOOT_SOURCE_MODE_UEFI)
    assert await boot_override(redfish) == ("Pxe", "Once", "UEFI")
    await call(system.set_system_boot_options, mode=sushy.BOOT_SOURCE_MODE_BIOS)
    assert await boot_override(redfish) == ("Pxe", "Once", "Legacy")

    # resets: On (no NIC on this machine, so the PXE override falls through to the disk)
    await call(system.reset_system, sushy.RESET_ON)
    assert await redfish.power() == "On"
    await wait_for(lambda: markers(redfish, "MARKER-HDD") == 1, timeout=30, message="the guest booting")
    await call(system.refresh)
    assert system.power_state == sushy.POWER_STATE_ON
    assert system.boot.enabled == sushy.BOOT_SOURCE_ENABLED_DISABLED  # the Once override is used by that boot
    await call(system.reset_system, sushy.RESET_FORCE_OFF)
    assert await redfish.power() == "Off"
    await call(system.refresh)
    assert system.power_state == sushy.POWER_STATE_OFF
    await call(system.reset_system, sushy.RESET_ON)
    await wait_for(lambda: markers(redfish, "MARKER-HDD") == 2, timeout=30, message="the guest booting again")
    await call(system.reset_system, sushy.RESET_GRACEFUL_RESTART)
    await wait_for(lambda: markers(redfish, "MARKER-HDD") == 3, timeout=30,
                   message="graceful restart: ACPI shutdown, then on")
    assert await redfish.power() == "On"

    # virtual media through sushy's API, under the System (where sushy 5 looks first)
    url = files.url(images.iso.name)
    collection = await call(lambda: system.virtual_media)
    assert collection.members_identities == (f"{SYSTEM}/VirtualMedia/Cd",)
    cd = await call(collection.get_member, f"{SYSTEM}/VirtualMedia/Cd")
    assert (cd.identity, cd.inserted, cd.image) == ("Cd", False, None)
    assert sushy.VIRTUAL_MEDIA_CD in cd.media_types
    await call(cd.insert_media, url, inserted=True, write_protected=True)
    status = await media(redfish)
    assert status.inserted and status.image == url
    await call(cd.refresh)
    assert (cd.inserted, cd.image, cd.image_name, cd.write_protected) == (True, url, images.iso.name, True)
    assert cd.connected_via == sushy.CONNECTED_VIA_URI
    manager = await call(root.get_manager, MANAGER)
    manager_cd = await call(manager.virtual_media.get_member, f"{MANAGER}/VirtualMedia/Cd")
    assert (manager_cd.inserted, manager_cd.image) == (True, url)

    caplog.clear()
    system = await call(root.get_system, SYSTEM)  # fresh, as Ironic gets it for each step
    await call(system.set_system_boot_options, sushy.BOOT_SOURCE_TARGET_CD,
               enabled=sushy.BOOT_SOURCE_ENABLED_ONCE, mode=sushy.BOOT_SOURCE_MODE_BIOS)
    assert not etag_retries(caplog), f"the PATCH with the ETag of the GET was refused: {etag_retries(caplog)}"
    assert await boot_override(redfish) == ("Cd", "Once", "Legacy")
    await call(system.reset_system, sushy.RESET_FORCE_RESTART)
    await wait_for(lambda: markers(redfish, "MARKER-CD") == 1, timeout=30, message="the guest booting the ISO")
    assert markers(redfish, "MARKER-HDD") == 3
    assert (await boot_override(redfish))[1] == "Disabled"  # used by the ISO's boot

    await call(cd.eject_media)
    assert not (await media(redfish)).inserted
    await call(cd.refresh)
    assert (cd.inserted, cd.image) == (False, None)

    await call(system.reset_system, sushy.RESET_FORCE_OFF)
    assert await redfish.power() == "Off"

    # logout: sushy DELETEs its session, the token stops working
    await call(auth.close)
    assert session_uri not in await session_members(redfish)
    async with httpx.AsyncClient(base_url=redfish.url, verify=False, headers={"X-Auth-Token": token}) as by_token:
        assert (await by_token.get(SYSTEM)).status_code == 401


async def redfishtool(service: Service, *args: str) -> tuple[int, str, str]:
    """Runs redfishtool against the service over HTTPS (it does not verify the certificate)."""
    rhost = service.url.removeprefix("https://")
    process = await asyncio.create_subprocess_exec(
        str(REDFISHTOOL), "-r", rhost, "-u", USER, "-p", PASSWORD, "-S", "Always", "-T", "60", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 90)
    return process.returncode or 0, stdout.decode(), stderr.decode()


async def redfishtool_json(service: Service, *args: str) -> Any:
    code, out, err = await redfishtool(service, *args)
    assert code == 0, (args, code, out, err)
    return json.loads(out)


async def test_redfishtool_reads_systems_and_resets(redfish: Service):  # noqa: F811
    root = await redfishtool_json(redfish, "root")
    assert root["Systems"] == {"@odata.id": "/redfish/v1/Systems"}
    systems = await redfishtool_json(redfish, "Systems")
    assert systems["Members"] == [{"@odata.id": SYSTEM}]
    system = await redfishtool_json(redfish, "Systems", "-I", "n1")
    assert (system["@odata.id"], system["Id"], system["PowerState"]) == (SYSTEM, "n1", "Off")
    assert await redfishtool_json(redfish, "Systems", "-1", "-P", "PowerState") == {"PowerState": "Off"}

    code, out, err = await redfishtool(redfish, "Systems", "-I", "n1", "reset", "On")
    assert code == 0, (out, err)
    assert await redfish.power() == "On"
    await wait_for(lambda: markers(redfish, "MARKER-HDD") == 1, timeout=30, message="the guest booting")
    system = await redfishtool_json(redfish, "Systems", "-I", "n1")
    assert system["PowerState"] == "On"

    # a reset type the service does not list is refused by redfishtool itself (it reads AllowableValues)
    allowed = system["Actions"]["#ComputerSystem.Reset"]["ResetType@Redfish.AllowableValues"]
    unlisted = [kind for kind in ("PushPowerButton", "PowerCycle", "Nmi") if kind not in allowed]
    if unlisted:
        code, out, err = await redfishtool(redfish, "Systems", "-I", "n1", "reset", unlisted[0])
        assert code != 0 and "AllowableValues" in err, (code, out, err)
        assert await redfish.power() == "On"

    # the same with a session (-A Session): login, the reset, logout
    code, out, err = await redfishtool(redfish, "-A", "Session", "Systems", "-I", "n1", "reset", "ForceOff")
    assert code == 0 and "Logout" not in err, (out, err)
    assert await redfish.power() == "Off"
    assert await redfishtool_json(redfish, "-A", "Session", "Systems", "-L", SYSTEM, "-P", "PowerState") == {
        "PowerState": "Off"}
    assert await session_members(redfish) == [], "redfishtool's sessions are still there after its logout"
