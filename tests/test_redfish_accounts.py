"""Redfish sessions and accounts against the real services: session login and logout, tokens
shared by two Redfish replicas, session expiry (on the real JetStream bucket, with a fake clock),
and accounts that are the BMC users IPMI has, so an account made over Redfish logs in over IPMI."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import clients
import httpx
import msgspec
import pytest
from conftest import free_tcp_port, free_udp_port, no_exception_logged, toml_list, wait_for, write_config
from guest_images import GuestImages
from qemu_bmc_redfish import sessions as session_store
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import PasswordSet, User, UserAccessUpdate, UserList, UserUpdate
from test_redfish import PASSWORD, USER

SESSIONS = "/redfish/v1/SessionService/Sessions"
ACCOUNTS = "/redfish/v1/AccountService/Accounts"
SYSTEM = "/redfish/v1/Systems/n1"
RESET = f"{SYSTEM}/Actions/ComputerSystem.Reset"


class Bmc:
    """The state, machine, IPMI LAN and two Redfish services of one machine n1."""

    def __init__(self, nc, urls: list[str], ipmi_port: int) -> None:
        self.nc, self.urls, self.ipmi_port = nc, urls, ipmi_port

    def client(self, user: str | None = USER, password: str = PASSWORD, token: str | None = None,
               replica: int = 0) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.urls[replica], verify=False, timeout=60,
                                 auth=(user, password) if user is not None and token is None else None,
                                 headers={"X-Auth-Token": token} if token else None)

    async def login(self, user: str = USER, password: str = PASSWORD) -> httpx.Response:
        async with self.client(None) as anonymous:
            return await anonymous.post(SESSIONS, json={"UserName": user, "Password": password})

    async def ipmitool(self, user: str, password: str, *args: str) -> tuple[int, str]:
        return await clients.ipmitool(self.ipmi_port, *args, user=user, password=password, timeout=1, retries=1)


@pytest.fixture
async def bmc(nc, services, short_dir: Path, images: GuestImages) -> AsyncIterator[Bmc]:
    ports, ipmi_port = [free_tcp_port(), free_tcp_port()], free_udp_port()
    machines = (f'[vm.n1]\ncmd = {toml_list(images.qemu_args(nic=False))}\n'
                f'ipmi = "127.0.0.1:{ipmi_port}"\n')
    config = write_config(short_dir, f'[redfish]\nlisten = "127.0.0.1:{ports[0]}"\n{machines}')
    second = short_dir / "replica.toml"
    second.write_text(config.read_text().replace(f":{ports[0]}", f":{ports[1]}"))
    await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD})
    await services("machine", config, "--stop-vms-on-exit")
    await services("ipmi-lan", config)
    await services("redfish", config)
    await services("redfish", second)
    bmc = Bmc(nc, [f"https://127.0.0.1:{port}" for port in ports], ipmi_port)

    async def replica_up() -> bool:
        async with bmc.client(replica=1) as client:
            try:
                return (await client.get("/redfish/v1")).status_code == 200
            except httpx.TransportError:
                return False

    await wait_for(replica_up, timeout=15, message="the second Redfish replica")
    with no_exception_logged(short_dir / "redfish.log"):
        yield bmc


def message_id(response: httpx.Response) -> str:
    return response.json()["error"]["@Message.ExtendedInfo"][0]["MessageId"].rsplit(".", 1)[1]


async def add_user(nc, slot: int, name: str, password: str, privilege: int) -> None:
    """A user made in-band (as ipmitool user set … would), straight on the bus."""
    await bus.request(nc, "n1", subjects.USERS_SET, UserUpdate(slot=slot, name=name, enabled=True), User)
    await bus.request(nc, "n1", subjects.USERS_PASSWORD, PasswordSet(slot=slot, password=password), User)
    await bus.request(nc, "n1", subjects.USERS_ACCESS,
                      UserAccessUpdate(slot=slot, channel=1, privilege=privilege, ipmi_messaging=True), User)


async def test_session_login_use_and_logout(bmc: Bmc):
    response = await bmc.login()
    assert response.status_code == 201, response.text
    token, location = response.headers["X-Auth-Token"], response.headers["Location"]
    session = response.json()
    assert location == session["@odata.id"] == f"{SESSIONS}/{session['Id']}"
    assert session["UserName"] == USER and "Password" not in session and token not in response.text
    assert session["@odata.type"] == "#Session.v1_8_0.Session"

    async with bmc.client(token=token) as client:
        assert (await client.get(SYSTEM)).status_code == 200
        assert (await client.get("/redfish/v1/Systems")).json()["Members"] == [{"@odata.id": SYSTEM}]
        assert (await client.post(RESET, json={"ResetType": "On"})).status_code == 204
        assert (await client.get(SYSTEM)).json()["PowerState"] == "On"
        assert (await client.post(RESET, json={"ResetType": "ForceOff"})).status_code == 204
        service = (await client.get("/redfish/v1/SessionService/")).json()
        assert service["SessionTimeout"] == 1800 and service["ServiceEnabled"] is True
        assert {"@odata.id": location} in (await client.get(SESSIONS)).json()["Members"]
        assert (await client.get(location)).json()["UserName"] == USER
    async with bmc.client(None) as anonymous:
        response = await anonymous.get(SYSTEM)
        assert response.status_code == 401 and message_id(response) == "NoValidSession"
        root = (await anonymous.get("/redfish/v1")).json()
        assert root["Links"]["Sessions"] == {"@odata.id": SESSIONS}
        assert root["SessionService"] == {"@odata.id": "/redfish/v1/SessionService"}
    async with bmc.client(token="not-a-token") as forged:
        assert (await forged.get(SYSTEM)).status_code == 401

    async with bmc.client(token=token, replica=1) as other_replica:  # made by the first, used by the second
        assert (await other_replica.get(SYSTEM)).status_code == 200
        assert (await other_replica.delete(location)).status_code == 204
        assert (await other_replica.get(SYSTEM)).status_code == 401
    async with bmc.client(token=token) as client:  # the first refuses a change at once, and forgets it
        assert (await client.post(RESET, json={"ResetType": "On"})).status_code == 401
        await wait_for(lambda: unauthorized(client), message="a 401 after logout")
    async with bmc.client() as client:
        assert (await client.get(location)).status_code == 404

    wrong = await bmc.login(password="wrong")
    assert wrong.status_code == 401 and message_id(wrong) == "NoValidSession" and "X-Auth-Token" not in wrong.headers
    assert (await bmc.login(user="nobody")).status_code == 401
    async with bmc.client(None) as anonymous:
        response = await anonymous.post(SESSIONS, json={"UserName": USER})
        assert response.status_code == 400 and message_id(response) == "CreateFailedMissingReqProperties"
        response = await anonymous.post(SESSIONS, content=b"{nope")
        assert response.status_code == 400 and message_id(response) == "MalformedJSON"


async def unauthorized(client: httpx.AsyncClient) -> bool:
    return (await client.get(SYSTEM)).status_code == 401


async def test_session_follows_the_user_live(bmc: Bmc):
    """The role is read at each request that changes something: a demoted user's session loses the
    reset at once (on every replica), a disabled user's session stops working (a read, as soon as
    the announcement arrives), and other users' sessions are theirs."""
    await add_user(bmc.nc, 4, "ops", "ops-pass-1", 3)
    response = await bmc.login("ops", "ops-pass-1")
    assert response.status_code == 201, response.text
    token, location = response.headers["X-Auth-Token"], response.headers["Location"]
    admin_session = (await bmc.login()).headers["Location"]
    async with bmc.client(token=token) as ops:
        assert (await ops.post(RESET, json={"ResetType": "ForceOff"})).status_code == 204
        assert (await ops.get(admin_session)).status_code == 403  # not its session, not an Administrator
        assert (await ops.get(SESSIONS)).json()["Members"] == [{"@odata.id": location}]
        async with bmc.client(token=token, replica=1) as ops_elsewhere:
            assert (await ops_elsewhere.get(SYSTEM)).status_code == 200  # the other replica keeps the user
            await bus.request(bmc.nc, "n1", subjects.USERS_ACCESS, UserAccessUpdate(slot=4, channel=1, privilege=2),
                              User)
            for replica in (ops_elsewhere, ops):
                response = await replica.post(RESET, json={"ResetType": "ForceOff"})
                assert response.status_code == 403 and message_id(response) == "InsufficientPrivilege"
        assert (await ops.get(SYSTEM)).status_code == 200
        other = (await bmc.login("ops", "ops-pass-1")).headers["Location"]
        assert (await ops.delete(other)).status_code == 204  # ReadOnly ends its own sessions (ConfigureSelf)
        assert (await ops.delete(admin_session)).status_code == 403
    async with bmc.client() as admin:  # an Administrator sees and ends any session of its machines
        members = (await admin.get(SESSIONS)).json()["Members"]
        assert {"@odata.id": location} in members and {"@odata.id": admin_session} in members
        other = (await bmc.login("ops", "ops-pass-1")).headers["Location"]
        assert (await admin.delete(other)).status_code == 204
        assert {"@odata.id": other} not in (await admin.get(SESSIONS)).json()["Members"]
    async with bmc.client(token=token) as ops:  # disabling a user ends its sessions
        await bus.request(bmc.nc, "n1", subjects.USERS_SET, UserUpdate(slot=4, enabled=False), User)
        assert (await ops.post(RESET, json={"ResetType": "On"})).status_code == 401
        await wait_for(lambda: unauthorized(ops), message="a 401 for the disabled user's read")
        await bus.request(bmc.nc, "n1", subjects.USERS_SET, UserUpdate(slot=4, enabled=True), User)
        assert (await ops.get(SYSTEM)).status_code == 401
    async with bmc.client() as admin:
        assert {"@odata.id": location} not in (await admin.get(SESSIONS)).json()["Members"]


async def test_session_expiry_on_the_bucket(nc):
    """Expiry with a fake clock on the real JetStream bucket: each use moves last_used on (written
    back at most every timeout/10 s here), a session unused for the time-out is gone, on every
    replica; the bucket never holds the token."""
    now = [1_000_000.0]
    first = session_store.SessionStore(nc, timeout=30, clock=lambda: now[0], cache_seconds=0)
    second = session_store.SessionStore(nc, timeout=30, clock=lambda: now[0])
    token, record = await first.create("admin", {"n1": 2})
    kv = await first.bucket()
    entry = await kv.get(session_store.key_of(record.token_sha256))
    assert token.encode() not in entry.value and b'"user":"admin"' in entry.value
    status = await nc.jetstream().stream_info(f"KV_{session_store.BUCKET}")
    assert status.config.max_age >= 86400

    now[0] += 2
    assert (await first.lookup(token)) is not None  # used within the touch interval: nothing written
    assert msgspec.json.decode((await kv.get(session_store.key_of(record.token_sha256))).value)["last_used"] \
        == record.created
    now[0] += 25
    assert (await second.lookup(token)).last_used == now[0]  # the other replica sees it, and writes it back
    now[0] += 29
    assert (await first.lookup(token)) is not None  # 29 s after the last use: alive
    assert (await second.get(record.id)).user == "admin"
    now[0] += 30.5
    assert (await second.lookup(token)) is None  # 30.5 s unused: expired, removed from the bucket
    assert (await first.lookup(token)) is None and (await first.get(record.id)) is None
    assert record.id not in [session.id for session in await first.all()]

    token, record = await first.create("admin", {"n1": 2})
    assert (await second.lookup(token)) is not None
    await first.delete(record)  # logout on one replica: the other forgets its cached copy at once
    await wait_for(lambda: record.token_sha256 not in second.cache, message="the cache to forget")
    assert (await second.lookup(token)) is None
    await first.close()
    await second.close()


async def test_accounts_are_bmc_users(bmc: Bmc):
    """An account made over Redfish works over Redfish and IPMI at once; password, role and
    deletion take effect at once on both."""
    async with bmc.client() as admin:
        service = (await admin.get("/redfish/v1/AccountService")).json()
        assert (service["MinPasswordLength"], service["MaxPasswordLength"]) == (8, 20)
        assert service["Accounts"] == {"@odata.id": ACCOUNTS}
        response = await admin.post(ACCOUNTS, json={"UserName": "maas", "Password": "maas-pass-1",
                                                     "RoleId": "Administrator"})
        assert response.status_code == 201, response.text
        assert response.headers["Location"] == f"{ACCOUNTS}/maas"
        account = response.json()
        assert (account["Id"], account["RoleId"], account["Enabled"], account["Password"]) == (
            "maas", "Administrator", True, None)
        assert account["Links"]["Role"] == {"@odata.id": "/redfish/v1/AccountService/Roles/Administrator"}
        members = (await admin.get(ACCOUNTS + "/")).json()["Members"]
        assert {"@odata.id": f"{ACCOUNTS}/maas"} in members and {"@odata.id": f"{ACCOUNTS}/admin"} in members

    async with bmc.client("maas", "maas-pass-1") as maas:
        assert (await maas.get(SYSTEM)).status_code == 200
    assert (await bmc.login("maas", "maas-pass-1")).status_code == 201
    code, out = await bmc.ipmitool("maas", "maas-pass-1", "power", "status")
    assert code == 0 and "Chassis Power is off" in out, out

    async with bmc.client() as admin:
        response = await admin.patch(f"{ACCOUNTS}/maas", json={"Password": "maas-pass-2"})
        assert response.status_code == 200, response.text
    async with bmc.client("maas", "maas-pass-1") as old:
        assert (await old.get(SYSTEM)).status_code == 401
    assert (await bmc.ipmitool("maas", "maas-pass-1", "power", "status"))[0] != 0
    assert (await bmc.ipmitool("maas", "maas-pass-2", "power", "status"))[0] == 0
    session = await bmc.login("maas", "maas-pass-2")
    token = session.headers["X-Auth-Token"]

    async with bmc.client() as admin:
        response = await admin.patch(f"{ACCOUNTS}/maas", json={"RoleId": "ReadOnly"})
        assert response.status_code == 200 and response.json()["RoleId"] == "ReadOnly"
    async with bmc.client("maas", "maas-pass-2") as maas:
        response = await maas.post(RESET, json={"ResetType": "On"})
        assert response.status_code == 403 and message_id(response) == "InsufficientPrivilege"
        assert (await maas.get(f"{ACCOUNTS}/maas")).json()["RoleId"] == "ReadOnly"  # its own account
        assert (await maas.get(f"{ACCOUNTS}/admin")).status_code == 403
        assert (await maas.get(ACCOUNTS)).json()["Members"] == [{"@odata.id": f"{ACCOUNTS}/maas"}]
        response = await maas.post(ACCOUNTS, json={"UserName": "x", "Password": "x-pass", "RoleId": "ReadOnly"})
        assert response.status_code == 403 and message_id(response) == "InsufficientPrivilege"
        assert (await maas.patch(f"{ACCOUNTS}/maas", json={"RoleId": "Administrator"})).status_code == 403
        assert (await maas.patch(f"{ACCOUNTS}/admin", json={"Password": "taken-over"})).status_code == 403
        assert (await maas.delete(f"{ACCOUNTS}/admin")).status_code == 403
        response = await maas.patch(f"{ACCOUNTS}/maas", json={"Password": "maas-pass-3"})  # ConfigureSelf
        assert response.status_code in (200, 204), response.text
    async with bmc.client("maas", "maas-pass-3") as maas:
        assert (await maas.get(SYSTEM)).status_code == 200
    async with bmc.client(token=token) as maas:  # its session made with the old password ended
        assert (await maas.get(SYSTEM)).status_code == 401

    async with bmc.client() as admin:
        assert (await admin.delete(f"{ACCOUNTS}/maas")).status_code == 204
        assert (await admin.get(f"{ACCOUNTS}/maas")).status_code == 404
    async with bmc.client("maas", "maas-pass-3") as maas:
        assert (await maas.get(SYSTEM)).status_code == 401
    async with bmc.client(token=token) as maas:
        assert (await maas.get(SYSTEM)).status_code == 401
    assert (await bmc.ipmitool("maas", "maas-pass-3", "power", "status"))[0] != 0
    async with bmc.client() as admin:  # made again, in the same slot: the old session stays ended
        response = await admin.post(ACCOUNTS, json={"UserName": "maas", "Password": "maas-pass-4",
                                                    "RoleId": "Administrator"})
        assert response.status_code == 201
    async with bmc.client(token=token) as maas:
        assert (await maas.get(SYSTEM)).status_code == 401
    async with bmc.client() as admin:
        assert (await admin.delete(f"{ACCOUNTS}/maas")).status_code == 204
    users = (await bus.request(bmc.nc, "n1", subjects.USERS_LIST, None, UserList)).users
    assert all(user.name != "maas" for user in users)
    freed = next(user for user in users if user.slot == 3)
    assert (freed.name, freed.enabled, freed.password_set, freed.channels[1].privilege) == ("", False, False, 15)


async def test_account_rules_and_errors(bmc: Bmc):
    await add_user(bmc.nc, 6, "inband", "inband-pass", 3)
    async with bmc.client() as admin:
        members = (await admin.get(ACCOUNTS)).json()["Members"]
        assert {"@odata.id": f"{ACCOUNTS}/inband"} in members  # made over the bus, seen at once
        account = (await admin.get(f"{ACCOUNTS}/inband")).json()
        assert (account["UserName"], account["RoleId"], account["Enabled"]) == ("inband", "Operator", True)

        response = await admin.delete(f"{ACCOUNTS}/{USER}")  # the last Administrator
        assert response.status_code == 409 and message_id(response) == "ResourceCannotBeDeleted"
        for change in ({"RoleId": "Operator"}, {"Enabled": False}):
            response = await admin.patch(f"{ACCOUNTS}/{USER}", json=change)
            assert response.status_code == 409 and message_id(response) == "PropertyValueResourceConflict"
        assert (await admin.get(SYSTEM)).status_code == 200

        good = {"UserName": "newuser", "Password": "new-pass-1", "RoleId": "Operator"}
        for body, status, expected in (
                ({"UserName": "newuser", "Password": "new-pass-1"}, 400, "CreateFailedMissingReqProperties"),
                ({**good, "RoleId": "King"}, 400, "PropertyValueNotInList"),
                ({**good, "Password": "p" * 21}, 400, "PasswordIncorrectLength"),
                ({**good, "Password": ""}, 400, "PasswordIncorrectLength"),
                ({**good, "UserName": "u" * 17}, 400, "PropertyValueFormatError"),
                ({**good, "UserName": "with:colon"}, 400, "PropertyValueFormatError"),
                ({**good, "Enabled": "yes"}, 400, "PropertyValueTypeError"),
                ({**good, "Colour": "blue"}, 400, "PropertyUnknown"),
                ({**good, "UserName": "inband"}, 409, "ResourceAlreadyExists"),
                ({**good, "UserName": USER}, 409, "ResourceAlreadyExists")):
            response = await admin.post(ACCOUNTS, json=body)
            assert response.status_code == status and message_id(response) == expected, (body, response.text)
        response = await admin.post(ACCOUNTS, content=b"[1]")
        assert response.status_code == 400 and message_id(response) == "MalformedJSON"
        response = await admin.patch(f"{ACCOUNTS}/inband", json={"RoleId": "Root"})
        assert response.status_code == 400 and message_id(response) == "PropertyValueNotInList"
        response = await admin.patch(f"{ACCOUNTS}/inband", json={"Id": "renamed"})  # UserName renames it
        assert response.status_code == 400 and message_id(response) == "PropertyNotWritable"
        assert (await admin.patch(f"{ACCOUNTS}/nobody", json={"Enabled": True})).status_code == 404

        response = await admin.post(ACCOUNTS, json={**good, "Enabled": False})
        assert response.status_code == 201 and response.json()["Enabled"] is False
    assert (await bmc.login("newuser", "new-pass-1")).status_code == 401  # disabled
    async with bmc.client() as admin:
        assert (await admin.patch(f"{ACCOUNTS}/newuser", json={"Enabled": True})).json()["Enabled"] is True
    assert (await bmc.login("newuser", "new-pass-1")).status_code == 201

    async with bmc.client() as admin:  # with a second Administrator, the first may go
        await admin.patch(f"{ACCOUNTS}/newuser", json={"RoleId": "Administrator"})
        assert (await admin.patch(f"{ACCOUNTS}/{USER}", json={"RoleId": "Operator"})).status_code == 200
    async with bmc.client("newuser", "new-pass-1") as newuser:
        response = await newuser.delete(f"{ACCOUNTS}/newuser")  # itself, now the last Administrator
        assert response.status_code == 409

        roles = (await newuser.get("/redfish/v1/AccountService/Roles")).json()
        assert {"@odata.id": "/redfish/v1/AccountService/Roles/ReadOnly"} in roles["Members"]
        role = (await newuser.get("/redfish/v1/AccountService/Roles/Operator")).json()
        assert role["@odata.type"] == "#Role.v1_3_3.Role" and role["IsPredefined"] is True
        assert set(role["AssignedPrivileges"]) == {"Login", "ConfigureComponents", "ConfigureSelf"}
        assert (await newuser.get("/redfish/v1/AccountService/Roles/Root")).status_code == 404


async def test_accounts_made_at_once_on_two_replicas(bmc: Bmc):
    """Each replica picks the first free user slot: made at the same instant, the two accounts
    still get a slot each (the state service writes a name only into a slot that is still free)."""
    names = [f"pair{index}{side}" for index in range(4) for side in "ab"]

    async def create(name: str, replica: int) -> httpx.Response:
        async with bmc.client(replica=replica) as client:
            return await client.post(ACCOUNTS, json={"UserName": name, "Password": "Pair-Pass-1", "RoleId": "Operator"})

    for first, second in zip(names[::2], names[1::2], strict=True):
        made = await asyncio.gather(create(first, 0), create(second, 1))
        assert [response.status_code for response in made] == [201, 201], [response.text for response in made]
    users = (await bus.request(bmc.nc, "n1", subjects.USERS_LIST, None, UserList)).users
    slots = {user.name: user.slot for user in users if user.name in names}
    assert sorted(slots) == sorted(names) and len(set(slots.values())) == len(names), slots
    for name in names:
        async with bmc.client(user=name, password="Pair-Pass-1") as client:
            assert (await client.get(SYSTEM)).status_code == 200, name
        async with bmc.client() as client:
            assert (await client.delete(f"{ACCOUNTS}/{name}")).status_code == 204
