"""The Redfish service over HTTPS against real QEMU machines: the service root, authentication,
systems, boot override with ETags, resets with their real effect, the MAAS flow, errors."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from conftest import INTERNAL_TARGETS, free_tcp_port, serial_log, toml_list, wait_for, write_config
from guest_images import GuestImages
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import BootOverride, PasswordSet, PowerStatus, User, UserAccessUpdate, UserUpdate

USER, PASSWORD = "admin", "s3cret-Pass"



class Service:
    def __init__(self, nc, directory: Path, url: str) -> None:
        self.nc, self.directory, self.url = nc, directory, url

    def client(self, user: str = USER, password: str = PASSWORD) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, auth=(user, password), verify=False, timeout=60)

    async def power(self) -> str:
        return (await bus.request(self.nc, "n1", subjects.POWER_GET, None, PowerStatus)).state


@pytest.fixture
async def redfish(nc, services, short_dir: Path, images: GuestImages) -> Service:
    port = free_tcp_port()
    config = write_config(short_dir, f'[redfish]\nlisten = "127.0.0.1:{port}"\n{INTERNAL_TARGETS}'
                                     f'[vm.n1]\ncmd = {toml_list(images.qemu_args(nic=False))}\n')
    await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD})
    await services("machine", config, "--stop-vms-on-exit")
    await services("redfish", config)
    return Service(nc, short_dir, f"https://127.0.0.1:{port}")


async def test_service_root_and_authentication(redfish: Service):
    async with httpx.AsyncClient(base_url=redfish.url, verify=False) as anonymous:
        for path in ("/redfish", "/redfish/v1", "/redfish/v1/", "/redfish/v1/odata", "/redfish/v1/$metadata"):
            response = await anonymous.get(path)
            assert response.status_code == 200, (path, response.text)
            assert response.headers["OData-Version"] == "4.0"
        root = (await anonymous.get("/redfish/v1/")).json()
        assert root["UUID"] and root["Systems"] == {"@odata.id": "/redfish/v1/Systems"}
        response = await anonymous.get("/redfish/v1/Systems")
        assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Basic")
        assert response.json()["error"]["@Message.ExtendedInfo"][0]["MessageId"].endswith(".NoValidSession")
    async with redfish.client(password="wrong") as wrong:
        assert (await wrong.get("/redfish/v1/Systems/n1")).status_code == 401
    async with redfish.client() as client:
        systems = (await client.get("/redfish/v1/Systems/")).json()
        assert systems["Members"] == [{"@odata.id": "/redfish/v1/Systems/n1"}]
        response = await client.get("/redfish/v1/Systems/nope")
        assert response.status_code == 404 and "ResourceNotFound" in response.json()["error"]["code"]
        assert (await client.get("/redfish/v1/NoSuchThing")).status_code == 404
        response = await client.delete("/redfish/v1/Systems/n1")
        assert response.status_code == 405 and "GET" in response.headers["Allow"]
        for path in ("/redfish/v1/Managers/n1", "/redfish/v1/Chassis/n1", "/redfish/v1/Systems/n1/EthernetInterfaces"):
            assert (await client.get(path)).status_code == 200, path


async def test_maas_flow_boot_override_and_resets(redfish: Service):
    """What MAAS sends, byte for byte: Basic auth over HTTPS without verification, the systems,
    Members[0], its ETag, PATCH Boot with If-Match, then resets."""
    async with redfish.client() as client:
        members = (await client.get("/redfish/v1/Systems")).json()["Members"]
        system_uri = members[0]["@odata.id"]
        response = await client.get(system_uri)
        etag = response.headers["ETag"]
        assert response.json()["PowerState"] == "Off"
        stale = await client.patch(system_uri, headers={"If-Match": 'W/"0000"'},
                                   json={"Boot": {"BootSourceOverrideEnabled": "Once"}})
        assert stale.status_code == 412
        response = await client.patch(system_uri, headers={"If-Match": etag}, content=(
            b'{"Boot":{"BootSourceOverrideEnabled":"Once","BootSourceOverrideTarget":"Hdd"}}'))
        assert response.status_code == 200, response.text
        assert response.json()["Boot"]["BootSourceOverrideTarget"] == "Hdd"
        override = await bus.request(redfish.nc, "n1", subjects.BOOT_GET, None, BootOverride)
        assert (override.target, override.enabled) == ("Hdd", "Once")
        reset = f"{system_uri}/Actions/ComputerSystem.Reset"
        assert (await client.post(reset, json={"ResetType": "On"})).status_code == 204
        await wait_for(lambda: "MARKER-HDD" in serial_log(redfish.directory, "n1"), message="the guest booting")
        assert (await client.get(system_uri)).json()["Boot"]["BootSourceOverrideEnabled"] == "Disabled"  # used
        assert (await client.post(reset, json={"ResetType": "ForceRestart"})).status_code == 204
        await wait_for(lambda: serial_log(redfish.directory, "n1").count("MARKER-HDD") == 2, message="restart")
        assert (await client.post(reset, json={"ResetType": "GracefulRestart"})).status_code == 204
        await wait_for(lambda: serial_log(redfish.directory, "n1").count("MARKER-HDD") == 3, timeout=30,
                       message="graceful restart: ACPI shutdown, then on")
        assert (await client.post(reset, json={"ResetType": "ForceOff"})).status_code == 204
        assert await redfish.power() == "Off"
        assert (await client.get(system_uri)).json()["PowerState"] == "Off"


async def test_errors_and_privileges(redfish: Service):
    await bus.request(redfish.nc, "n1", subjects.USERS_SET, UserUpdate(slot=4, name="viewer", enabled=True), User)
    await bus.request(redfish.nc, "n1", subjects.USERS_PASSWORD, PasswordSet(slot=4, password="view-only-1"), User)
    await bus.request(redfish.nc, "n1", subjects.USERS_ACCESS,
                      UserAccessUpdate(slot=4, channel=1, privilege=2, ipmi_messaging=True), User)
    reset = "/redfish/v1/Systems/n1/Actions/ComputerSystem.Reset"
    async with redfish.client("viewer", "view-only-1") as viewer:
        assert (await viewer.get("/redfish/v1/Systems/n1")).status_code == 200
        response = await viewer.post(reset, json={"ResetType": "On"})
        assert response.status_code == 403 and "InsufficientPrivilege" in response.json()["error"]["code"]
    async with redfish.client() as client:
        for body, message_id in ((b"{not json", "MalformedJSON"), (b'{"ResetType": "Explode"}',
                                                                    "ActionParameterValueNotInList"),
                                 (b"{}", "ActionParameterMissing"), (b'{"ResetType": "On", "X": 1}',
                                                                     "ActionParameterUnknown")):
            response = await client.post(reset, content=body)
            assert response.status_code == 400, (body, response.text)
            assert response.json()["error"]["@Message.ExtendedInfo"][0]["MessageId"].endswith(message_id)
        response = await client.patch("/redfish/v1/Systems/n1", json={"Boot": {"BootSourceOverrideTarget": "Floppy"}})
        assert response.status_code == 400 and "Floppy" in response.text
        response = await client.patch("/redfish/v1/Systems/n1", json={"PowerState": "On"})
        assert response.status_code == 400 and "PropertyNotWritable" in response.text
        assert (await client.get("/redfish/v1/Systems/n1")).status_code == 200  # still serving
    assert await redfish.power() == "Off"
