"""The account policy against the real services and clients: a Redfish brute force locks the
account out from its source for Redfish and IPMI alike and not from elsewhere, the lockout ends
after its duration; MinPasswordLength over Redfish and IPMI; sessions end with the password;
session limits; nothing is kept for unauthenticated requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import clients
import httpx
import pytest
from conftest import free_tcp_port, free_udp_port, toml_list, wait_for, write_config
from guest_images import GuestImages
from test_redfish import PASSWORD, USER
from test_redfish_accounts import ACCOUNTS, SESSIONS, SYSTEM, message_id

SERVICE = "/redfish/v1/AccountService"
ATTACKER = "127.0.0.2"


class Bmc:
    def __init__(self, url: str, ipmi_port: int, redfish_pid: int) -> None:
        self.url, self.ipmi_port, self.redfish_pid = url, ipmi_port, redfish_pid

    def client(self, user: str | None = USER, password: str = PASSWORD, source: str = "127.0.0.1",
               token: str | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, verify=False, timeout=60,
                                 transport=httpx.AsyncHTTPTransport(local_address=source, verify=False),
                                 auth=(user, password) if user is not None and token is None else None,
                                 headers={"X-Auth-Token": token} if token else None)

    async def ipmitool(self, *args: str, user: str = USER, password: str = PASSWORD) -> tuple[int, str]:
        return await clients.ipmitool(self.ipmi_port, *args, user=user, password=password, timeout=1, retries=1)


@pytest.fixture
async def bmc(nc, services, short_dir: Path, images: GuestImages) -> AsyncIterator[Bmc]:
    port, ipmi_port = free_tcp_port(), free_udp_port()
    config = write_config(short_dir, f'[redfish]\nlisten = "127.0.0.1:{port}"\nmax_sessions_per_user = 4\n'
                                     f'[vm.n1]\ncmd = {toml_list(images.qemu_args(nic=False))}\n'
                                     f'ipmi = "127.0.0.1:{ipmi_port}"\n')
    await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD})
    await services("machine", config, "--stop-vms-on-exit")
    await services("ipmi-lan", config)
    redfish = await services("redfish", config)
    yield Bmc(f"https://127.0.0.1:{port}", ipmi_port, redfish.process.pid)


async def test_brute_force_locks_the_source_out_of_redfish_and_ipmi(bmc: Bmc):
    async with bmc.client() as admin:
        service = (await admin.get(SERVICE)).json()
        assert service["AccountLockoutThreshold"] == 5 and service["AccountLockoutDuration"] == 60
        assert service["MinPasswordLength"] == 8
        assert "AccountLockoutThreshold" in service["@Redfish.WriteableProperties"]
        response = await admin.patch(SERVICE, json={"AccountLockoutThreshold": 3, "AccountLockoutDuration": 3,
                                                    "AccountLockoutCounterResetAfter": 3})
        assert response.status_code == 200, response.text
        assert response.json()["AccountLockoutDuration"] == 3
        conflict = await admin.patch(SERVICE, json={"AccountLockoutCounterResetAfter": 30})
        assert conflict.status_code == 400 and message_id(conflict) == "PropertyValueConflict"
    async with bmc.client(password="not-the-password", source=ATTACKER) as attacker:
        for _ in range(3):
            assert (await attacker.get(SYSTEM)).status_code == 401
    async with bmc.client(source=ATTACKER) as right_password_there:
        assert (await right_password_there.get(SYSTEM)).status_code == 401  # locked out from there
    async with bmc.client() as elsewhere:  # the administrator's own address is not locked out
        assert (await elsewhere.get(SYSTEM)).status_code == 200
        assert (await elsewhere.get(f"{ACCOUNTS}/{USER}")).json()["Locked"] is True

    async def logs_in_from_there() -> bool:
        async with bmc.client(source=ATTACKER) as client:
            return (await client.get(SYSTEM)).status_code == 200

    await wait_for(logs_in_from_there, timeout=60, interval=0.5, message="the lockout to end after its duration")

    # the same lockout over IPMI: a Redfish brute force from 127.0.0.1 locks IPMI from there too
    async with bmc.client(password="not-the-password") as wrong:
        for _ in range(3):
            assert (await wrong.get(SYSTEM)).status_code == 401
    code, output = await bmc.ipmitool("chassis", "power", "status")
    assert code != 0, output
    async with bmc.client(source=ATTACKER) as admin:  # an administrator elsewhere ends it at once
        account = await admin.get(f"{ACCOUNTS}/{USER}")
        assert account.json()["Locked"] is True
        unlocked = await admin.patch(f"{ACCOUNTS}/{USER}", json={"Locked": False},
                                     headers={"If-Match": account.headers["ETag"]})
        assert unlocked.status_code == 200 and unlocked.json()["Locked"] is False, unlocked.text
    code, output = await bmc.ipmitool("chassis", "power", "status")
    assert code == 0 and "Chassis Power is" in output, output


async def test_minimum_password_length_over_redfish_and_ipmi(bmc: Bmc):
    async with bmc.client() as admin:
        short = await admin.post(ACCOUNTS, json={"UserName": "shorty", "Password": "seven77", "RoleId": "ReadOnly"})
        assert short.status_code == 400 and message_id(short) == "PasswordIncorrectLength", short.text
        made = await admin.post(ACCOUNTS, json={"UserName": "longer", "Password": "eight888", "RoleId": "ReadOnly"})
        assert made.status_code == 201, made.text
    code, output = await bmc.ipmitool("user", "set", "password", "3", "short")
    assert code != 0, output
    code, output = await bmc.ipmitool("user", "set", "password", "3", "long-enough")
    assert code == 0, output
    async with bmc.client() as admin:
        assert (await admin.patch(SERVICE, json={"MinPasswordLength": 4})).status_code == 200
        made = await admin.post(ACCOUNTS, json={"UserName": "tiny", "Password": "four", "RoleId": "ReadOnly"})
        assert made.status_code == 201, made.text


async def test_sessions_end_with_the_password_and_are_limited(bmc: Bmc):
    async with bmc.client() as admin:
        made = await admin.post(ACCOUNTS, json={"UserName": "ops", "Password": "ops-pass-1", "RoleId": "Operator"})
        assert made.status_code == 201, made.text
    async with bmc.client(None) as anonymous:
        tokens = []
        for _ in range(4):
            response = await anonymous.post(SESSIONS, json={"UserName": "ops", "Password": "ops-pass-1"})
            assert response.status_code == 201, response.text
            tokens.append(response.headers["X-Auth-Token"])
        refused = await anonymous.post(SESSIONS, json={"UserName": "ops", "Password": "ops-pass-1"})
        assert refused.status_code == 503 and message_id(refused) == "SessionLimitExceeded", refused.text
        other_user = await anonymous.post(SESSIONS, json={"UserName": USER, "Password": PASSWORD})
        assert other_user.status_code == 201  # the limit is per user
    async with bmc.client() as admin:
        oem = (await admin.get("/redfish/v1/SessionService")).json()["Oem"]["QemuBmc"]
        assert oem["MaxSessionsPerUser"] == 4 and oem["MaxSessions"] == 64
    async with bmc.client(token=tokens[0]) as session:
        assert (await session.get(SYSTEM)).status_code == 200
        changed = await session.patch(f"{ACCOUNTS}/ops", json={"Password": "ops-pass-2"})
        assert changed.status_code == 200, changed.text
        assert (await session.get(SYSTEM)).status_code == 200  # the session that changed it goes on
    for token in tokens[1:]:  # the others ended with the old password
        async with bmc.client(token=token) as session:
            assert (await session.get(SYSTEM)).status_code == 401
    async with bmc.client() as admin:  # so did they when an administrator sets a password
        assert (await admin.patch(f"{ACCOUNTS}/ops", json={"Password": "ops-pass-3"})).status_code == 200
    async with bmc.client(token=tokens[0]) as session:
        assert (await session.get(SYSTEM)).status_code == 401
    async with bmc.client(None) as anonymous:  # the ended sessions no longer count
        response = await anonymous.post(SESSIONS, json={"UserName": "ops", "Password": "ops-pass-3"})
        assert response.status_code == 201, response.text


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_unauthenticated_patches_with_long_names_keep_nothing(bmc: Bmc):
    """4,000 unauthenticated PATCHes of accounts with 6,000-character names leave the service's
    memory where it was (nothing is made per name before the caller is authenticated)."""
    async with bmc.client(None) as anonymous:
        async def patch(number: int) -> int:
            response = await anonymous.patch(f"{ACCOUNTS}/{number:06d}{'x' * 6000}", json={"Enabled": False})
            return response.status_code

        for batch in range(8):  # warm up: the allocator's pools settle
            assert set(await asyncio.gather(*(patch(batch * 50 + n) for n in range(50)))) <= {401, 404, 414}
        start = rss_kib(bmc.redfish_pid)
        for batch in range(80):
            assert set(await asyncio.gather(*(patch(batch * 50 + n) for n in range(50)))) <= {401, 404, 414}
        assert rss_kib(bmc.redfish_pid) - start < 8 * 1024
