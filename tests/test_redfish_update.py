"""UpdateService SimpleUpdate of a machine's system firmware, against the real services, a real
QEMU machine and sushy (what Ironic's firmware interface calls): the image served over HTTP by a
local server, the machine's next boot really running it (QEMU's command line, the guest booting),
FirmwareInventory showing its version; the way back to the distribution's firmware; OVMF for UEFI;
and the refusals, after which nothing changed.

The "new firmware" is the distribution's SeaBIOS with another version string (SeaBIOS has no
checksum of its own: it boots as before, and tells the new version)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import sushy
from conftest import INTERNAL_TARGETS, free_tcp_port, serial_log, toml_list, wait_for, write_config
from guest_images import OVMF_VARS, GuestImages
from http_server import FileServer
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import PasswordSet, PowerStatus, User, UserAccessUpdate, UserUpdate
from test_redfish import PASSWORD, USER, Service

SEABIOS = Path("/usr/share/seabios/bios-256k.bin")
OVMF_CODE_4M = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_CODE_4M_SECURE = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
OVMF_CODE_2M = Path("/usr/share/OVMF/OVMF_CODE.fd")
NEW_VERSION = "1.99.0-qemu-bmc-update"
"""The new image's version (as long as the distribution's: cut or padded with zeros)."""
SYSTEM = "/redfish/v1/Systems/n1"
SERVICE = "/redfish/v1/UpdateService"
BIOS = f"{SERVICE}/FirmwareInventory/BIOS-n1"
ACTION = f"{SERVICE}/Actions/UpdateService.SimpleUpdate"


def new_seabios(path: Path, version: str) -> str:
    """The distribution's SeaBIOS (whose version is ``version``) with another version string; that one."""
    image = SEABIOS.read_bytes()
    old = b"\0" + version.encode() + b"\0"
    assert image.count(old) == 1, f"{version} is not the version string of {SEABIOS}"
    new = NEW_VERSION[:len(version)].ljust(len(version), "0")
    path.write_bytes(image.replace(old, b"\0" + new.encode() + b"\0"))
    return new


@pytest.fixture
def firmware_files(short_dir: Path) -> Iterator[tuple[Path, FileServer]]:
    directory = short_dir / "www"
    directory.mkdir()
    with FileServer(directory) as server:
        yield directory, server


def qemu_command(directory: Path, machine: str = "n1") -> str:
    """The command line of the machine's QEMU (/proc), its arguments separated by spaces."""
    pid = int((directory / "rt" / "vm" / machine / "qemu.pid").read_text())
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().replace("\0", " ")


async def start(nc, services, short_dir: Path, cmd: list[str], qemu: str = "") -> Service:
    port = free_tcp_port()
    config = write_config(short_dir, f'{qemu}[redfish]\nlisten = "127.0.0.1:{port}"\n{INTERNAL_TARGETS}'
                                     f'[vm.n1]\ncmd = {toml_list(cmd)}\n')
    await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD})
    await services("machine", config, "--stop-vms-on-exit")
    await services("redfish", config)
    return Service(nc, short_dir, f"https://127.0.0.1:{port}")


async def get(service: Service, path: str) -> Any:
    async with service.client() as client:
        response = await client.get(path)
        assert response.status_code == 200, (path, response.text)
        return response.json()


async def reset(service: Service, reset_type: str) -> None:
    async with service.client() as client:
        response = await client.post(f"{SYSTEM}/Actions/ComputerSystem.Reset", json={"ResetType": reset_type})
        assert response.status_code == 204, response.text


async def power(service: Service) -> str:
    return (await bus.request(service.nc, "n1", subjects.POWER_GET, None, PowerStatus)).state


def installed(service: Service) -> list[str]:
    return sorted(path.name for path in (service.directory / "rt" / "vm" / "n1" / "firmware").glob("*.fd"))


async def sushy_update(service: Service, url: str, **options: Any) -> Any:
    """sushy's simple_update, as Ironic's firmware interface calls it, then what Ironic polls: the
    task monitor, then the Task."""
    def update() -> Any:
        auth = sushy.auth.SessionAuth(USER, PASSWORD)
        root = sushy.Sushy(service.url, verify=False, auth=auth)
        try:
            monitor = root.get_update_service().simple_update(url, **options)
            assert not monitor.is_processing
            polled = root.get_task_monitor(monitor.task_monitor_uri)
            assert not polled.is_processing
            return polled.get_task()
        finally:
            auth.close()  # now, not when the garbage collector runs (its retries would block the event loop)

    return await asyncio.to_thread(update)


async def test_simple_update_of_seabios_through_sushy(nc, services, short_dir: Path, images: GuestImages,
                                                      firmware_files: tuple[Path, FileServer]):
    www, files = firmware_files
    shutil.copyfile(SEABIOS, www / "debian-bios.bin")
    service = await start(nc, services, short_dir, images.qemu_args(nic=False))
    old_version = (await get(service, BIOS))["Version"]
    new_version = new_seabios(www / "new-bios.bin", old_version)

    update_service = await get(service, SERVICE)
    assert update_service["ServiceEnabled"] is True
    action = update_service["Actions"]["#UpdateService.SimpleUpdate"]
    assert action["target"] == ACTION
    info = await get(service, action["@Redfish.ActionInfo"])
    parameters = {parameter["Name"]: parameter for parameter in info["Parameters"]}
    assert set(parameters) == {"ImageURI", "Targets", "TransferProtocol", "Username", "Password"}
    assert parameters["ImageURI"]["Required"] and parameters["TransferProtocol"]["AllowableValues"] == ["HTTP", "HTTPS"]
    assert BIOS in parameters["Targets"]["AllowableValues"]
    bios = await get(service, BIOS)
    assert (bios["Manufacturer"], bios["Version"], bios["Updateable"]) == ("SeaBIOS", old_version, True)
    bmc = await get(service, f"{SERVICE}/FirmwareInventory/BMC")
    assert bmc["Updateable"] is False

    await reset(service, "On")
    await wait_for(lambda: "MARKER-HDD" in serial_log(short_dir, "n1"), timeout=30, message="the guest booting")
    assert "-bios" not in qemu_command(short_dir)

    # Ironic's call: the system as the target, TransferProtocol HTTP; a completed Task
    task = await sushy_update(service, files.url("new-bios.bin"), targets=[SYSTEM],
                              transfer_protocol="HTTP")
    assert (task.task_state, task.task_status) == (sushy.TASK_STATE_COMPLETED, sushy.HEALTH_OK)
    assert {"@odata.id": task.path} in (await get(service, "/redfish/v1/TaskService/Tasks"))["Members"]
    assert new_version in (await get(service, task.path))["Description"]
    assert len(installed(service)) == 1
    assert (await get(service, BIOS))["Version"] == old_version  # the running boot has the old firmware

    # a flashed BIOS runs from the next boot on: QEMU is launched again with the image
    await reset(service, "ForceRestart")
    await wait_for(lambda: serial_log(short_dir, "n1").count("MARKER-HDD") == 2, timeout=60,
                   message="the guest booting with the new firmware")
    assert f"-bios {service.directory / 'rt' / 'vm' / 'n1' / 'firmware' / installed(service)[0]}" \
        in qemu_command(short_dir)
    assert (await get(service, BIOS))["Version"] == (await get(service, SYSTEM))["BiosVersion"] == new_version
    assert await power(service) == "On"

    # the way back: the distribution's own image removes the update (the target as the inventory item)
    task = await sushy_update(service, files.url("debian-bios.bin"), targets=[BIOS])
    assert task.task_state == sushy.TASK_STATE_COMPLETED
    assert installed(service) == []
    await reset(service, "ForceRestart")
    await wait_for(lambda: serial_log(short_dir, "n1").count("MARKER-HDD") == 3, timeout=60,
                   message="the guest booting with the distribution's firmware")
    assert "-bios" not in qemu_command(short_dir)
    assert (await get(service, BIOS))["Version"] == old_version


class Quiet(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class Redirect(Quiet):
    """Answers every GET with a redirect to a local file."""

    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", "file:///etc/passwd")
        self.send_header("Content-Length", "0")
        self.end_headers()


class Protected(Quiet):
    """Serves ``image`` to the user fw (password s3cret) only (HTTP Basic)."""

    image = b""

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != "Basic " + base64.b64encode(b"fw:s3cret").decode():
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="firmware"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.image)))
        self.end_headers()
        self.wfile.write(self.image)


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A local HTTP server answering with ``handler``; the URL of an image on it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/bios.bin"
    finally:
        server.shutdown()
        server.server_close()


def message_ids(response: httpx.Response) -> list[str]:
    return [info["MessageId"].rsplit(".", 1)[1] for info in response.json()["error"]["@Message.ExtendedInfo"]]


async def test_refusals_change_nothing(nc, services, short_dir: Path, images: GuestImages,
                                       firmware_files: tuple[Path, FileServer]):
    www, files = firmware_files
    (www / "random.bin").write_bytes(bytes(range(256)) * 1024)  # 256 KiB, no reset vector
    (www / "huge.bin").write_bytes(b"\xff" * (9 << 20))
    shutil.copyfile(OVMF_CODE_4M, www / "ovmf-code.fd")  # UEFI firmware; the machine boots Legacy
    service = await start(nc, services, short_dir, images.qemu_args(nic=False))
    before = await get(service, BIOS)
    new_version = new_seabios(www / "new-bios.bin", before["Version"])
    Protected.image = (www / "new-bios.bin").read_bytes()
    await bus.request(nc, "n1", subjects.USERS_SET, UserUpdate(slot=4, name="viewer", enabled=True), User)
    await bus.request(nc, "n1", subjects.USERS_PASSWORD, PasswordSet(slot=4, password="view-only-1"), User)
    await bus.request(nc, "n1", subjects.USERS_ACCESS,
                      UserAccessUpdate(slot=4, channel=1, privilege=2, ipmi_messaging=True), User)
    async with service.client("viewer", "view-only-1") as viewer:
        response = await viewer.post(ACTION, json={"ImageURI": files.url("new-bios.bin")})
        assert response.status_code == 403 and "InsufficientPrivilege" in response.text
        response = await viewer.post(ACTION, json={"ImageURI": 42})
        assert response.status_code == 403, response.text  # before anything else

    with serving(Redirect) as redirect, serving(Protected) as protected:
        await refuse_all(service, files, redirect, protected)
    assert installed(service) == []
    assert await get(service, BIOS) == before
    assert not list((service.directory / "rt" / "vm" / "n1" / "firmware").glob(".download-*"))

    # a URI without a scheme takes TransferProtocol's; credentials for the image's server
    async with service.client() as client:
        response = await client.post(ACTION, json={"ImageURI": files.url("new-bios.bin").removeprefix("http://"),
                                                   "TransferProtocol": "HTTP"})
        assert response.status_code == 200, response.text
        with serving(Protected) as protected:
            response = await client.post(ACTION, json={"ImageURI": protected, "Username": "fw", "Password": "s3cret"})
        assert response.status_code == 200, response.text
        task = await get(service, response.headers["Location"])
        assert task["TaskState"] == "Completed" and "s3cret" not in str(task)
        assert (await client.get(task["TaskMonitor"])).status_code == 200
    assert len(installed(service)) == 1
    assert (await get(service, BIOS))["Version"] == new_version  # off: what its next power-on runs


async def refuse_all(service: Service, files: FileServer, redirect: str, protected: str) -> None:
    refusals = [
        ({"ImageURI": files.url("random.bin")}, "ActionParameterValueError", "not a firmware image"),
        ({"ImageURI": files.url("huge.bin")}, "ActionParameterValueError", "larger than 8 MiB"),
        ({"ImageURI": files.url("ovmf-code.fd")}, "ActionParameterValueError", "firmware for UEFI boot"),
        ({"ImageURI": files.url("missing.bin")}, "ActionParameterValueError", "HTTP 404"),
        ({"ImageURI": redirect}, "ActionParameterValueError", "only http(s) URLs are followed"),
        ({"ImageURI": protected, "Username": "fw", "Password": "wrong"}, "ActionParameterValueError", "HTTP 401"),
        ({"ImageURI": "ftp://127.0.0.1/bios.bin"}, "ActionParameterValueFormatError", "ftp://"),
        ({"ImageURI": "http://"}, "ActionParameterValueFormatError", "http://"),
        ({"ImageURI": "127.0.0.1/bios.bin", "TransferProtocol": "NFS"}, "ActionParameterValueNotInList", "NFS"),
        ({"ImageURI": files.url("new-bios.bin"), "Targets": ["/redfish/v1/Systems/n2"]},
         "ActionParameterValueNotInList", "n2"),
        ({"ImageURI": files.url("new-bios.bin"), "Targets": [f"{SERVICE}/FirmwareInventory/BMC"]},
         "ActionParameterValueNotInList", "BMC"),
        ({"ImageURI": files.url("new-bios.bin"), "Targets": SYSTEM}, "ActionParameterValueTypeError", SYSTEM),
        ({"ImageURI": files.url("new-bios.bin"), "Stage": True}, "ActionParameterNotSupported", "Stage"),
        ({"ImageURI": files.url("new-bios.bin"), "Color": "red"}, "ActionParameterUnknown", "Color"),
        ({"TransferProtocol": "HTTP"}, "ActionParameterMissing", "ImageURI"),
    ]
    async with service.client() as client:
        for body, message_id, text in refusals:
            response = await client.post(ACTION, json=body)
            assert response.status_code == 400, (body, response.text)
            assert message_ids(response)[0] == message_id and text in response.text, (body, response.text)


async def test_simple_update_of_ovmf(nc, services, short_dir: Path, images: GuestImages,
                                     firmware_files: tuple[Path, FileServer]):
    """A machine configured with the Secure Boot build of OVMF (which would need SMM) switched to
    UEFI, updated with the plain build: it boots the UEFI disk with it."""
    www, files = firmware_files
    shutil.copyfile(OVMF_CODE_4M, www / "ovmf-code.fd")
    shutil.copyfile(OVMF_CODE_2M, www / "ovmf-code-2m.fd")
    shutil.copyfile(OVMF_CODE_4M_SECURE, www / "ovmf-secure.fd")
    cmd = ["-machine", "q35", "-accel", "tcg", "-m", "128", "-display", "none", "-nodefaults", "-vga", "none",
           "-drive", f"if=none,id=hd0,file={images.uefi_disk},format=raw,snapshot=on",
           "-device", "ide-hd,drive=hd0,id=disk0,bootindex=1"]
    service = await start(nc, services, short_dir, cmd,
                          qemu=f'[qemu]\novmf_code = "{OVMF_CODE_4M_SECURE}"\novmf_vars = "{OVMF_VARS}"\n')
    async with service.client() as client:
        response = await client.patch(SYSTEM, json={"Boot": {"BootSourceOverrideMode": "UEFI"}})
        assert response.status_code == 200, response.text
        bios = await get(service, BIOS)
        assert (bios["Manufacturer"], bios["Version"], bios["Updateable"]) == ("TianoCore", "EDK II", True)
        response = await client.post(ACTION, json={"ImageURI": files.url("ovmf-code-2m.fd")})
        assert response.status_code == 400 and "does not fit the machine's UEFI variables" in response.text
        response = await client.post(ACTION, json={"ImageURI": files.url("ovmf-code.fd"), "Targets": [BIOS]})
        assert response.status_code == 200, response.text
    assert len(installed(service)) == 1
    await reset(service, "On")
    await wait_for(lambda: "MARKER-HDD" in serial_log(short_dir, "n1"), timeout=90, message="OVMF booting the disk")
    command = qemu_command(short_dir)
    assert f"file={service.directory / 'rt' / 'vm' / 'n1' / 'firmware' / installed(service)[0]}" in command
    assert str(OVMF_CODE_4M_SECURE) not in command
    # the configured image back: nothing installed
    task = await sushy_update(service, files.url("ovmf-secure.fd"))
    assert task.task_state == sushy.TASK_STATE_COMPLETED
    assert installed(service) == []
