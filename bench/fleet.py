"""A fleet: 50, 100 and 200 machines behind one deployment of the services (state, machine,
ipmi-lan, redfish over a real nats-server). The machines are QEMU processes started here,
paused (``-machine q35 -m 64 -S``, so they cost little), that the machine service attaches to
over QMP; their IPMI over LAN addresses come from an ``[ipmi] range``.

For each size, with fresh services and a fresh nats-server:

- visible: seconds from starting the machine service until Redfish's Systems collection lists
  every machine (polled every 50 ms); connected: until the machine service has a QMP connection
  to every QEMU (its power status says so); the measurements below start then;
- GET /redfish/v1/Systems: p50/p99 over 200 requests, with HTTP Basic (checked on every machine,
  from the Redfish service's cache of the state service's answers) and with a session token;
- power status of every machine over IPMI (an RMCP+ session, Get Chassis Status, close) by 16
  concurrent clients in this process: wall time, p50/p99 per machine, failures;
- memory: the resident set of each service process after that (QEMU and nats-server not
  counted), per machine, and its growth from size to size.

Targets: all 200 visible within 10 s of start, service memory per machine under 2 MiB, growth
linear or better.

    .venv/bin/python bench/fleet.py [--sizes 50,100,200] [--plot docs/fleet.png]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import uvloop
from qemu_bmc.natsserver import NatsServer
from qemu_bmc_ipmi_lan.client import RmcpPlusClient
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import PowerStatus

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ports import free_tcp_port, free_udp_ports

USER, PASSWORD = "admin", "password"
SERVICES = ("qemu_bmc_state", "qemu_bmc_machine", "qemu_bmc_ipmi_lan", "qemu_bmc_redfish")
QEMU = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "64", "-S", "-display", "none",
        "-nodefaults", "-no-shutdown"]


@dataclass
class SizeResult:
    size: int
    visible_s: float = 0.0
    connected_s: float = 0.0
    systems_basic_ms: tuple[float, float] = (0.0, 0.0)
    systems_token_ms: tuple[float, float] = (0.0, 0.0)
    ipmi_wall_s: float = 0.0
    ipmi_ms: tuple[float, float] = (0.0, 0.0)
    ipmi_failed: int = 0
    rss_mib: dict[str, float] = field(default_factory=dict)
    nats_rss_mib: float = 0.0

    @property
    def services_mib(self) -> float:
        return sum(self.rss_mib.values())


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_machines(work: Path, count: int) -> tuple[list[subprocess.Popen], list[Path]]:
    sockets = [work / "qemu" / f"f{index:03d}.sock" for index in range(count)]
    sockets[0].parent.mkdir(parents=True)
    processes = [subprocess.Popen([*QEMU, "-qmp", f"unix:{path},server=on,wait=off"], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for path in sockets]
    deadline = time.monotonic() + 120
    while not all(path.exists() for path in sockets):
        if time.monotonic() > deadline:
            raise RuntimeError("the QEMU processes did not open their QMP sockets")
        time.sleep(0.2)
    return processes, sockets


async def systems(client: httpx.AsyncClient, headers: dict[str, str] | None = None) -> list[str]:
    response = await client.get("/redfish/v1/Systems", headers=headers)
    if response.status_code != 200:
        return []
    return [member["@odata.id"] for member in response.json()["Members"]]


async def power_status(port: int) -> float:
    started = time.perf_counter()
    async with RmcpPlusClient("127.0.0.1", port, USER, PASSWORD) as client:
        await client.open()
        completion, data = await client.request(0x00, 0x01)  # Get Chassis Status
        if completion != 0 or data[0] & 0x01:
            raise RuntimeError(f"port {port}: completion {completion:#x}, state {data.hex()}")
        await client.close()
    return (time.perf_counter() - started) * 1000


async def all_power_status(ports: list[int], clients: int) -> tuple[float, list[float], int]:
    """Every machine's power status by ``clients`` concurrent clients: wall seconds, ms each, failures."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for port in ports:
        queue.put_nowait(port)
    latencies: list[float] = []
    failed = 0

    async def client() -> None:
        nonlocal failed
        while not queue.empty():
            port = queue.get_nowait()
            try:
                latencies.append(await power_status(port))
            except Exception:
                failed += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - started, latencies, failed


async def run_size(work: Path, sockets: list[Path], size: int) -> SizeResult:
    directory = work / f"n{size}"
    nats = NatsServer(directory / "nats")
    await nats.start()
    https, base = free_tcp_port(), free_udp_ports(size, below=60000)
    config = directory / "fleet.toml"
    config.write_text(f'runtime_dir = "{directory / "rt"}"\n[redfish]\nlisten = "127.0.0.1:{https}"\n'
                      f'[ipmi]\nrange = "127.0.0.1:{base}-{base + size - 1}"\nmax_sessions = 64\n'
                      + "".join(f'[vm.f{index:03d}]\nqmp = "{path}"\n' for index, path in enumerate(sockets[:size])))
    environment = {"IPMI_USER": USER, "IPMI_PASS": PASSWORD, "PATH": "/usr/bin:/bin"}

    def start(module: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", module, "--nats", nats.url, "--config", str(config),
                                 "--log-level", "WARNING"], env=environment)

    processes = {module: start(module) for module in SERVICES if module != "qemu_bmc_machine"}
    result = SizeResult(size)
    try:
        async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{https}", verify=False, auth=(USER, PASSWORD),
                                     timeout=30) as client:
            deadline = time.monotonic() + 30
            while True:  # the Redfish service up (401 without machines)
                try:
                    await client.get("/redfish/v1/")
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
            started = time.perf_counter()
            processes["qemu_bmc_machine"] = start("qemu_bmc_machine")
            while len(await systems(client)) < size:
                if time.perf_counter() - started > 120:
                    raise RuntimeError("the machines did not all appear in Redfish")
                await asyncio.sleep(0.05)
            result.visible_s = time.perf_counter() - started
            nc = await bus.connect(nats.url, "bench")
            try:
                names = [f"f{index:03d}" for index in range(size)]
                while True:
                    statuses = await asyncio.gather(*(bus.request(nc, name, subjects.POWER_GET, None, PowerStatus)
                                                      for name in names))
                    if all(status.run_state != "disconnected" for status in statuses):
                        break
                    await asyncio.sleep(0.05)
                result.connected_s = time.perf_counter() - started
            finally:
                await nc.close()

            basic, token_ms = [], []
            for _ in range(200):
                began = time.perf_counter()
                assert len(await systems(client)) == size
                basic.append((time.perf_counter() - began) * 1000)
            login = await client.post("/redfish/v1/SessionService/Sessions",
                                      json={"UserName": USER, "Password": PASSWORD})
            token = {"X-Auth-Token": login.headers["X-Auth-Token"]}
            for _ in range(200):
                began = time.perf_counter()
                assert len(await systems(client, token)) == size
                token_ms.append((time.perf_counter() - began) * 1000)
            result.systems_basic_ms = (statistics.median(basic), percentile(basic, 0.99))
            result.systems_token_ms = (statistics.median(token_ms), percentile(token_ms, 0.99))

        ports = list(range(base, base + size))
        await all_power_status(ports[:16], 16)  # the first sessions of each replica's caches
        wall, latencies, failed = await all_power_status(ports, 16)
        result.ipmi_wall_s, result.ipmi_failed = wall, failed
        result.ipmi_ms = (statistics.median(latencies), percentile(latencies, 0.99))
        result.rss_mib = {module.removeprefix("qemu_bmc_"): rss_mib(process.pid)
                          for module, process in processes.items()}
        result.nats_rss_mib = rss_mib(nats.process.pid) if nats.process else 0.0
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        await nats.stop()
    return result


async def main(arguments: argparse.Namespace) -> None:
    sizes = sorted(int(size) for size in arguments.sizes.split(","))
    work = Path(tempfile.mkdtemp(prefix="qb-fleet-", dir="/tmp"))
    qemus, sockets = start_machines(work, sizes[-1])
    qemu_rss = sum(rss_mib(process.pid) for process in qemus)
    results: list[SizeResult] = []
    try:
        for size in sizes:
            results.append(await run_size(work, sockets, size))
            print(asdict(results[-1]), file=sys.stderr)
    finally:
        for process in qemus:
            process.kill()
        for process in qemus:
            process.wait()
    print(f"\n{sizes[-1]} paused QEMU machines (attach mode), {qemu_rss / sizes[-1]:.1f} MiB each, not counted\n")
    print("| machines | visible in Redfish s | connected s | GET Systems Basic p50/p99 ms | token p50/p99 ms "
          "| IPMI power status of all, 16 clients s | per machine p50/p99 ms | failed | services RSS MiB "
          "| per machine MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for result in results:
        basic, token, ipmi = result.systems_basic_ms, result.systems_token_ms, result.ipmi_ms
        print(f"| {result.size} | {result.visible_s:.2f} | {result.connected_s:.2f} | {basic[0]:.1f} / "
              f"{basic[1]:.1f} | {token[0]:.1f} / "
              f"{token[1]:.1f} | {result.ipmi_wall_s:.2f} | {ipmi[0]:.1f} / {ipmi[1]:.1f} | {result.ipmi_failed} | "
              f"{result.services_mib:.0f} | {result.services_mib / result.size:.2f} |")
    for result in results:
        print(f"RSS at {result.size} (MiB): " + ", ".join(f"{name} {mib:.0f}" for name, mib in result.rss_mib.items())
              + f"; nats-server {result.nats_rss_mib:.0f}")
    for smaller, larger in itertools.pairwise(results):
        grown, machines = larger.services_mib - smaller.services_mib, larger.size - smaller.size
        print(f"{smaller.size} -> {larger.size}: +{grown:.1f} MiB for {machines} machines "
              f"({grown / machines:.2f} MiB per added machine); visible {smaller.visible_s:.2f} -> "
              f"{larger.visible_s:.2f} s; IPMI wall {smaller.ipmi_wall_s:.2f} -> {larger.ipmi_wall_s:.2f} s")
    if arguments.plot:
        plot(arguments.plot, results)


def plot(path: str, results: list[SizeResult]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [result.size for result in results]
    figure, (memory, times, latency) = plt.subplots(1, 3, figsize=(13, 4))
    for name in results[0].rss_mib:
        memory.plot(sizes, [result.rss_mib[name] for result in results], marker="o", label=name)
    memory.plot(sizes, [result.services_mib for result in results], marker="o", label="all services")
    memory.set_title("resident memory (MiB)")
    memory.set_xlabel("machines")
    memory.legend()
    times.plot(sizes, [result.visible_s for result in results], marker="o", label="all visible in Redfish")
    times.plot(sizes, [result.connected_s for result in results], marker="o", label="all connected over QMP")
    times.plot(sizes, [result.ipmi_wall_s for result in results], marker="o", label="IPMI power status of all")
    times.set_title("seconds")
    times.set_xlabel("machines")
    times.legend()
    for label, values in (("Basic", [result.systems_basic_ms for result in results]),
                          ("token", [result.systems_token_ms for result in results])):
        latency.plot(sizes, [p50 for p50, _ in values], marker="o", label=f"{label} p50")
        latency.plot(sizes, [p99 for _, p99 in values], marker="o", label=f"{label} p99")
    latency.set_title("GET /redfish/v1/Systems (ms)")
    latency.set_xlabel("machines")
    latency.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f"plot: {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="50,100,200")
    parser.add_argument("--plot")
    uvloop.run(main(parser.parse_args()))
