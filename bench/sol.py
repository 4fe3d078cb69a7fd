"""Serial console: characters per second from the guest's serial port to its console client, and
keystroke echo latency, for qemu-bmc's IPMI Serial-over-LAN and web console and, in the same run,
for OpenIPMI ``ipmi_sim``'s SOL (its ``sol "tcp:127.0.0.1:PORT" 115200`` line).

Two copies of the tiny Linux test guest, each with a shell on ttyS0: one launched by qemu-bmc's
machine service (serial port on the bus; SOL from the ipmi-lan service, the web console's
WebSocket from the redfish service, all as in production over a real nats-server), the other
launched here with its serial port on a TCP socket that ipmi_sim connects to. The clients:
``ipmitool -I lanplus -C 3 sol activate`` on a pseudo-terminal for both BMCs, and a WebSocket
client (``websockets``, HTTP Basic) on qemu-bmc's ``/console/<machine>/ws``. The clients take
turns, in rounds, so that noise hits all alike; the guests sit idle at their prompt meanwhile.

- Throughput: the guest prints ``seq 1 N`` between two markers; the bytes the client received
  between the markers, over the time between their arrivals.
- Echo: one key typed into the client (alternately a letter and a backspace, so the line does not
  grow), the time until the guest's echo comes out of the client; keys 30-40 ms apart.

Targets: throughput no lower than ipmi_sim's; echo p99 under 20 ms.

    .venv/bin/python bench/sol.py [--rounds 3] [--lines 20000] [--keys 200]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import fcntl
import json
import os
import random
import ssl
import statistics
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

import uvloop
from qemu_bmc.natsserver import NatsServer
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import ConsoleHistory, PowerRequest, PowerStatus
from websockets.asyncio import client as websockets_client

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ipmi_sim import ipmi_sim_argv
from linux_guest import LinuxGuest, default_cache
from ports import free_tcp_port, free_udp_port

USER, PASSWORD = "admin", "password"
SHELL = "echo BENCH-SHELL\nexec setsid sh -c 'exec sh -i <>/dev/ttyS0 >&0 2>&1'\n"
PROMPT = b"# "


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class Client:
    """A console client: what it received, with when each piece arrived."""

    name = ""

    def __init__(self) -> None:
        self.output = bytearray()
        self.arrivals: list[tuple[int, float]] = []  # (output length after a read, perf_counter)
        self.grew = asyncio.Event()

    def received(self, data: bytes) -> None:
        self.output += data
        self.arrivals.append((len(self.output), time.perf_counter()))
        self.grew.set()

    def arrival(self, end: int) -> float:
        """When the byte before ``end`` arrived."""
        return next(at for length, at in self.arrivals if length >= end)

    async def until(self, needle: bytes, after: int, timeout: float = 60.0) -> tuple[int, float]:
        """Where ``needle`` (seen past ``after``) starts, and when its last byte arrived."""
        deadline = time.monotonic() + timeout
        while (start := self.output.find(needle, after)) < 0:
            self.grew.clear()
            await asyncio.wait_for(self.grew.wait(), max(0.0, deadline - time.monotonic()))
        return start, self.arrival(start + len(needle))

    async def quiet(self, seconds: float) -> None:
        """Until nothing has come for ``seconds``."""
        while True:
            self.grew.clear()
            try:
                await asyncio.wait_for(self.grew.wait(), seconds)
            except TimeoutError:
                return

    async def send(self, data: bytes) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


def controlling_tty(terminal: int) -> None:
    """In the child: a session of its own, with ``terminal`` as its controlling terminal."""
    os.setsid()
    fcntl.ioctl(terminal, termios.TIOCSCTTY, 0)


class IpmitoolSol(Client):
    """``ipmitool sol activate`` on a pseudo-terminal."""

    async def open(self, name: str, port: int) -> IpmitoolSol:
        self.name = name
        self.master, slave = os.openpty()
        self.process = await asyncio.create_subprocess_exec(
            "ipmitool", "-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p", str(port), "-U", USER, "-P", PASSWORD,
            "sol", "activate", stdin=slave, stdout=slave, stderr=slave, preexec_fn=lambda: controlling_tty(slave))
        os.close(slave)
        asyncio.get_running_loop().add_reader(self.master, self._read)
        await self.until(b"SOL Session operational", 0, timeout=30)
        return self

    def _read(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except OSError:
            data = b""
        if data:
            self.received(data)
        else:
            asyncio.get_running_loop().remove_reader(self.master)

    async def send(self, data: bytes) -> None:
        os.write(self.master, data)

    async def close(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.master, b"\r~.")
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.master)
        os.close(self.master)


class WebConsole(Client):
    """The web console's WebSocket, with HTTP Basic credentials."""

    async def open(self, name: str, url: str) -> WebConsole:
        self.name = name
        insecure = ssl.create_default_context()
        insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
        basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        self.socket = await websockets_client.connect(url, ssl=insecure, additional_headers={"Authorization": basic},
                                                      max_size=None)
        self.reader = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            async for message in self.socket:
                self.received(message if isinstance(message, bytes) else message.encode())

    async def send(self, data: bytes) -> None:
        await self.socket.send(data)

    async def close(self) -> None:
        await self.socket.close()
        await self.reader


async def prompt(client: Client) -> None:
    """The shell's prompt, freshly printed, and nothing more coming."""
    for _ in range(60):
        after = len(client.output)
        await client.send(b"\r")
        with contextlib.suppress(TimeoutError):
            await client.until(PROMPT, after, timeout=2)
            await client.quiet(0.3)
            return
    raise RuntimeError(f"{client.name}: no shell prompt: {bytes(client.output[-300:])!r}")


async def throughput(client: Client, lines: int, serial: int) -> tuple[float, int]:
    """Characters per second of ``seq 1 lines``, and how many there were."""
    begin, end = f"M{serial}B".encode(), f"M{serial}E".encode()
    after = len(client.output)
    await client.send(f"echo M$(({serial}))B; seq 1 {lines}; echo M$(({serial}))E\r".encode())
    start, began = await client.until(begin + b"\r\n", after)
    stop, ended = await client.until(end, start)
    count = stop - (start + len(begin) + 2)
    await client.quiet(0.3)
    return count / (ended - began), count


async def echoes(client: Client, keys: int) -> list[float]:
    """Seconds from each key typed to its echo."""
    latencies = []
    for index in range(keys):
        after = len(client.output)
        typed = time.perf_counter()
        await client.send(b"a" if index % 2 == 0 else b"\x7f")
        while len(client.output) == after:
            client.grew.clear()
            await asyncio.wait_for(client.grew.wait(), 10)
        latencies.append(client.arrival(after + 1) - typed)
        await client.quiet(0.03 + random.random() * 0.01)
    return latencies


class Peers:
    """qemu-bmc's services and guest, ipmi_sim and its guest."""

    def __init__(self, work: Path, guest: LinuxGuest) -> None:
        self.work, self.guest = work, guest
        self.processes: list[subprocess.Popen] = []
        self.sol_ports = {"qemu-bmc": free_udp_port(), "ipmi_sim": free_udp_port()}
        self.https = free_tcp_port()
        self.nats = NatsServer(work / "nats")

    async def start(self) -> None:
        await self.nats.start()
        self.nc = await bus.connect(self.nats.url, "bench")
        initrd = self.guest.initrd(SHELL, self.work)
        config = self.work / "bench.toml"
        config.write_text(f'runtime_dir = "{self.work / "rt"}"\n[redfish]\nlisten = "127.0.0.1:{self.https}"\n'
                          f'[vm.s1]\ncmd = {json.dumps(self.guest.qemu_args(initrd))}\n'
                          f'ipmi = "127.0.0.1:{self.sol_ports["qemu-bmc"]}"\n')
        for module in ("qemu_bmc_state", "qemu_bmc_machine", "qemu_bmc_ipmi_lan", "qemu_bmc_redfish"):
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", module, "--nats", self.nats.url, "--config", str(config), "--log-level",
                 "WARNING", *(["--stop-vms-on-exit"] if module == "qemu_bmc_machine" else [])],
                env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD, "PATH": "/usr/bin:/bin"}))
        serial = free_tcp_port()
        ipmi_sim = ipmi_sim_argv(self.work, self.sol_ports["ipmi_sim"], USER, PASSWORD,
                                 f'  sol "tcp:127.0.0.1:{serial}" 115200\n')
        self.processes.append(subprocess.Popen(
            ["qemu-system-x86_64", *self.guest.qemu_args(initrd), "-serial",
             f"tcp:127.0.0.1:{serial},server=on,wait=off"], stdin=subprocess.DEVNULL))
        await asyncio.sleep(0.5)  # QEMU listening before ipmi_sim connects
        self.processes.append(subprocess.Popen(ipmi_sim, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(Exception):
                await bus.request(self.nc, "s1", subjects.POWER_SET, PowerRequest(action="on"), PowerStatus,
                                  timeout=30)
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the machine service did not power s1 on")
            await asyncio.sleep(0.5)
        while True:
            with contextlib.suppress(Exception):
                history = await bus.request(self.nc, "s1", subjects.CONSOLE_GET, None, ConsoleHistory, timeout=2)
                if b"BENCH-SHELL" in history.data:
                    break
            if time.monotonic() > deadline + 120:
                raise RuntimeError("qemu-bmc's guest: no shell")
            await asyncio.sleep(0.5)

    async def open(self, name: str) -> Client:
        if name == "ipmitool -> qemu-bmc":
            return await IpmitoolSol().open(name, self.sol_ports["qemu-bmc"])
        if name == "ipmitool -> ipmi_sim":
            return await IpmitoolSol().open(name, self.sol_ports["ipmi_sim"])
        return await WebConsole().open(name, f"wss://127.0.0.1:{self.https}/console/s1/ws")

    async def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
        await self.nc.close()
        await self.nats.stop()


CLIENTS = ("ipmitool -> qemu-bmc", "ipmitool -> ipmi_sim", "WebSocket -> qemu-bmc")


async def main(arguments: argparse.Namespace) -> None:
    guest = LinuxGuest(default_cache()).build()
    work = Path(tempfile.mkdtemp(prefix="qb-bench-", dir="/tmp"))
    peers = Peers(work, guest)
    await peers.start()
    rates: dict[str, list[float]] = {name: [] for name in CLIENTS}
    latencies: dict[str, list[float]] = {name: [] for name in CLIENTS}
    sizes: set[int] = set()
    serial = 1000
    try:
        for _ in range(arguments.rounds):
            for name in CLIENTS:
                client = await peers.open(name)
                try:
                    await prompt(client)
                    serial += 1
                    rate, count = await throughput(client, arguments.lines, serial)
                    rates[name].append(rate)
                    sizes.add(count)
                    await prompt(client)
                    latencies[name] += await echoes(client, arguments.keys)
                finally:
                    await client.close()
                print(f"{name}: {rate:,.0f} chars/s, echo p50 {statistics.median(latencies[name]) * 1000:.2f} ms",
                      file=sys.stderr)
        print(f"\n`seq 1 {arguments.lines}` ({'/'.join(map(str, sorted(sizes)))} characters) x {arguments.rounds}"
              f" rounds; {arguments.keys} keys per round per client\n")
        print("| client -> BMC | chars/s p50 | chars/s min | echo p50 ms | echo p99 ms | echo max ms | keys |")
        print("|---|---|---|---|---|---|---|")
        for name in CLIENTS:
            echo = [latency * 1000 for latency in latencies[name]]
            print(f"| {name} | {statistics.median(rates[name]):,.0f} | {min(rates[name]):,.0f} | "
                  f"{statistics.median(echo):.2f} | {percentile(echo, 0.99):.2f} | {max(echo):.2f} | {len(echo)} |")
        ours, peer = "ipmitool -> qemu-bmc", "ipmitool -> ipmi_sim"
        ratio = statistics.median(rates[ours]) / statistics.median(rates[peer])
        print(f"\nthroughput qemu-bmc/ipmi_sim (ipmitool): {ratio:.2f}x (target >= 1)")
        print(f"echo p99 qemu-bmc (ipmitool): {percentile(latencies[ours], 0.99) * 1000:.2f} ms, ipmi_sim "
              f"{percentile(latencies[peer], 0.99) * 1000:.2f} ms (target < 20 ms)")
    finally:
        await peers.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lines", type=int, default=20000)
    parser.add_argument("--keys", type=int, default=200)
    uvloop.run(main(parser.parse_args()))
