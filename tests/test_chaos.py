"""A minute of chaos: `qemu-bmc up` with a running machine under a light mixed load (Redfish and
IPMI reads, users created over Redfish and renamed over IPMI) while kill -9 hits each service
and nats-server in turn. Afterwards every write that was acknowledged is there. How long each
outage lasts is bench/chaos.py's to measure; here the services get a generous deadline."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from clients import ipmitool
from conftest import toml_list, wait_for, write_config
from guest_images import GuestImages
from ports import free_tcp_port, free_udp_ports
from processes import processes_with
from test_up import cli, start_up

USER, PASSWORD = "admin", "password"
ACCOUNTS = "/redfish/v1/AccountService/Accounts"
CHAOS_SECONDS = 60.0
TARGETS = ("state", "machine", "ipmi-lan", "redfish", "vmwire", "nats-server")
RENAMED_USERS = ("chaos-a", "chaos-b", "chaos-c")
CREATES = 8
"""Users created over Redfish at most (with the renamed ones and admin, within the 15 IPMI slots)."""


@dataclass
class Load:
    """What the clients did, and what the BMC acknowledged."""

    redfish_port: int
    ipmi_port: int
    created: list[str] = field(default_factory=list)
    """Users whose creation Redfish acknowledged (201)."""
    create_attempts: int = 0
    renames: dict[int, list[tuple[str, bool]]] = field(default_factory=dict)
    """IPMI user slot → each name it was renamed to, in order, and whether ipmitool said it was done."""
    reads: dict[str, list[bool]] = field(default_factory=lambda: {"redfish": [], "ipmi": []})

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.redfish_port}", auth=(USER, PASSWORD),
                                 timeout=5)

    async def ipmitool(self, *args: str) -> tuple[int, str]:
        return await ipmitool(self.ipmi_port, *args, user=USER, password=PASSWORD, timeout=1, retries=1)

    async def read_redfish(self, until: asyncio.Event) -> None:
        async with self.client() as client:
            while not until.is_set():
                try:
                    self.reads["redfish"].append((await client.get("/redfish/v1/Systems/n1")).status_code == 200)
                except httpx.HTTPError:
                    self.reads["redfish"].append(False)
                await asyncio.sleep(0.2)

    async def read_ipmi(self, until: asyncio.Event) -> None:
        while not until.is_set():
            self.reads["ipmi"].append((await self.ipmitool("chassis", "power", "status"))[0] == 0)
            await asyncio.sleep(0.5)

    async def create_users(self, until: asyncio.Event) -> None:
        async with self.client() as client:
            while not until.is_set() and len(self.created) < CREATES and self.create_attempts < CREATES + 4:
                self.create_attempts += 1
                name = f"made-{self.create_attempts}"
                try:
                    reply = await client.post(ACCOUNTS, json={"UserName": name, "Password": "chaos-pass-1",
                                                              "RoleId": "ReadOnly"})
                    if reply.status_code == 201:
                        self.created.append(name)
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(2)

    async def rename_users(self, slots: list[int], until: asyncio.Event) -> None:
        number = 0
        while not until.is_set():
            number += 1
            slot = slots[number % len(slots)]
            name = f"renamed-{number}"
            code, _ = await self.ipmitool("user", "set", "name", str(slot), name)
            self.renames.setdefault(slot, []).append((name, code == 0))
            await asyncio.sleep(1)


def ipmi_users(listing: str) -> dict[int, str]:
    """Slot → name, from `ipmitool user list 1` (an empty name: the slot is unused)."""
    users = {}
    for line in listing.splitlines():
        fields = line.split()
        if fields and fields[0].isdigit():
            users[int(fields[0])] = fields[1] if len(fields) > 1 and fields[1] not in ("true", "false") else ""
    return users


def target_pids(target: str, config: Path, runtime: Path) -> list[int]:
    if target == "nats-server":
        return processes_with(str(runtime / "nats"))
    return processes_with(f"qemu_bmc_{target.replace('-', '_')}", str(config))


@pytest.mark.timeout(600)
async def test_a_minute_of_kill_9_loses_no_acknowledged_write(short_dir: Path, images: GuestImages):
    ipmi_port, redfish_port = free_udp_ports(), free_tcp_port()
    config = write_config(short_dir, f'[redfish]\nlisten = "127.0.0.1:{redfish_port}"\ntls = false\n'
                                     f'[vm.n1]\nipmi = "127.0.0.1:{ipmi_port}"\nvmwire = true\n'
                                     f'cmd = {toml_list(images.qemu_args(nic=False))}\n')
    c = ["-c", str(config)]
    runtime = short_dir / "rt"
    log = short_dir / "up.log"
    up = await start_up(*c, env={}, log=log)
    load = Load(redfish_port, ipmi_port)
    try:
        on = json.loads(cli("power", "on", "n1", "--json", *c).stdout)
        assert on["state"] == "On"
        async with load.client() as client:
            for name in RENAMED_USERS:
                reply = await client.post(ACCOUNTS, json={"UserName": name, "Password": "chaos-pass-1",
                                                          "RoleId": "Operator"})
                assert reply.status_code == 201, reply.text
        code, listing = await load.ipmitool("user", "list", "1")
        assert code == 0, listing
        slots = [slot for slot, name in ipmi_users(listing).items() if name in RENAMED_USERS]
        assert len(slots) == len(RENAMED_USERS), listing

        stop_load = asyncio.Event()
        clients = [asyncio.create_task(work(stop_load)) for work in (
            load.read_redfish, load.read_ipmi, load.create_users,
            lambda until: load.rename_users(slots, until))]
        spacing = CHAOS_SECONDS / len(TARGETS)
        for target in TARGETS:
            await asyncio.sleep(spacing / 2)
            pids = target_pids(target, config, runtime)
            assert len(pids) == 1, (target, pids)
            os.kill(pids[0], signal.SIGKILL)
            await wait_for(lambda target=target, pids=pids: target_pids(target, config, runtime) not in ([], pids),
                           timeout=60, message=f"{target} started again")
            await asyncio.sleep(spacing / 2)
        stop_load.set()
        await asyncio.gather(*clients)

        # every service back: Redfish and IPMI answer, users can be read
        async def recovered() -> bool:
            async with load.client() as client:
                try:
                    if (await client.get(ACCOUNTS)).status_code != 200:
                        return False
                except httpx.HTTPError:
                    return False
            return (await load.ipmitool("user", "list", "1"))[0] == 0

        await wait_for(recovered, timeout=120, interval=0.5, message="every service back")

        async with load.client() as client:
            missing = [name for name in load.created if (await client.get(f"{ACCOUNTS}/{name}")).status_code != 200]
        assert load.created and not missing, f"acknowledged creations lost: {missing}"
        names = ipmi_users((await load.ipmitool("user", "list", "1"))[1])
        for slot, attempts in load.renames.items():
            acknowledged = [index for index, (_, done) in enumerate(attempts) if done]
            assert acknowledged, f"no rename of slot {slot} acknowledged: {attempts}"
            possible = {name for name, _ in attempts[acknowledged[-1]:]}  # the last acknowledged, or a later try
            assert names[slot] in possible, f"slot {slot} is {names[slot]!r}, renamed {attempts}"
        assert any(load.reads["redfish"]) and any(load.reads["ipmi"])
        print(f"chaos: {len(load.created)} of {load.create_attempts} creations acknowledged, "
              f"{sum(done for attempts in load.renames.values() for _, done in attempts)} of "
              f"{sum(map(len, load.renames.values()))} renames; reads answered: "
              + ", ".join(f"{kind} {sum(done)}/{len(done)}" for kind, done in load.reads.items()))
        status = json.loads(cli("power", "status", "n1", "--json", *c).stdout)
        assert status["state"] == "On" and status["pid"] == on["pid"], "the running VM adopted, not restarted"
    finally:
        up.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(up.wait(), 90)
    assert code == 0, log.read_text()
    restarts = [re.sub(r"^.* WARNING ", "", line) for line in log.read_text().splitlines() if "restarting" in line]
    assert len(restarts) == len(TARGETS), restarts
