"""IPMI over LAN: this service beside OpenIPMI's ipmi_sim and a pyghmi server-side Bmc (what
VirtualBMC runs), all measured in one run with the same in-process asyncio RMCP+ client
(cipher suite 3), so the client's own start-up does not count.

* full session: Open Session, RAKP 1-4, Get Device ID, Close Session; p50/p99 over sequential runs;
* one command in an open session: Get Device ID, p50/p99;
* sessions per second with 16 concurrent clients, each opening full sessions for a few seconds.

Targets: full-session p50 no worse than ipmi_sim; throughput at least 3x the pyghmi BMC.

    .venv/bin/python bench/ipmi_lan.py [--sessions 200] [--commands 2000] [--seconds 5] [--plot docs/ipmi_lan.png]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import uvloop
from qemu_bmc.natsserver import NatsServer
from qemu_bmc_ipmi_lan.client import IpmiClientError, RmcpPlusClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ipmi_sim import ipmi_sim_argv
from ports import free_udp_port

USER, PASSWORD = "admin", "password"
PYGHMI_BMC = """
import sys
from pyghmi.ipmi import bmc
class Bench(bmc.Bmc):
    def get_power_state(self):
        return "off"
Bench({"admin": "password"}, port=int(sys.argv[1]), address="127.0.0.1").listen()
"""


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def full_session(port: int) -> None:
    async with RmcpPlusClient("127.0.0.1", port, USER, PASSWORD) as client:
        await client.open()
        completion, _ = await client.request(0x06, 0x01)
        assert completion == 0
        await client.close()


async def wait_ready(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await full_session(port)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def start_peers(work: Path) -> tuple[dict[str, int], list[subprocess.Popen], NatsServer]:
    ports = {name: free_udp_port() for name in ("qemu-bmc", "ipmi_sim", "pyghmi Bmc")}
    processes = []
    nats = NatsServer(work / "nats")
    await nats.start()
    config = work / "bench.toml"
    config.write_text(f'runtime_dir = "{work / "rt"}"\n[vm.b1]\ncmd = ["-machine", "q35", "-m", "64"]\n'
                      f'ipmi = "127.0.0.1:{ports["qemu-bmc"]}"\n')
    for module in ("qemu_bmc_state", "qemu_bmc_machine", "qemu_bmc_ipmi_lan"):
        processes.append(subprocess.Popen([sys.executable, "-m", module, "--nats", nats.url, "--config", str(config),
                                           "--log-level", "WARNING",
                                           *(["--stop-vms-on-exit"] if module == "qemu_bmc_machine" else [])],
                                          env={"IPMI_PASS": PASSWORD, "PATH": "/usr/bin"}))
    processes.append(subprocess.Popen(ipmi_sim_argv(work, ports["ipmi_sim"], USER, PASSWORD),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    processes.append(subprocess.Popen([sys.executable, "-c", PYGHMI_BMC, str(ports["pyghmi Bmc"])],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for port in ports.values():
        await wait_ready(port)
    return ports, processes, nats


FAILED: dict[str, int] = {}


async def timed(call, count: int, name: str) -> list[float]:  # type: ignore[no-untyped-def]
    """Latencies (ms) of ``count`` successful calls; failed calls are counted, not timed."""
    samples = []
    while len(samples) < count:
        started = time.perf_counter()
        try:
            await call()
        except IpmiClientError:
            FAILED[name] = FAILED.get(name, 0) + 1
            continue
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def in_session(port: int, count: int, name: str) -> list[float]:
    async with RmcpPlusClient("127.0.0.1", port, USER, PASSWORD) as client:
        await client.open()
        samples = await timed(lambda: client.request(0x06, 0x01), count, name)
        await client.close()
    return samples


async def _clients(port: int, clients: int, stop_at: float) -> tuple[int, int]:
    done = failed = 0

    async def client() -> None:
        nonlocal done, failed
        while time.time() < stop_at:
            try:
                await full_session(port)
                done += 1
            except Exception:
                failed += 1

    await asyncio.gather(*(client() for _ in range(clients)))
    return done, failed


def _client_process(port: int, clients: int, stop_at: float) -> tuple[int, int]:
    return uvloop.run(_clients(port, clients, stop_at))


async def throughput(port: int, clients: int, seconds: float, processes: int) -> tuple[float, int]:
    """Full sessions per second with ``clients`` concurrent clients spread over ``processes``
    client processes (one Python process cannot keep a fast BMC busy), and the failed ones."""
    stop_at = time.time() + seconds + 1.0  # the processes' start-up is not counted
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(processes) as pool:
        results = await asyncio.gather(*(loop.run_in_executor(pool, _client_process, port, clients // processes,
                                                              stop_at) for _ in range(processes)))
    return sum(done for done, _ in results) / seconds, sum(failed for _, failed in results)


async def main(arguments: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="qb-bench-", dir="/tmp"))
    ports, processes, nats = await start_peers(work)
    try:
        names = list(ports)
        sessions: dict[str, list[float]] = {name: [] for name in names}
        commands: dict[str, list[float]] = {name: [] for name in names}
        rounds = 5
        for _ in range(rounds):  # interleaved, so that noise hits every peer alike
            for name in names:
                sessions[name] += await timed(lambda port=ports[name]: full_session(port), arguments.sessions // rounds,
                                              name)
                commands[name] += await in_session(ports[name], arguments.commands // rounds, name)
        rates, failures = {}, {}
        for name in names:
            rates[name], failures[name] = await throughput(ports[name], 16, arguments.seconds, arguments.processes)
        print(f"{arguments.sessions} full sessions and {arguments.commands} in-session commands per BMC, "
              f"{rounds} interleaved rounds; 16 clients in {arguments.processes} processes for {arguments.seconds} s "
              f"each\n")
        print("| BMC | full session p50 ms | p99 ms | command p50 ms | p99 ms | failed (sequential) "
              "| sessions/s (16 clients) | failed (16 clients) |")
        print("|---|---|---|---|---|---|---|---|")
        for name in names:
            print(f"| {name} | {statistics.median(sessions[name]):.2f} | {percentile(sessions[name], 0.99):.2f} | "
                  f"{statistics.median(commands[name]):.3f} | {percentile(commands[name], 0.99):.3f} | "
                  f"{FAILED.get(name, 0)} | {rates[name]:.0f} | {failures[name]} |")
        ours, sim, pyghmi = names
        session_ratio = statistics.median(sessions[ours]) / statistics.median(sessions[sim])
        print(f"\nfull-session p50 qemu-bmc/ipmi_sim: {session_ratio:.2f}x (target <= 1.0); "
              f"throughput qemu-bmc/pyghmi: {rates[ours] / rates[pyghmi]:.1f}x (target >= 3)")
        if arguments.plot:
            plot(arguments.plot, names, sessions, commands, rates)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(20)
        await nats.stop()


def plot(path: str, names: list[str], sessions: dict[str, list[float]], commands: dict[str, list[float]],
         rates: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 4))
    left.boxplot([sessions[name] for name in names], tick_labels=names, showfliers=False)
    left.set_title("full session (ms)")
    middle.boxplot([commands[name] for name in names], tick_labels=names, showfliers=False)
    middle.set_title("one command in a session (ms)")
    right.bar(names, [rates[name] for name in names])
    right.set_title("sessions/s, 16 clients")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f"plot: {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--commands", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--processes", type=int, default=4, help="client processes sharing the 16 clients")
    parser.add_argument("--plot", default=None, help="write a PNG plot here")
    uvloop.run(main(parser.parse_args()))
