"""Redfish virtual media and the Manager against real services and real QEMU: an ISO served over
HTTP inserted through Redfish (under the Manager and under the System) boots the guest, refusals
leave the drive as QEMU has it; the BMC's network interface is the IPMI LAN configuration, its
protocols the configuration file's, and a manager reset leaves the VM alone."""

from __future__ import annotations

import asyncio
import ipaddress
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from conftest import INTERNAL_TARGETS, free_tcp_port, free_udp_port, serial_log, toml_list, wait_for, write_config
from guest_images import GuestImages
from http_server import FileServer
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import (
    LanConfig,
    LanParamSet,
    LanRef,
    MediaStatus,
    PasswordSet,
    PowerStatus,
    User,
    UserAccessUpdate,
    UserUpdate,
)

USER, PASSWORD = "admin", "s3cret-Pass"
MANAGER, SYSTEM = "/redfish/v1/Managers/n1", "/redfish/v1/Systems/n1"
INSERT, EJECT = "Actions/VirtualMedia.InsertMedia", "Actions/VirtualMedia.EjectMedia"


class Bmc:
    def __init__(self, nc, directory: Path, url: str, port: int, ipmi_port: int) -> None:
        self.nc, self.directory, self.url, self.port, self.ipmi_port = nc, directory, url, port, ipmi_port

    def client(self, user: str = USER, password: str = PASSWORD) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, auth=(user, password), verify=False, timeout=60)

    async def media(self) -> MediaStatus:
        return await bus.request(self.nc, "n1", subjects.MEDIA_GET, None, MediaStatus)

    async def power(self) -> PowerStatus:
        return await bus.request(self.nc, "n1", subjects.POWER_GET, None, PowerStatus)

    def markers(self, marker: str) -> int:
        return serial_log(self.directory, "n1").count(marker)

    async def add_user(self, slot: int, name: str, password: str, privilege: int) -> None:
        await bus.request(self.nc, "n1", subjects.USERS_SET, UserUpdate(slot=slot, name=name, enabled=True), User)
        await bus.request(self.nc, "n1", subjects.USERS_PASSWORD, PasswordSet(slot=slot, password=password), User)
        await bus.request(self.nc, "n1", subjects.USERS_ACCESS,
                          UserAccessUpdate(slot=slot, channel=1, privilege=privilege, ipmi_messaging=True), User)


@pytest.fixture
async def bmc(nc, services, short_dir: Path, images: GuestImages) -> Bmc:
    port, ipmi_port = free_tcp_port(), free_udp_port()
    config = write_config(short_dir, f'[redfish]\nlisten = "127.0.0.1:{port}"\n{INTERNAL_TARGETS}'
                                     f'[vm.n1]\ncmd = {toml_list(images.qemu_args(nic=False))}\n'
                                     f'ipmi = "127.0.0.1:{ipmi_port}"\n')
    await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD})
    await services("machine", config, "--stop-vms-on-exit")
    await services("redfish", config)
    return Bmc(nc, short_dir, f"https://127.0.0.1:{port}", port, ipmi_port)


@pytest.fixture
def files(images: GuestImages):
    with FileServer(images.iso.parent) as server:
        yield server


def message_id(response: httpx.Response) -> str:
    return response.json()["error"]["@Message.ExtendedInfo"][0]["MessageId"]


async def test_virtual_media_boots_the_guest(bmc: Bmc, files: FileServer, images: GuestImages):
    url = files.url(images.iso.name)
    async with bmc.client() as client:
        assert (await client.get(SYSTEM)).json()["VirtualMedia"] == {"@odata.id": f"{SYSTEM}/VirtualMedia"}
        assert (await client.get(MANAGER)).json()["VirtualMedia"] == {"@odata.id": f"{MANAGER}/VirtualMedia"}
        for parent in (MANAGER, SYSTEM):
            collection = (await client.get(f"{parent}/VirtualMedia")).json()
            assert collection["@odata.type"] == "#VirtualMediaCollection.VirtualMediaCollection"
            assert collection["Members"] == [{"@odata.id": f"{parent}/VirtualMedia/Cd"}]
            assert collection["Members@odata.count"] == 1
        cd = (await client.get(f"{MANAGER}/VirtualMedia/Cd")).json()
        assert cd["@odata.type"] == "#VirtualMedia.v1_6_5.VirtualMedia" and cd["Id"] == "Cd" and cd["Name"]
        assert cd["MediaTypes"] == ["CD", "DVD"]
        assert (cd["Inserted"], cd["Image"], cd["ConnectedVia"]) == (False, None, "NotConnected")
        assert cd["Actions"]["#VirtualMedia.InsertMedia"]["target"] == f"{MANAGER}/VirtualMedia/Cd/{INSERT}"
        assert cd["Actions"]["#VirtualMedia.EjectMedia"]["target"] == f"{MANAGER}/VirtualMedia/Cd/{EJECT}"

        # Ironic's flow: insert while the machine is off, boot from CD once, power on
        response = await client.post(cd["Actions"]["#VirtualMedia.InsertMedia"]["target"],
                                     json={"Image": url, "Inserted": True, "WriteProtected": True})
        assert response.status_code == 204, response.text
        inserted = {"Inserted": True, "Image": url, "ImageName": images.iso.name, "ConnectedVia": "URI",
                    "TransferProtocolType": "HTTP", "TransferMethod": "Stream", "WriteProtected": True}
        for parent in (MANAGER, SYSTEM):
            cd = (await client.get(f"{parent}/VirtualMedia/Cd")).json()
            assert {key: cd[key] for key in inserted} == inserted
            assert cd["@odata.id"] == f"{parent}/VirtualMedia/Cd"
            assert cd["Actions"]["#VirtualMedia.EjectMedia"]["target"] == f"{parent}/VirtualMedia/Cd/{EJECT}"
        status = await bmc.media()
        assert status.inserted and status.image == url
        response = await client.patch(SYSTEM, json={"Boot": {"BootSourceOverrideTarget": "Cd",
                                                              "BootSourceOverrideEnabled": "Once"}})
        assert response.status_code == 200, response.text
        response = await client.post(f"{SYSTEM}/Actions/ComputerSystem.Reset", json={"ResetType": "On"})
        assert response.status_code == 204, response.text
        await wait_for(lambda: bmc.markers("MARKER-CD") == 1, timeout=30, message="the guest booting the ISO")
        assert bmc.markers("MARKER-HDD") == 0
        assert (await bmc.media()).inserted  # QEMU took it at launch

        # EjectMedia through the System's URI
        response = await client.post(f"{SYSTEM}/VirtualMedia/Cd/{EJECT}", json={})
        assert response.status_code == 204, response.text
        for parent in (MANAGER, SYSTEM):
            cd = (await client.get(f"{parent}/VirtualMedia/Cd")).json()
            assert (cd["Inserted"], cd["Image"], cd["ImageName"], cd["ConnectedVia"]) == (
                False, None, None, "NotConnected")
        assert not (await bmc.media()).inserted
        assert (await client.post(f"{MANAGER}/VirtualMedia/Cd/{EJECT}")).status_code == 204  # empty: no-op

        # refused by QEMU (a 404 from the web server): 400 naming the image, and still nothing inserted
        for parent in (MANAGER, SYSTEM):
            missing = files.url(f"missing-{parent.split('/')[3]}.iso")
            response = await client.post(f"{parent}/VirtualMedia/Cd/{INSERT}", json={"Image": missing})
            assert response.status_code == 400, response.text
            assert message_id(response).endswith(".ActionParameterValueError") and missing in response.text
            cd = (await client.get(f"{parent}/VirtualMedia/Cd")).json()
            assert (cd["Inserted"], cd["Image"]) == (False, None)
            assert not (await bmc.media()).inserted

        # PATCH instead of the actions (through the System's URI), then a ForceRestart boots the ISO again
        response = await client.patch(f"{SYSTEM}/VirtualMedia/Cd", json={"Image": url, "Inserted": True,
                                                                         "WriteProtected": True})
        assert response.status_code == 200, response.text
        assert (response.json()["Inserted"], response.json()["Image"]) == (True, url)
        assert response.headers["ETag"] == response.json()["@odata.etag"]
        assert (await bmc.media()).image == url
        once = {"Boot": {"BootSourceOverrideTarget": "Cd", "BootSourceOverrideEnabled": "Once"}}
        assert (await client.patch(SYSTEM, json=once)).status_code == 200
        response = await client.post(f"{SYSTEM}/Actions/ComputerSystem.Reset", json={"ResetType": "ForceRestart"})
        assert response.status_code == 204, response.text
        await wait_for(lambda: bmc.markers("MARKER-CD") == 2, timeout=30, message="the ISO booting again")
        # a refused change by PATCH keeps what QEMU has
        response = await client.patch(f"{SYSTEM}/VirtualMedia/Cd", json={"Image": files.url("gone.iso")})
        assert response.status_code == 400 and message_id(response).endswith(".PropertyValueError")
        assert (await client.get(f"{MANAGER}/VirtualMedia/Cd")).json()["Image"] == url
        response = await client.patch(f"{SYSTEM}/VirtualMedia/Cd", json={"Image": None, "Inserted": False})
        assert response.status_code == 200 and response.json()["Inserted"] is False
        assert not (await bmc.media()).inserted


async def test_virtual_media_refusals_and_privileges(bmc: Bmc, files: FileServer, images: GuestImages):
    url = files.url(images.iso.name)
    cd = f"{MANAGER}/VirtualMedia/Cd"
    await bmc.add_user(4, "viewer", "view-only-1", 2)
    await bmc.add_user(5, "operator", "operate-1", 3)
    for user, password in (("viewer", "view-only-1"), ("operator", "operate-1")):
        async with bmc.client(user, password) as client:
            assert (await client.get(f"{SYSTEM}/VirtualMedia/Cd")).status_code == 200
            for response in (await client.post(f"{cd}/{INSERT}", json={"Image": url}),
                             await client.post(f"{SYSTEM}/VirtualMedia/Cd/{EJECT}", json={}),
                             await client.patch(cd, json={"Image": url})):
                assert response.status_code == 403 and message_id(response).endswith(".InsufficientPrivilege")
    async with bmc.client() as client:
        refusals = [
            ({}, "ActionParameterMissing"),
            ({"Image": url, "Colour": "blue"}, "ActionParameterUnknown"),
            ({"Image": 5}, "ActionParameterValueTypeError"),
            ({"Image": url, "Inserted": "yes"}, "ActionParameterValueTypeError"),
            ({"Image": url, "Inserted": False}, "ActionParameterValueNotInList"),
            ({"Image": url, "WriteProtected": False}, "ActionParameterValueNotInList"),
            ({"Image": url, "TransferMethod": "Upload"}, "ActionParameterValueNotInList"),
            ({"Image": url, "TransferProtocolType": "HTTPS"}, "ActionParameterValueNotInList"),  # not the URL's
            ({"Image": url, "TransferProtocolType": "NFS"}, "ActionParameterValueNotInList"),
            ({"Image": url, "UserName": "someone", "Password": "x"}, "ActionParameterNotSupported"),
            ({"Image": str(images.iso)}, "ActionParameterValueFormatError"),  # a path on the BMC host
            ({"Image": f"file://{images.iso}"}, "ActionParameterValueFormatError"),
            ({"Image": "ftp://127.0.0.1/cd.iso"}, "ActionParameterValueFormatError"),
            ({"Image": "http:///cd.iso"}, "ActionParameterValueFormatError"),
        ]
        for body, expected in refusals:
            response = await client.post(f"{cd}/{INSERT}", json=body)
            assert response.status_code == 400, (body, response.text)
            assert message_id(response).endswith(f".{expected}"), (body, response.text)
        response = await client.post(f"{cd}/{INSERT}", content=b"{not json")
        assert response.status_code == 400 and message_id(response).endswith(".MalformedJSON")
        assert not (await bmc.media()).inserted

        for body, expected in (({"MediaTypes": ["CD"]}, "PropertyNotWritable"), ({"Colour": 1}, "PropertyUnknown"),
                               ({"Inserted": True}, "PropertyMissing"),
                               ({"Image": url, "Inserted": False}, "PropertyValueNotInList"),
                               ({"Image": "/etc/hostname"}, "PropertyValueFormatError")):
            response = await client.patch(cd, json=body)
            assert response.status_code == 400, (body, response.text)
            assert message_id(response).endswith(f".{expected}"), (body, response.text)
        response = await client.patch(cd, headers={"If-Match": 'W/"0000"'}, json={"Image": url})
        assert response.status_code == 412
        response = await client.post(f"{cd}/{EJECT}", json={"Force": True})
        assert response.status_code == 400 and message_id(response).endswith(".ActionParameterUnknown")
        for path in (f"{MANAGER}/VirtualMedia/Floppy", f"{SYSTEM}/VirtualMedia/Floppy",
                     "/redfish/v1/Systems/nope/VirtualMedia/Cd"):
            assert (await client.get(path)).status_code == 404, path
        assert not (await bmc.media()).inserted

        # every parameter at a value the drive can honour, and the current ETag
        etag = (await client.get(cd)).headers["ETag"]
        response = await client.post(f"{cd}/{INSERT}", json={
            "Image": url, "Inserted": True, "WriteProtected": True, "TransferProtocolType": "HTTP",
            "TransferMethod": "Stream", "UserName": "", "Password": ""})
        assert response.status_code == 204, response.text
        response = await client.patch(cd, headers={"If-Match": etag}, json={"Inserted": False})
        assert response.status_code == 412  # the media changed since
        response = await client.patch(cd, headers={"If-Match": (await client.get(cd)).headers["ETag"]},
                                      json={"Inserted": False})
        assert response.status_code == 200 and not response.json()["Inserted"]
        assert not (await bmc.media()).inserted


async def test_manager_network_and_reset(bmc: Bmc, services, short_dir: Path):
    async with bmc.client() as client:
        manager = (await client.get(MANAGER)).json()
        assert manager["@odata.type"] == "#Manager.v1_24_0.Manager" and manager["Model"] == "qemu-bmc"
        assert manager["UUID"] == str(uuid.UUID(manager["UUID"])) == (await client.get(MANAGER)).json()["UUID"]
        assert manager["UUID"] != (await client.get(SYSTEM)).json()["UUID"]
        now = datetime.fromisoformat(manager["DateTime"])
        assert now.tzinfo is not None and abs(now - datetime.now().astimezone()) < timedelta(minutes=1)
        assert manager["DateTime"].endswith(manager["DateTimeLocalOffset"])
        for key in ("EthernetInterfaces", "NetworkProtocol", "VirtualMedia"):
            assert manager[key] == {"@odata.id": f"{MANAGER}/{key}"}
        assert manager["SerialConsole"]["ServiceEnabled"] is True
        reset = manager["Actions"]["#Manager.Reset"]
        assert reset["target"] == f"{MANAGER}/Actions/Manager.Reset"
        assert reset["ResetType@Redfish.AllowableValues"] == ["GracefulRestart", "ForceRestart"]

        # the BMC's interface is the IPMI LAN configuration: seeded from the ipmi address, changed over the bus
        interfaces = (await client.get(f"{MANAGER}/EthernetInterfaces")).json()
        assert interfaces["Members@odata.count"] == 1
        interface_uri = interfaces["Members"][0]["@odata.id"]
        interface = (await client.get(interface_uri)).json()
        assert interface["@odata.id"] == interface_uri and interface["InterfaceEnabled"] is True
        assert interface["@odata.type"] == "#EthernetInterface.v1_12_4.EthernetInterface"
        # an unset gateway is null, never "0.0.0.0"
        assert interface["IPv4Addresses"] == [{"Address": "127.0.0.1", "SubnetMask": "255.255.255.0",
                                               "AddressOrigin": "Static", "Gateway": None}]
        lan = await bus.request(bmc.nc, "n1", subjects.LAN_GET, LanRef(), LanConfig)
        assert interface["MACAddress"] == lan.params[5].hex(":")
        for param, value in ((3, "10.1.2.3"), (6, "255.255.0.0"), (12, "10.1.0.1")):
            await bus.request(bmc.nc, "n1", subjects.LAN_SET,
                              LanParamSet(param=param, data=ipaddress.IPv4Address(value).packed), LanConfig)
        await bus.request(bmc.nc, "n1", subjects.LAN_SET, LanParamSet(param=4, data=b"\x02"), LanConfig)
        interface = (await client.get(interface_uri)).json()
        assert interface["IPv4Addresses"] == [{"Address": "10.1.2.3", "SubnetMask": "255.255.0.0",
                                               "Gateway": "10.1.0.1", "AddressOrigin": "DHCP"}]
        assert interface["DHCPv4"] == {"DHCPEnabled": True}
        assert (await client.get(f"{MANAGER}/EthernetInterfaces/2")).status_code == 404

        protocols = (await client.get(f"{MANAGER}/NetworkProtocol")).json()
        assert protocols["@odata.type"] == "#ManagerNetworkProtocol.v1_12_0.ManagerNetworkProtocol"
        assert protocols["HTTPS"] == {"ProtocolEnabled": True, "Port": bmc.port,
                                      "Certificates": {"@odata.id": f"{MANAGER}/NetworkProtocol/HTTPS/Certificates"}}
        assert protocols["HTTP"] == {"ProtocolEnabled": False, "Port": None}
        assert protocols["IPMI"] == {"ProtocolEnabled": False, "Port": None}  # no IPMI over LAN service yet
        await services("ipmi-lan", short_dir / "qemu-bmc.toml")

        async def ipmi_protocol() -> bool:
            protocols = (await client.get(f"{MANAGER}/NetworkProtocol")).json()
            return protocols["IPMI"] == {"ProtocolEnabled": True, "Port": bmc.ipmi_port}

        await wait_for(ipmi_protocol, timeout=10, message="the IPMI over LAN service's port, learnt from the bus")

        # a manager reset is the BMC's, not the VM's
        response = await client.post(f"{SYSTEM}/Actions/ComputerSystem.Reset", json={"ResetType": "On"})
        assert response.status_code == 204, response.text
        await wait_for(lambda: bmc.markers("MARKER-HDD") == 1, timeout=30, message="the guest booting")
        before = await bmc.power()
        for body in ({"ResetType": "GracefulRestart"}, {"ResetType": "ForceRestart"}, {}):
            response = await client.post(reset["target"], json=body)
            assert response.status_code == 204, (body, response.text)
        for body, expected in (({"ResetType": "ForceOff"}, "ActionParameterValueNotInList"),
                               ({"ResetType": "On", "Delay": 1}, "ActionParameterUnknown")):
            response = await client.post(reset["target"], json=body)
            assert response.status_code == 400 and message_id(response).endswith(f".{expected}"), response.text
    await bmc.add_user(5, "operator", "operate-1", 3)
    async with bmc.client("operator", "operate-1") as operator:
        response = await operator.post(reset["target"], json={"ResetType": "ForceRestart"})
        assert response.status_code == 403
    await asyncio.sleep(2)
    after = await bmc.power()
    assert (after.state, after.pid) == ("On", before.pid)
    assert bmc.markers("MARKER-HDD") == 1  # no reboot
