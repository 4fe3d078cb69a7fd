"""Many machines, several machine services, replicated front-ends and a three-node NATS cluster,
all real processes: machines appear in Redfish (and get BMC state) when a machine service
announces them and go when it stops; a machine has one owner; IPMI addresses from a range (one
port per machine, or one address per machine on one port); two IPMI over LAN replicas share the
machines and take over each other's; killing a NATS node loses no state."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import signal
import socket
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import clients
import httpx
from conftest import ServiceProcess, free_tcp_port, free_udp_ports, toml_list, wait_for, write_config
from nats.aio.client import Client
from qemu_bmc.natsserver import NatsServer
from qemu_bmc_ipmi_lan.service import shard_of
from qemu_bmc_shared import bus
from qemu_bmc_shared.discovery import IPMI_LAN_SERVICE, metadata, service_infos

USER, PASSWORD = "admin", "password"
BARE = ["-machine", "q35", "-accel", "tcg", "-m", "64", "-display", "none", "-nodefaults"]


def machines_config(directory: Path, names: list[str], extra: str = "", each: str = "") -> Path:
    """A config in ``directory``: ``extra`` tables, then a small machine per name (``each`` added)."""
    directory.mkdir(parents=True, exist_ok=True)
    return write_config(directory, extra + "".join(f"[vm.{name}]\ncmd = {toml_list(BARE)}\n{each}" for name in names))


async def systems(url: str, token: str | None = None) -> list[str] | None:
    """The Systems collection's members (None: no login; credentials are checked on the machines)."""
    async with httpx.AsyncClient(base_url=url, verify=False, auth=None if token else (USER, PASSWORD),
                                 headers={"X-Auth-Token": token} if token else None) as client:
        response = await client.get("/redfish/v1/Systems")
        if response.status_code != 200:
            return None
        return [member["@odata.id"].rsplit("/", 1)[1] for member in response.json()["Members"]]


async def test_machines_appear_and_disappear(nc: Client, services: Any, short_dir: Path):
    port, other_port = free_tcp_port(), free_tcp_port()
    central = machines_config(short_dir / "central", [], f'[redfish]\nlisten = "127.0.0.1:{port}"\n')
    other = machines_config(short_dir / "replica", [], f'[redfish]\nlisten = "127.0.0.1:{other_port}"\n')
    await services("state", central, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD})
    first_replica = await services("redfish", central)
    await services("redfish", other)
    url, other_url = f"https://127.0.0.1:{port}", f"https://127.0.0.1:{other_port}"
    assert await systems(url) is None  # no machine yet: no machine to log in on

    # a machine service on "host A", then one on "host B": their machines appear within seconds,
    # with BMC state (the default administrator logs in on them over Redfish)
    await services("machine", machines_config(short_dir / "a", ["a1", "a2"]))
    await wait_for(lambda: _equal(systems(url), ["a1", "a2"]), timeout=10, message="a1, a2 in Redfish")
    host_b = await services("machine", machines_config(short_dir / "b", ["b1"]))
    await wait_for(lambda: _equal(systems(url), ["a1", "a2", "b1"]), timeout=10, message="b1 in Redfish")
    async with httpx.AsyncClient(base_url=url, verify=False, auth=(USER, PASSWORD)) as client:
        response = await client.get("/redfish/v1/Systems/b1")
        assert response.status_code == 200 and response.json()["PowerState"] == "Off", response.text

    # one owner per machine: a second machine service claiming a1 is refused, naming it
    duplicate = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qemu_bmc_machine", "--nats", nc.connected_url.geturl(), "--config",
        str(machines_config(short_dir / "c", ["c1", "a1"])), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(duplicate.communicate(), 30)
    assert duplicate.returncode != 0 and b"a1 already served by the machine service" in output, output

    # a Redfish replica dies: the other one serves the session it made
    async with httpx.AsyncClient(base_url=url, verify=False) as client:
        login = await client.post("/redfish/v1/SessionService/Sessions", json={"UserName": USER, "Password": PASSWORD})
        assert login.status_code == 201, login.text
    await first_replica.stop(signal.SIGKILL)
    assert await systems(other_url, login.headers["X-Auth-Token"]) == ["a1", "a2", "b1"]

    # host B's machine service stops: b1 goes, the others stay
    await host_b.stop()
    await wait_for(lambda: _equal(systems(other_url), ["a1", "a2"]), timeout=15, message="b1 gone from Redfish")


async def _equal(found: Awaitable[Any], expected: Any) -> bool:
    """For ``wait_for``: what ``found`` gives is ``expected``."""
    return await found == expected


ipmitool = functools.partial(clients.ipmitool, user=USER, password=PASSWORD, timeout=1, retries=2)


async def served_by_shard(nc: Client) -> dict[str, str]:
    """Machine → the shard of the IPMI over LAN replica serving it."""
    return {name: metadata(info)["shard"] for info in await service_infos(nc, IPMI_LAN_SERVICE)
            for name in metadata(info).get("machines", "").split(",") if name}


async def test_two_ipmi_lan_replicas_share_and_take_over(nc: Client, services: Any, short_dir: Path):
    names = ["m1", "m2", "m3", "m4", "m5", "m6"]
    shards = {name: f"{shard_of(name, 2)}/2" for name in names}
    assert set(shards.values()) == {"1/2", "2/2"}
    base = free_udp_ports(len(names))
    config = machines_config(short_dir / "fleet", names, f'[ipmi]\nrange = "127.0.0.1:{base}-{base + 9}"\n')
    ports = {name: base + index for index, name in enumerate(names)}  # allocated in config order
    await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD})
    await services("machine", config)
    first = await services("ipmi-lan", config, "--shard", "1/2")
    await services("ipmi-lan", config, "--shard", "2/2")
    await wait_for(lambda: _equal(served_by_shard(nc), shards), timeout=15, message="each replica serving its share")
    for name in names:
        code, out = await ipmitool(ports[name], "power", "status")
        assert code == 0 and "Chassis Power is off" in out, (name, out)
    # a change of state through one replica: a user on m1
    m1 = ports["m1"]
    for args in (("user", "set", "name", "3", "fleet"), ("user", "set", "password", "3", "Fleet-Pass1"),
                 ("channel", "setaccess", "1", "3", "link=on", "ipmi=on", "privilege=4"), ("user", "enable", "3")):
        code, out = await ipmitool(m1, *args)
        assert code == 0, (args, out)

    # the first replica dies: the second takes its machines over, with their state
    await first.stop(signal.SIGKILL)
    everyone_on_2 = dict.fromkeys(names, "2/2")
    await wait_for(lambda: _equal(served_by_shard(nc), everyone_on_2), timeout=15, message="the takeover")
    for name in names:
        code, out = await ipmitool(ports[name], "power", "status")
        assert code == 0 and "Chassis Power is off" in out, (name, out)
    code, out = await ipmitool(m1, "power", "status", user="fleet", password="Fleet-Pass1")
    assert code == 0 and "Chassis Power is off" in out, out

    # it comes back: its machines are given back to it
    await services("ipmi-lan", config, "--shard", "1/2")
    await wait_for(lambda: _equal(served_by_shard(nc), shards), timeout=15, message="the machines given back")
    code, out = await ipmitool(m1, "power", "status", user="fleet", password="Fleet-Pass1")
    assert code == 0 and "Chassis Power is off" in out, out


async def test_one_address_per_machine_on_one_port(services: Any, short_dir: Path):
    """``[ipmi] range`` over addresses: 127.0.0.2-4 are the host's too (all of 127/8 is loopback)."""
    while True:  # a port free on the three addresses
        port = free_udp_ports()
        with contextlib.ExitStack() as probes:
            try:
                for host in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
                    probes.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)).bind((host, port))
            except OSError:
                continue
        break
    config = machines_config(short_dir / "addresses", ["x1", "x2", "x3"],
                             f'[ipmi]\nrange = "127.0.0.2-127.0.0.4:{port}"\n')
    await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD})
    await services("machine", config)
    await services("ipmi-lan", config)
    for host in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
        code, out = await ipmitool(port, "lan", "print", "1", host=host)
        assert code == 0 and re.search(rf"IP Address\s+: {re.escape(host)}\n", out), (host, out)
        code, out = await ipmitool(port, "power", "status", host=host)
        assert code == 0 and "Chassis Power is off" in out, (host, out)


async def test_three_node_cluster_survives_a_node(short_dir: Path):
    cluster_ports = [free_tcp_port() for _ in range(3)]
    routes = [f"nats://127.0.0.1:{port}" for port in cluster_ports]
    nodes = [NatsServer(short_dir / f"node{index}", cluster_port=cluster_ports[index], name=f"node{index}",
                        routes=[route for other, route in enumerate(routes) if other != index]) for index in range(3)]
    processes: list[ServiceProcess] = []
    nc: Client | None = None
    try:
        for node in nodes:
            await node.start()
        nc = await bus.connect(nodes[2].url, "tests")
        await wait_for(lambda: bus.cluster_size(nc) == 3, timeout=20, message="a cluster of three")
        ipmi_port, https = free_udp_ports(1), free_tcp_port()
        path = machines_config(short_dir / "cluster", ["n1"], f'[redfish]\nlisten = "127.0.0.1:{https}"\n',
                               f'ipmi = "127.0.0.1:{ipmi_port}"\n')
        # the services spread over the nodes: the state and machine services on the node that will die
        for module, node in (("qemu_bmc_state", 0), ("qemu_bmc_machine", 0), ("qemu_bmc_ipmi_lan", 1),
                             ("qemu_bmc_redfish", 2)):
            process = ServiceProcess(module, path, nodes[node].url, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD},
                                     log=short_dir / f"{module}.log")
            processes.append(await process.start(nc, module.replace("qemu_bmc_", "qemu-bmc-").replace("_", "-")))
        stream = await nc.jetstream().stream_info("KV_qemu_bmc_state")
        assert stream.config.num_replicas == 3
        for args in (("user", "set", "name", "3", "survivor"), ("user", "set", "password", "3", "Survive-Pass1"),
                     ("channel", "setaccess", "1", "3", "link=on", "ipmi=on", "privilege=4"), ("user", "enable", "3")):
            code, out = await ipmitool(ipmi_port, *args)
            assert code == 0, (args, out)

        assert nodes[0].process is not None
        nodes[0].process.kill()  # the state and machine services' node
        await nodes[0].process.wait()

        async def works(*args: str, user: str = USER, password: str = PASSWORD) -> bool:
            return (await ipmitool(ipmi_port, *args, user=user, password=password))[0] == 0

        # the state and machine services reconnect to other nodes and the bucket has kept everything:
        # a write after the loss, logins with users made before and after it, the machine's power
        await wait_for(lambda: works("user", "set", "password", "3", "After-Pass2"), timeout=60, interval=1,
                       message="a write to the state after the node's loss")
        code, out = await ipmitool(ipmi_port, "power", "status", user="survivor", password="After-Pass2")
        assert code == 0 and "Chassis Power is off" in out, out  # answered by the machine service
        assert not await works("power", "status", user="survivor", password="Survive-Pass1")
        async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{https}", verify=False,
                                     auth=("survivor", "After-Pass2")) as client:
            response = await client.get("/redfish/v1/Systems/n1")
            assert response.status_code == 200 and response.json()["PowerState"] == "Off", response.text
    finally:
        for process in reversed(processes):
            await process.stop()
        if nc is not None:
            await nc.close()
        for node in nodes:
            await node.stop()
