"""Outages under kill -9: `qemu-bmc up` with one running machine (managed QEMU under TCG, no
disk); each service and the nats-server killed with SIGKILL in turn, and for each the time from
the kill to the first request that succeeds again, by a client of what needs it (polled every
20 ms, each try with a 0.5 s time-out):

- nats-server, redfish: Redfish ``GET /redfish/v1/Systems/n1`` answers 200;
- machine: the same, with ``PowerState`` On (the running QEMU adopted by the new machine service);
- state: Redfish ``GET /redfish/v1/AccountService/Accounts/admin`` answers 200;
- ipmi-lan: an RMCP+ session (cipher suite 3) opens and Get Chassis Status answers;
- qemu (the machine's QEMU, not a service): Redfish reports ``PowerState`` Off (the README's
  promise: a QEMU that is killed is reported Off within a second; target 1 s), then it is
  powered on again.

A service is killed again only after its new process has run for a minute, so that every kill
meets the launcher's first restart delay (0.5 s; the delays grow for a service that keeps dying
sooner). The outage is that delay, the start of a Python process and its reconnection to the
bus, and for nats-server the services' reconnection (they try every 0.5 s). Target: each under 5 s.

    .venv/bin/python bench/chaos.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import uvloop
from qemu_bmc_ipmi_lan.client import RmcpPlusClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ports import free_tcp_port, free_udp_ports
from processes import processes_with
from waiting import wait_for

USER, PASSWORD = "admin", "password"
TARGETS = ("nats-server", "state", "machine", "redfish", "ipmi-lan", "qemu")
QEMU_ARGS = ["-machine", "q35", "-accel", "tcg", "-m", "64", "-display", "none", "-nodefaults", "-vga", "none"]
RESTARTED_AFTER = 61.0
"""Seconds a service's process runs before it is killed again (the launcher's back-off resets at 60)."""
POLL = 0.02


def ran_for(pid: int) -> float:
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    started = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    return uptime - started / os.sysconf("SC_CLK_TCK")


class Deployment:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.redfish_port, self.ipmi_port = free_tcp_port(), free_udp_ports()
        self.config = work / "qemu-bmc.toml"
        self.config.write_text(
            f'runtime_dir = "{work / "rt"}"\n[redfish]\nlisten = "127.0.0.1:{self.redfish_port}"\ntls = false\n'
            f'[vm.n1]\nipmi = "127.0.0.1:{self.ipmi_port}"\ncmd = {QEMU_ARGS!r}\n'.replace("'", '"'))
        self.log = work / "up.log"
        self.up: asyncio.subprocess.Process | None = None
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.redfish_port}", auth=(USER, PASSWORD),
                                      timeout=0.5)

    def pids(self, target: str) -> list[int]:
        if target == "nats-server":
            return processes_with(str(self.work / "rt" / "nats"))
        if target == "qemu":
            return processes_with("qemu-system", str(self.work / "rt"))
        return processes_with(f"qemu_bmc_{target.replace('-', '_')}", str(self.config))

    async def start(self) -> None:
        with self.log.open("wb") as output:
            self.up = await asyncio.create_subprocess_exec(sys.executable, "-m", "qemu_bmc", "up", "-c",
                                                           str(self.config), stdout=output, stderr=output)
        await until(lambda: "Ctrl-C stops everything" in self.log.read_text(), 120, "qemu-bmc up")
        await self.power_on()

    async def power_on(self) -> None:
        power = await asyncio.create_subprocess_exec(sys.executable, "-m", "qemu_bmc", "power", "on", "n1", "-c",
                                                     str(self.config), stdout=asyncio.subprocess.DEVNULL)
        await power.wait()
        await until(self.machine_answers, 60, "the machine on")

    async def stop(self) -> None:
        await self.http.aclose()
        if self.up is not None and self.up.returncode is None:
            self.up.send_signal(signal.SIGINT)
            await self.up.wait()

    async def get(self, path: str) -> httpx.Response | None:
        try:
            return await self.http.get(path)
        except httpx.HTTPError:
            return None

    async def redfish_answers(self) -> bool:
        reply = await self.get("/redfish/v1/Systems/n1")
        return reply is not None and reply.status_code == 200

    async def machine_answers(self) -> bool:
        reply = await self.get("/redfish/v1/Systems/n1")
        return reply is not None and reply.status_code == 200 and reply.json().get("PowerState") == "On"

    async def machine_off(self) -> bool:
        reply = await self.get("/redfish/v1/Systems/n1")
        return reply is not None and reply.status_code == 200 and reply.json().get("PowerState") == "Off"

    async def state_answers(self) -> bool:
        reply = await self.get(f"/redfish/v1/AccountService/Accounts/{USER}")
        return reply is not None and reply.status_code == 200

    async def ipmi_answers(self) -> bool:
        try:
            async with RmcpPlusClient("127.0.0.1", self.ipmi_port, USER, PASSWORD, timeout=0.5) as client:
                await client.open()
                completion, _ = await client.request(0x00, 0x01)  # Get Chassis Status
                await client.close()
                return completion == 0
        except Exception:
            return False

    def probe(self, target: str) -> Callable[[], Awaitable[bool]]:
        return {"nats-server": self.redfish_answers, "redfish": self.redfish_answers,
                "machine": self.machine_answers, "state": self.state_answers,
                "ipmi-lan": self.ipmi_answers}[target]


async def until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    await wait_for(predicate, timeout, POLL, what)


async def outage(deployment: Deployment, target: str) -> float:
    """Kill ``target`` (once its process has run a minute); seconds until its client succeeds."""
    pids = deployment.pids(target)
    if len(pids) != 1:
        raise RuntimeError(f"{target}: {len(pids)} processes")
    await until(lambda: ran_for(pids[0]) >= RESTARTED_AFTER, 120, f"{target} running a minute")
    probe = deployment.probe(target)
    await until(probe, 30, f"{target} answering before the kill")
    os.kill(pids[0], signal.SIGKILL)
    killed = time.monotonic()
    await until(lambda: deployment.pids(target) not in ([], pids), 120, f"{target} restarted")
    print(f"{target}: a new process {time.monotonic() - killed:.2f} s after the kill", file=sys.stderr)
    await until(probe, 120, f"{target}'s client succeeding")
    return time.monotonic() - killed


async def crash(deployment: Deployment) -> float:
    """Kill the machine's QEMU; seconds until Redfish reports the machine Off. Powered on again after."""
    pids = deployment.pids("qemu")
    if len(pids) != 1:
        raise RuntimeError(f"qemu: {len(pids)} processes")
    os.kill(pids[0], signal.SIGKILL)
    killed = time.monotonic()
    await until(deployment.machine_off, 30, "the killed QEMU reported Off")
    seconds = time.monotonic() - killed
    await deployment.power_on()
    return seconds


async def main(arguments: argparse.Namespace) -> None:
    targets = arguments.targets.split(",")
    figures: dict[str, list[float]] = {target: [] for target in targets}
    with tempfile.TemporaryDirectory(prefix="qb-chaos-", dir="/tmp") as directory:
        deployment = Deployment(Path(directory))
        try:
            await deployment.start()
            for round_number in range(arguments.rounds):
                for target in targets:
                    figures[target].append(await (crash(deployment) if target == "qemu"
                                                  else outage(deployment, target)))
                    print(f"round {round_number + 1}: {target} {figures[target][-1]:.2f} s", file=sys.stderr)
        finally:
            await deployment.stop()
    print(f"\nkill -9 under `qemu-bmc up`, one running machine, {arguments.rounds} rounds: seconds from the kill "
          "to the first successful request (qemu: to PowerState Off)\n")
    print("| killed | median s | max s | each |")
    print("|---|---|---|---|")
    for target, seconds in figures.items():
        print(f"| {target} | {statistics.median(seconds):.2f} | {max(seconds):.2f} | "
              + ", ".join(f"{value:.2f}" for value in seconds) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--targets", default=",".join(TARGETS), help="what to kill (default: %(default)s)")
    uvloop.run(main(parser.parse_args()))
