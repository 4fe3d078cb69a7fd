"""PasswordChangeRequired (DSP0266 "Password change required handling") against the real
services: with ``[redfish] password_change_required = true`` an account made over Redfish must
change its password first. Until then it may log in (a session whose body says so), GET its own
account, PATCH its own Password and log out; every other request is 403 PasswordChangeRequired,
with Basic credentials and session tokens alike, and IPMI over LAN refuses it. An Administrator
sets and clears the flag; any new password clears it (IPMI's Set User Password too). DMTF's
use-case checker (Account Management, in test_redfish_conformance.py, with the policy on) passes
"Disable Password Change Required"."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import clients
import httpx
import pytest
from conftest import free_tcp_port, free_udp_port, no_exception_logged, toml_list, write_config
from guest_images import GuestImages
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.config import ConfigError, load
from qemu_bmc_shared.messages import User, UserList
from test_redfish import PASSWORD, USER

ACCOUNTS = "/redfish/v1/AccountService/Accounts"
SESSIONS = "/redfish/v1/SessionService/Sessions"
SYSTEM = "/redfish/v1/Systems/n1"


class Bmc:
    """The state, machine, IPMI over LAN and Redfish services of one machine n1, with the policy on."""

    def __init__(self, nc, directory: Path, url: str, ipmi_port: int) -> None:
        self.nc, self.directory, self.url, self.ipmi_port = nc, directory, url, ipmi_port

    def client(self, user: str | None = USER, password: str = PASSWORD, token: str | None = None
               ) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, verify=False, timeout=60,
                                 auth=(user, password) if user is not None and token is None else None,
                                 headers={"X-Auth-Token": token} if token else None)

    async def login(self, user: str, password: str) -> httpx.Response:
        async with self.client(None) as anonymous:
            return await anonymous.post(SESSIONS, json={"UserName": user, "Password": password})

    async def ipmitool(self, user: str, password: str, *args: str, privilege: str = "OPERATOR",
                       interface: tuple[str, ...] = ("-I", "lanplus", "-C", "3")) -> tuple[int, str]:
        return await clients.ipmitool(self.ipmi_port, "-L", privilege, *args, user=user, password=password,
                                      interface=interface, timeout=1, retries=1)

    async def user(self, name: str) -> User:
        users = (await bus.request(self.nc, "n1", subjects.USERS_LIST, None, UserList)).users
        return next(user for user in users if user.name == name)


@pytest.fixture
async def bmc(nc, services, short_dir: Path, images: GuestImages) -> AsyncIterator[Bmc]:
    port, ipmi_port = free_tcp_port(), free_udp_port()
    config = write_config(short_dir, f'[redfish]\nlisten = "127.0.0.1:{port}"\npassword_change_required = true\n'
                                     f''
                                     f'[vm.n1]\ncmd = {toml_list(images.qemu_args(nic=False))}\n'
                                     f'ipmi = "127.0.0.1:{ipmi_port}"\n')
    await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD})
    await services("machine", config, "--stop-vms-on-exit")
    await services("ipmi-lan", config)
    await services("redfish", config)
    with no_exception_logged(short_dir / "redfish.log"):
        yield Bmc(nc, short_dir, f"https://127.0.0.1:{port}", ipmi_port)


def extended_info(response: httpx.Response) -> list[dict]:
    body = response.json()
    return body["error"]["@Message.ExtendedInfo"] if "error" in body else body["@Message.ExtendedInfo"]


def asks_for_password_change(response: httpx.Response, account: str) -> bool:
    """A response carrying the Base registry's PasswordChangeRequired message for ``account``."""
    return any(info["MessageId"].startswith("Base.") and info["MessageId"].endswith(".PasswordChangeRequired")
               and info["MessageArgs"] == [account] for info in extended_info(response))


def test_the_policy_in_the_config(tmp_path: Path):
    path = tmp_path / "qemu-bmc.toml"
    path.write_text("[redfish]\n")
    assert load(path).redfish.password_change_required is False
    path.write_text("[redfish]\npassword_change_required = true\n")
    assert load(path).redfish.password_change_required is True
    path.write_text('[redfish]\npassword_change_required = "yes"\n')
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: redfish.password_change_required: must be true"):
        load(path)


async def test_a_new_account_changes_its_password_first(bmc: Bmc):
    account = f"{ACCOUNTS}/alice"
    async with bmc.client() as admin:
        response = await admin.post(ACCOUNTS, json={"UserName": "alice", "Password": "first-pass",
                                                    "RoleId": "Operator"})
        assert response.status_code == 201 and response.json()["PasswordChangeRequired"] is True, response.text
        assert (await admin.get(account)).json()["PasswordChangeRequired"] is True
        admin_session = (await bmc.login(USER, PASSWORD)).json()["@odata.id"]
    assert (await bmc.user("alice")).password_change_required
    code, out = await bmc.ipmitool("alice", "first-pass", "power", "status")
    assert code != 0 and "Unable to establish IPMI v2 / RMCP+ session" in out, out  # refused at RAKP 2
    code, out = await bmc.ipmitool("alice", "first-pass", "power", "status", interface=("-I", "lan", "-A", "MD5"))
    assert code != 0 and "Invalid user name" in out, out  # IPMI 1.5: Get Session Challenge 0x81

    async with bmc.client("alice", "first-pass") as basic:  # Basic credentials: its own account only
        response = await basic.get(account)
        assert response.status_code == 200 and response.json()["PasswordChangeRequired"] is True
        for method, path, body in (("GET", SYSTEM, None), ("GET", "/redfish/v1/Systems", None),
                                   ("GET", ACCOUNTS, None), ("GET", f"{ACCOUNTS}/{USER}", None),
                                   ("GET", SESSIONS, None), ("GET", "/redfish/v1/Managers/n1", None),
                                   ("POST", f"{SYSTEM}/Actions/ComputerSystem.Reset", {"ResetType": "On"}),
                                   ("PATCH", account, {"RoleId": "Administrator"}),
                                   ("PATCH", account, {"Password": "other-pass", "Enabled": True}),
                                   ("PATCH", f"{ACCOUNTS}/{USER}", {"Password": "taken-over"}),
                                   ("DELETE", admin_session, None)):
            response = await basic.request(method, path, json=body)
            assert response.status_code == 403 and asks_for_password_change(response, account), (method, path)
        assert (await basic.get("/redfish/v1")).status_code == 200  # the service root needs no login
    async with bmc.client("alice", "wrong-pass") as wrong:
        assert (await wrong.get(account)).status_code == 401

    first = await bmc.login("alice", "first-pass")  # a session, saying what must be done
    assert first.status_code == 201 and asks_for_password_change(first, account), first.text
    second = await bmc.login("alice", "first-pass")
    token = first.headers["X-Auth-Token"]
    async with bmc.client(token=token) as session:
        for path in (SYSTEM, first.headers["Location"], SESSIONS):
            response = await session.get(path)
            assert response.status_code == 403 and asks_for_password_change(response, account), path
        assert (await session.delete(admin_session)).status_code == 403
        assert (await session.delete(second.headers["Location"])).status_code == 204  # logs out
        response = await session.get(account)
        assert response.status_code == 200
        response = await session.patch(account, json={"Password": "second-pass"},
                                       headers={"If-Match": response.headers["ETag"]})
        assert response.status_code == 200 and response.json()["PasswordChangeRequired"] is False, response.text
        assert (await session.get(SYSTEM)).status_code == 200  # the same session, now unrestricted
        assert (await session.delete(first.headers["Location"])).status_code == 204
    assert not (await bmc.user("alice")).password_change_required
    async with bmc.client("alice", "first-pass") as old:
        assert (await old.get(SYSTEM)).status_code == 401
    async with bmc.client("alice", "second-pass") as alice:
        assert (await alice.get(SYSTEM)).status_code == 200
        assert (await alice.get(SESSIONS)).status_code == 200
    code, out = await bmc.ipmitool("alice", "second-pass", "power", "status")
    assert code == 0 and "Chassis Power is off" in out, out


async def test_an_administrator_sets_and_clears_the_flag(bmc: Bmc):
    account = f"{ACCOUNTS}/bob"
    async with bmc.client() as admin:
        response = await admin.post(ACCOUNTS, json={"UserName": "bob", "Password": "bob-pass-1", "RoleId": "Operator",
                                                    "PasswordChangeRequired": False})
        assert response.status_code == 201 and response.json()["PasswordChangeRequired"] is False
        response = await admin.post(ACCOUNTS, json={"UserName": "carol", "Password": "carol-pass",
                                                    "RoleId": "ReadOnly", "PasswordChangeRequired": "yes"})
        assert response.status_code == 400 and extended_info(response)[0]["MessageId"].endswith("TypeError")
    async with bmc.client("bob", "bob-pass-1") as bob:
        assert (await bob.get(SYSTEM)).status_code == 200
        response = await bob.patch(account, json={"PasswordChangeRequired": True})  # not its own to set
        assert response.status_code == 403 and extended_info(response)[0]["MessageId"].endswith("InsufficientPrivilege")

    async with bmc.client() as admin:
        response = await admin.patch(account, json={"PasswordChangeRequired": True})
        assert response.status_code == 200 and response.json()["PasswordChangeRequired"] is True
    async with bmc.client("bob", "bob-pass-1") as bob:
        response = await bob.get(SYSTEM)
        assert response.status_code == 403 and asks_for_password_change(response, account)
    assert (await bmc.ipmitool("bob", "bob-pass-1", "power", "status"))[0] != 0

    async with bmc.client() as admin:
        response = await admin.patch(account, json={"PasswordChangeRequired": False})
        assert response.status_code == 200 and response.json()["PasswordChangeRequired"] is False
    async with bmc.client("bob", "bob-pass-1") as bob:
        assert (await bob.get(SYSTEM)).status_code == 200
    assert (await bmc.ipmitool("bob", "bob-pass-1", "power", "status"))[0] == 0

    async with bmc.client() as admin:  # a new password the user must replace at once
        response = await admin.patch(account, json={"Password": "bob-pass-2", "PasswordChangeRequired": True})
        assert response.status_code == 200 and response.json()["PasswordChangeRequired"] is True
        response = await admin.patch(account, json={"Password": "bob-pass-3"})  # a new password alone clears it
        assert response.status_code == 200 and response.json()["PasswordChangeRequired"] is False
        await admin.patch(account, json={"PasswordChangeRequired": True})
    async with bmc.client("bob", "bob-pass-3") as bob:
        assert (await bob.get(SYSTEM)).status_code == 403

    slot = (await bmc.user("bob")).slot  # IPMI Set User Password clears it as well
    code, out = await bmc.ipmitool(USER, PASSWORD, "user", "set", "password", str(slot), "bob-pass-4",
                                   privilege="ADMINISTRATOR")
    assert code == 0, out
    assert not (await bmc.user("bob")).password_change_required
    async with bmc.client("bob", "bob-pass-4") as bob:
        assert (await bob.get(SYSTEM)).status_code == 200
        assert (await bob.get(account)).json()["PasswordChangeRequired"] is False
    assert (await bmc.ipmitool("bob", "bob-pass-4", "power", "status"))[0] == 0
