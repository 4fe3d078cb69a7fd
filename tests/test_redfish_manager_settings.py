"""The BMC's own settings against the real services, with real clients: its network settings
(Redfish EthernetInterface and NetworkProtocol, ``ipmitool lan print`` and ``lan set``, DMTF
Tacklebox's rf_manager_config.py), its clock (Redfish DateTime, ``ipmitool sel time``, the SEL's
timestamps), account renaming (Redfish and IPMI Set User Name), the system's asset tag and
indicator LED (``ipmitool chassis identify``). DMTF's use-case checkers run in
test_redfish_conformance.py."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import clients
import httpx
import pytest
from conftest import free_tcp_port, free_udp_port, no_exception_logged, toml_list, wait_for, write_config
from guest_images import GuestImages
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.messages import (
    ManagerSettings,
    ManagerSettingsUpdate,
    PasswordSet,
    User,
    UserAccessUpdate,
    UserList,
    UserUpdate,
)
from test_redfish import PASSWORD, USER

MANAGER = "/redfish/v1/Managers/n1"
INTERFACE = f"{MANAGER}/EthernetInterfaces/1"
PROTOCOL = f"{MANAGER}/NetworkProtocol"
SYSTEM = "/redfish/v1/Systems/n1"
ACCOUNTS = "/redfish/v1/AccountService/Accounts"
SESSIONS = "/redfish/v1/SessionService/Sessions"
BIN = Path(sys.executable).parent
VIEWER, VIEWER_PASSWORD = "viewer", "view-only-1"


class Bmc:
    """The state, machine, IPMI over LAN and Redfish services of one machine n1."""

    def __init__(self, nc, directory: Path, url: str, ipmi_port: int) -> None:
        self.nc, self.directory, self.url, self.ipmi_port = nc, directory, url, ipmi_port
        certificate = str(directory / "rt" / "redfish" / "cert.pem")
        self.env = {**os.environ, "REQUESTS_CA_BUNDLE": certificate, "SSL_CERT_FILE": certificate, "TZ": "UTC"}

    def client(self, user: str | None = USER, password: str = PASSWORD, token: str | None = None
               ) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, verify=False, timeout=60,
                                 auth=(user, password) if user is not None and token is None else None,
                                 headers={"X-Auth-Token": token} if token else None)

    async def ipmitool(self, *args: str, user: str = USER, password: str = PASSWORD) -> tuple[int, str]:
        return await clients.ipmitool(self.ipmi_port, *args, user=user, password=password)

    async def run(self, *argv: str) -> tuple[int, str]:
        """A DMTF tool, trusting the service's certificate, in UTC."""
        process = await asyncio.create_subprocess_exec(*argv, env=self.env, cwd=self.directory,
                                                       stdin=asyncio.subprocess.DEVNULL,
                                                       stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await asyncio.wait_for(process.communicate(), 600)
        return process.returncode or 0, output.decode(errors="replace")

    async def tacklebox(self, script: str, *args: str) -> tuple[int, str]:
        return await self.run(str(BIN / script), "-u", USER, "-p", PASSWORD, "-r", self.url, *args)


@pytest.fixture
async def bmc(nc, services, short_dir: Path, images: GuestImages, monkeypatch: pytest.MonkeyPatch
              ) -> AsyncIterator[Bmc]:
    monkeypatch.setenv("TZ", "UTC")  # ipmitool shows and reads SEL times in the local time zone
    port, ipmi_port = free_tcp_port(), free_udp_port()
    config = write_config(short_dir, f'[redfish]\nlisten = "127.0.0.1:{port}"\n'
                                     f'[vm.n1]\ncmd = {toml_list(images.qemu_args(nic=False))}\n'
                                     f'ipmi = "127.0.0.1:{ipmi_port}"\n')
    await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD})
    await services("machine", config, "--stop-vms-on-exit")
    await services("ipmi-lan", config)
    await services("redfish", config)
    # a ReadOnly user, made in-band
    await bus.request(nc, "n1", subjects.USERS_SET, UserUpdate(slot=4, name=VIEWER, enabled=True), User)
    await bus.request(nc, "n1", subjects.USERS_PASSWORD, PasswordSet(slot=4, password=VIEWER_PASSWORD), User)
    await bus.request(nc, "n1", subjects.USERS_ACCESS,
                      UserAccessUpdate(slot=4, channel=1, privilege=2, ipmi_messaging=True), User)
    with no_exception_logged(short_dir / "redfish.log"):
        yield Bmc(nc, short_dir, f"https://127.0.0.1:{port}", ipmi_port)


def message_id(response: httpx.Response) -> str:
    return response.json()["error"]["@Message.ExtendedInfo"][0]["MessageId"].rsplit(".", 1)[1]


def refused(response: httpx.Response, status: int, message: str, *args: str) -> bool:
    """A Redfish error with this status and Base MessageId, whose message arguments include ``args``."""
    info = response.json()["error"]["@Message.ExtendedInfo"][0] if response.status_code >= 400 else {}
    return (response.status_code == status and info.get("MessageId", "").endswith(f".{message}")
            and all(arg in info["MessageArgs"] for arg in args))


def lan_value(output: str, label: str) -> str:
    """One line of ``ipmitool lan print`` (or of FreeIPMI's tools)."""
    found = re.search(rf"^{re.escape(label)}\s*: (.*)$", output, re.M)
    assert found, (label, output)
    return found[1].strip()


async def patched(client: httpx.AsyncClient, uri: str, body: dict) -> dict:
    """PATCH with the resource's ETag, as MAAS and the DMTF tools do; the answer is the new resource."""
    etag = (await client.get(uri)).headers["ETag"]
    response = await client.patch(uri, json=body, headers={"If-Match": etag})
    assert response.status_code == 200, response.text
    return response.json()


async def test_network_settings_redfish_and_ipmi_agree(bmc: Bmc):
    async with bmc.client() as client:
        response = await client.get(INTERFACE)
        assert "PATCH" in response.headers["Allow"]
        interface = response.json()
        assert (interface["HostName"], interface["FQDN"], interface["NameServers"]) == ("n1", "n1", [])
        assert interface["IPv4Addresses"] == [{"Address": "127.0.0.1", "SubnetMask": "255.255.255.0",
                                               "AddressOrigin": "Static", "Gateway": None}]
        assert interface["IPv4StaticAddresses"] == [{"Address": "127.0.0.1", "SubnetMask": "255.255.255.0",
                                                     "Gateway": None}]
        mac = interface["MACAddress"]
        link_local = interface["IPv6Addresses"][0]
        assert link_local["AddressOrigin"] == "LinkLocal" and link_local["Address"].startswith("fe80::")
        assert link_local["Address"].endswith(mac[-5:].replace(":", ""))  # EUI-64 from the MAC
        assert interface["IPv6DefaultGateway"] is None and interface["IPv6StaticDefaultGateways"] == []
        assert interface["VLAN"] == {"VLANEnable": False, "VLANId": 0, "VLANPriority": 0, "Tagged": False}

        interface = await patched(client, INTERFACE, {
            "IPv4StaticAddresses": [{"Address": "10.20.30.40", "SubnetMask": "255.255.0.0", "Gateway": "10.20.0.1"}],
            "VLAN": {"VLANEnable": True, "VLANId": 42, "VLANPriority": 5},
            "StaticNameServers": ["192.0.2.53", "2001:db8::53"],
            "IPv6StaticAddresses": [{"Address": "2001:db8::10", "PrefixLength": 64}],
            "IPv6StaticDefaultGateways": [{"Address": "2001:db8::1", "PrefixLength": 64}]})
        assert interface["IPv4Addresses"][0] == {"Address": "10.20.30.40", "SubnetMask": "255.255.0.0",
                                                 "AddressOrigin": "Static", "Gateway": "10.20.0.1"}
        assert interface["VLAN"] == {"VLANEnable": True, "VLANId": 42, "VLANPriority": 5, "Tagged": True}
        assert interface["NameServers"] == ["192.0.2.53", "2001:db8::53"]
        assert {"Address": "2001:db8::10", "PrefixLength": 64, "AddressOrigin": "Static",
                "AddressState": "Preferred"} in interface["IPv6Addresses"]
        assert interface["IPv6DefaultGateway"] == "2001:db8::1"

    # ipmitool reads what Redfish set (the front-end still listens where its configuration says)
    code, out = await bmc.ipmitool("lan", "print", "1")
    assert code == 0, out
    assert lan_value(out, "IP Address") == "10.20.30.40" and lan_value(out, "Subnet Mask") == "255.255.0.0"
    assert lan_value(out, "Default Gateway IP") == "10.20.0.1"
    assert lan_value(out, "IP Address Source") == "Static Address"
    assert lan_value(out, "802.1q VLAN ID") == "42" and lan_value(out, "802.1q VLAN Priority") == "5"
    assert lan_value(out, "MAC Address") == mac

    # and Redfish what ipmitool set
    for args in (("ipaddr", "10.20.30.41"), ("netmask", "255.255.255.0"), ("defgw", "ipaddr", "10.20.30.1"),
                 ("vlan", "id", "off"), ("ipsrc", "dhcp")):
        code, out = await bmc.ipmitool("lan", "set", "1", *args)
        assert code == 0, (args, out)
    async with bmc.client() as client:
        interface = (await client.get(INTERFACE)).json()
        assert interface["IPv4Addresses"] == [{"Address": "10.20.30.41", "SubnetMask": "255.255.255.0",
                                               "AddressOrigin": "DHCP", "Gateway": "10.20.30.1"}]
        assert interface["DHCPv4"] == {"DHCPEnabled": True} and interface["IPv4StaticAddresses"] == []
        assert interface["VLAN"]["VLANEnable"] is False

        # the older forms (OCP's baseline profile requires them writable): IPv4Addresses and NameServers
        assert {"IPv4Addresses", "NameServers", "IPv4StaticAddresses"} <= set(
            interface["@Redfish.WriteableProperties"])
        interface = await patched(client, INTERFACE, {
            "IPv4Addresses": [{"Address": "10.9.8.7", "SubnetMask": "255.255.255.0", "AddressOrigin": "Static"}],
            "NameServers": ["192.0.2.54"]})
        assert interface["IPv4Addresses"] == [{"Address": "10.9.8.7", "SubnetMask": "255.255.255.0",
                                               "AddressOrigin": "Static", "Gateway": "10.20.30.1"}]
        assert interface["StaticNameServers"] == ["192.0.2.54"] and interface["DHCPv4"] == {"DHCPEnabled": False}
    code, out = await bmc.ipmitool("lan", "print", "1")
    assert code == 0 and lan_value(out, "IP Address") == "10.9.8.7", out
    assert lan_value(out, "IP Address Source") == "Static Address"
    async with bmc.client() as client:
        interface = await patched(client, INTERFACE, {"IPv4Addresses": [{"AddressOrigin": "DHCP"}]})
        assert interface["DHCPv4"] == {"DHCPEnabled": True} and interface["IPv4Addresses"][0]["AddressOrigin"] == "DHCP"

        # no static address: the address the IPMI front-end listens on again
        interface = await patched(client, INTERFACE, {"DHCPv4": {"DHCPEnabled": False}, "IPv4StaticAddresses": []})
        assert interface["IPv4Addresses"][0]["Address"] == "127.0.0.1" and interface["IPv4StaticAddresses"] == []
    code, out = await bmc.ipmitool("lan", "print", "1")
    assert code == 0 and lan_value(out, "IP Address") == "127.0.0.1", out


async def test_network_settings_errors(bmc: Bmc):
    async with bmc.client() as client:
        for body, status, message, args in (
                ({"IPv4StaticAddresses": [{"Address": "300.1.1.1"}]}, 400, "PropertyValueFormatError",
                 ["IPv4StaticAddresses/Address"]),
                ({"IPv4StaticAddresses": [{"Address": "10.0.0.2", "SubnetMask": "255.0.255.0"}]}, 400,
                 "PropertyValueFormatError", ["IPv4StaticAddresses/SubnetMask"]),
                ({"IPv4StaticAddresses": [{"Address": "10.0.0.2"}, {"Address": "10.0.0.3"}]}, 400,
                 "ArraySizeTooLong", ["IPv4StaticAddresses"]),
                ({"IPv4StaticAddresses": [{"Address": "10.0.0.2"}], "DHCPv4": {"DHCPEnabled": True}}, 400,
                 "PropertyValueConflict", ["IPv4StaticAddresses"]),
                ({"VLAN": {"VLANEnable": True, "VLANId": 5000}}, 400, "PropertyValueOutOfRange", ["VLAN/VLANId"]),
                ({"VLAN": {"VLANEnable": True, "VLANId": 0}}, 400, "PropertyValueOutOfRange", ["VLAN/VLANId"]),
                ({"VLAN": {"VLANPriority": "high"}}, 400, "PropertyValueTypeError", ["VLAN/VLANPriority"]),
                ({"HostName": "no_underscores"}, 400, "PropertyValueFormatError", ["HostName"]),
                ({"HostName": "a", "FQDN": "b.example.org"}, 400, "PropertyValueConflict", ["FQDN"]),
                ({"StaticNameServers": ["dns.example.org"]}, 400, "PropertyValueFormatError", ["StaticNameServers"]),
                ({"NameServers": ["192.0.2.1"], "StaticNameServers": ["192.0.2.2"]}, 400, "PropertyValueConflict",
                 ["NameServers"]),
                ({"IPv4Addresses": [{"AddressOrigin": "BOOTP"}]}, 400, "PropertyValueNotInList",
                 ["IPv4Addresses/AddressOrigin"]),
                ({"IPv4Addresses": [{"Address": "10.0.0.9", "Bogus": 1}]}, 400, "PropertyNotWritable",
                 ["IPv4Addresses/Bogus"]),
                ({"IPv4Addresses": [{"Address": "10.0.0.2"}], "IPv4StaticAddresses": []}, 400,
                 "PropertyValueConflict", ["IPv4Addresses"]),
                ({"IPv6StaticAddresses": [{"Address": "ff02::1"}]}, 400, "PropertyValueFormatError",
                 ["IPv6StaticAddresses"]),
                ({"IPv6StaticDefaultGateways": [{"Address": "2001:db8::1"}, {"Address": "2001:db8::2"}]}, 400,
                 "ArraySizeTooLong", ["IPv6StaticDefaultGateways"]),
                ({"MACAddress": "02:00:00:00:00:01"}, 400, "PropertyNotWritable", ["MACAddress"]),
                ({"Bogus": 1}, 400, "PropertyUnknown", ["Bogus"]),
        ):
            response = await client.patch(INTERFACE, json=body)
            assert refused(response, status, message, *args), (body, response.text)
        response = await client.patch(INTERFACE, json={"HostName": "x"}, headers={"If-Match": 'W/"0000"'})
        assert refused(response, 412, "PreconditionFailed")
        assert (await client.get(INTERFACE)).json()["HostName"] == "n1"  # nothing was applied
        response = await client.patch(PROTOCOL, json={"NTP": {"NTPServers": ["not a name"]}})
        assert refused(response, 400, "PropertyValueFormatError", "NTP/NTPServers")
        response = await client.patch(PROTOCOL, json={"HTTPS": {"Port": 443}})
        assert refused(response, 400, "PropertyNotWritable", "HTTPS")
    async with bmc.client(VIEWER, VIEWER_PASSWORD) as viewer:
        assert (await viewer.get(INTERFACE)).status_code == 200
        for uri, body in ((INTERFACE, {"HostName": "x"}), (PROTOCOL, {"NTP": {"ProtocolEnabled": True}}),
                          (MANAGER, {"DateTimeLocalOffset": "+01:00"})):
            assert refused(await viewer.patch(uri, json=body), 403, "InsufficientPrivilege"), uri

    # the state service checks what it stores too
    with pytest.raises(BusError) as refusal:
        await bus.request(bmc.nc, "n1", subjects.MANAGER_SET, ManagerSettingsUpdate(host_name="-bad-"),
                          ManagerSettings)
    assert refusal.value.error == "bad_request" and "host name" in refusal.value.message


async def test_names_and_ntp_with_the_dmtf_tacklebox(bmc: Bmc):
    code, out = await bmc.tacklebox("rf_manager_config.py", "-m", "n1", "setnet", "--hostname", "node-bmc",
                                    "--nameservers", "192.0.2.1", "192.0.2.2")
    assert code == 0, out
    code, out = await bmc.tacklebox("rf_manager_config.py", "-m", "n1", "getnet")
    assert code == 0 and "HostName: node-bmc" in out and "NameServers: 192.0.2.1, 192.0.2.2" in out, out
    code, out = await bmc.tacklebox("rf_manager_config.py", "-m", "n1", "setnet", "--fqdn", "node-bmc.lab.example")
    assert code == 0, out
    async with bmc.client() as client:
        interface = (await client.get(INTERFACE)).json()
        assert (interface["HostName"], interface["FQDN"]) == ("node-bmc", "node-bmc.lab.example")

        # NetworkProtocol: the same names, and NTP (arrays PATCHed as DSP0266 says: {} keeps, null removes)
        assert "PATCH" in (await client.get(PROTOCOL)).headers["Allow"]
        protocol = await patched(client, PROTOCOL, {"NTP": {"ProtocolEnabled": True,
                                                            "NTPServers": ["pool.ntp.org", "192.0.2.123"]}})
        assert protocol["FQDN"] == "node-bmc.lab.example" and protocol["NTP"] == {
            "ProtocolEnabled": True, "Port": 123, "NTPServers": ["pool.ntp.org", "192.0.2.123"]}
        protocol = await patched(client, PROTOCOL, {"NTP": {"NTPServers": [None, {}, "time.example.org"]}})
        assert protocol["NTP"]["NTPServers"] == ["192.0.2.123", "time.example.org"]
        protocol = await patched(client, PROTOCOL, {"HostName": "renamed-bmc"})
        assert protocol["HostName"] == "renamed-bmc" and protocol["FQDN"] == "renamed-bmc.lab.example"
        assert (await client.get(INTERFACE)).json()["HostName"] == "renamed-bmc"
    code, out = await bmc.tacklebox("rf_manager_config.py", "-m", "n1", "getprotocol")
    assert code == 0 and "NTP" in out and "time.example.org" in out, out


async def test_clock_redfish_ipmi_and_the_sel(bmc: Bmc):
    async with bmc.client() as client:
        response = await client.get(MANAGER)
        assert "PATCH" in response.headers["Allow"] and response.json()["DateTimeLocalOffset"] == "+00:00"
        # the ETag leaves the ticking clock out: a PATCH with the If-Match of a GET a while ago works
        manager = await patched(client, MANAGER, {"DateTime": "2031-05-06T07:08:09+00:00"})
        assert manager["DateTime"].startswith("2031-05-06T07:") and manager["DateTime"].endswith("+00:00")
    code, out = await bmc.ipmitool("sel", "time", "get")
    assert code == 0 and out.startswith("05/06/31 07:"), out
    # a record added now is stamped with the BMC's clock (Add SEL Entry, IPMI v2.0 §31.6)
    record = ["0x00", "0x00", "0x02", "0", "0", "0", "0", "0x20", "0x00", "0x04", "0x12", "0x04", "0x6f", "0x01",
              "0xff", "0xff"]
    code, out = await bmc.ipmitool("raw", "0x0a", "0x44", *record)
    assert code == 0, out
    code, out = await bmc.ipmitool("sel", "list")
    assert code == 0 and "| 05/06/31 | 07:" in out, out

    code, out = await bmc.ipmitool("sel", "time", "set", "01/02/29 10:00:00")
    assert code == 0, out
    async with bmc.client() as client:
        assert (await client.get(MANAGER)).json()["DateTime"].startswith("2029-01-02T10:0")
        code, out = await bmc.tacklebox("rf_manager_config.py", "-m", "n1", "settime", "--offset", "+05:30")
        assert code == 0, out
        manager = (await client.get(MANAGER)).json()
        assert manager["DateTimeLocalOffset"] == "+05:30" and manager["DateTime"].startswith("2029-01-02T15:3")
        assert manager["DateTime"].endswith("+05:30")
        for body, message in (({"DateTime": "yesterday"}, "PropertyValueFormatError"),
                              ({"DateTime": "2031-05-06T07:08:09"}, "PropertyValueFormatError"),  # no offset
                              ({"DateTime": "2200-01-01T00:00:00Z"}, "PropertyValueOutOfRange"),
                              ({"DateTimeLocalOffset": "+25:00"}, "PropertyValueFormatError"),
                              ({"Model": "other"}, "PropertyNotWritable")):
            assert refused(await client.patch(MANAGER, json=body), 400, message), body
    code, out = await bmc.ipmitool("sel", "time", "get")  # the offset only changes how Redfish shows it
    assert code == 0 and out.startswith("01/02/29 10:0"), out


async def test_renaming_accounts_over_redfish_and_ipmi(bmc: Bmc):
    async with bmc.client() as admin:
        response = await admin.post(ACCOUNTS, json={"UserName": "alice", "Password": "alice-pw-1",
                                                    "RoleId": "Operator"})
        assert response.status_code == 201, response.text
    async with bmc.client(None) as anonymous:
        login = await anonymous.post(SESSIONS, json={"UserName": "alice", "Password": "alice-pw-1"})
        assert login.status_code == 201, login.text
    token = login.headers["X-Auth-Token"]
    async with bmc.client("alice", "alice-pw-1") as alice:  # an Operator renames nobody, itself neither
        assert refused(await alice.patch(f"{ACCOUNTS}/alice", json={"UserName": "alicia"}), 403,
                       "InsufficientPrivilege")

    async with bmc.client() as admin:
        etag = (await admin.get(f"{ACCOUNTS}/alice")).headers["ETag"]
        response = await admin.patch(f"{ACCOUNTS}/alice", json={"UserName": "alice2"}, headers={"If-Match": etag})
        assert response.status_code == 200, response.text
        account = response.json()
        assert account["@odata.id"] == response.headers["Location"] == f"{ACCOUNTS}/alice2"
        assert (account["Id"], account["UserName"], account["RoleId"]) == ("alice2", "alice2", "Operator")
        assert refused(await admin.get(f"{ACCOUNTS}/alice"), 404, "ResourceNotFound")
        members = (await admin.get(ACCOUNTS)).json()["Members"]
        assert {"@odata.id": f"{ACCOUNTS}/alice2"} in members and {"@odata.id": f"{ACCOUNTS}/alice"} not in members
        assert refused(await admin.patch(f"{ACCOUNTS}/alice2", json={"UserName": USER}), 409,
                       "ResourceAlreadyExists")
        assert refused(await admin.patch(f"{ACCOUNTS}/alice2", json={"UserName": "bad:name"}), 400,
                       "PropertyValueFormatError")
        assert refused(await admin.patch(f"{ACCOUNTS}/alice2", json={"UserName": "x" * 17}), 400,
                       "PropertyValueFormatError")
    async with bmc.client(token=token) as old_session:  # the renamed user's session ended
        assert refused(await old_session.get(SYSTEM), 401, "NoValidSession")

    # IPMI knows the new name at once, and not the old one
    code, out = await bmc.ipmitool("-L", "OPERATOR", "chassis", "power", "status", user="alice2", password="alice-pw-1")
    assert code == 0 and "Chassis Power is off" in out, out
    code, out = await bmc.ipmitool("-L", "OPERATOR", "chassis", "power", "status", user="alice", password="alice-pw-1")
    assert code != 0, out

    # a rename over IPMI (Set User Name) is seen by Redfish
    users = (await bus.request(bmc.nc, "n1", subjects.USERS_LIST, None, UserList)).users
    slot = next(user.slot for user in users if user.name == "alice2")
    code, out = await bmc.ipmitool("user", "set", "name", str(slot), "carol")
    assert code == 0, out
    async with bmc.client("carol", "alice-pw-1") as carol:
        account = (await carol.get(f"{ACCOUNTS}/carol")).json()
        assert account["UserName"] == "carol" and account["RoleId"] == "Operator"
    async with bmc.client() as admin:
        members = (await admin.get(ACCOUNTS)).json()["Members"]
        assert {"@odata.id": f"{ACCOUNTS}/carol"} in members and {"@odata.id": f"{ACCOUNTS}/alice2"} not in members


async def test_asset_tag_and_indicator_led_are_chassis_identify(bmc: Bmc):
    async def led() -> tuple[str, bool]:
        async with bmc.client() as client:
            system = (await client.get(SYSTEM)).json()
            return system["IndicatorLED"], system["LocationIndicatorActive"]

    async def identify_state() -> str:
        """As FreeIPMI reads it (ipmitool's chassis status leaves it out)."""
        code, out = await clients.run("ipmi-chassis", "-D", "LAN_2_0", "-h", f"127.0.0.1:{bmc.ipmi_port}", "-u", USER,
                                      "-p", PASSWORD, "--get-chassis-status")
        assert code == 0, out
        return lan_value(out, "Chassis Identify state")

    assert await led() == ("Off", False)
    for args, state in ((("255",), ("Blinking", True)), (("0",), ("Off", False)), (("force",), ("Lit", True))):
        code, out = await bmc.ipmitool("chassis", "identify", *args)
        assert code == 0, out
        assert await led() == state, args
    code, out = await bmc.ipmitool("chassis", "identify", "1")  # no longer forced, and on for a second
    assert code == 0, out
    await wait_for(lambda: led_is(led, ("Off", False)), timeout=30, message="identify off after its interval")

    async with bmc.client() as client:
        for body, state, ipmi in (({"IndicatorLED": "Lit"}, ("Lit", True), "Indefinite on"),
                                  ({"LocationIndicatorActive": False}, ("Off", False), "off"),
                                  ({"IndicatorLED": "Blinking"}, ("Blinking", True), "Timed on"),
                                  ({"LocationIndicatorActive": True}, ("Lit", True), "Indefinite on"),
                                  ({"IndicatorLED": "Off"}, ("Off", False), "off")):
            system = await patched(client, SYSTEM, body)
            assert (system["IndicatorLED"], system["LocationIndicatorActive"]) == state, body
            assert await identify_state() == ipmi, body
        system = await patched(client, SYSTEM, {"AssetTag": "rack-7-u12"})
        assert system["AssetTag"] == "rack-7-u12"
        for body, message in (({"AssetTag": "x" * 65}, "PropertyValueFormatError"),
                              ({"AssetTag": 7}, "PropertyValueTypeError"),
                              ({"IndicatorLED": "Dim"}, "PropertyValueNotInList"),
                              ({"IndicatorLED": "Lit", "LocationIndicatorActive": False}, "PropertyValueConflict")):
            assert refused(await client.patch(SYSTEM, json=body), 400, message), body
        assert (await client.get(SYSTEM)).json()["AssetTag"] == "rack-7-u12"
    async with bmc.client(VIEWER, VIEWER_PASSWORD) as viewer:
        assert refused(await viewer.patch(SYSTEM, json={"AssetTag": "mine"}), 403, "InsufficientPrivilege")


async def led_is(led, expected: tuple[str, bool]) -> bool:
    return await led() == expected
