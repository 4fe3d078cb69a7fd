"""Redfish: GET of a ComputerSystem, with wrk at 1 and 16 connections, against this service over
HTTPS and over HTTP and, in the same run, sushy-tools' ``sushy-emulator`` with its fake driver over
HTTP (it has no TLS of its own); runs are interleaved in rounds. Then the time from POST Reset
ForceOff to the QEMU process gone.

Targets: at least 3x sushy-emulator's requests per second over HTTP; p99 under 10 ms at 16
connections.

    .venv/bin/pip install -e .[bench]; .venv/bin/python bench/redfish.py [--seconds 3] [--rounds 2] [--plot F]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import uvloop
from qemu_bmc.natsserver import NatsServer
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import PowerStatus

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ports import free_tcp_port

USER, PASSWORD = "admin", "password"
AUTHORIZATION = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def config(work: Path, name: str, port: int, tls: bool) -> Path:
    path = work / f"{name}.toml"
    path.write_text(f'runtime_dir = "{work / "rt"}"\n[redfish]\nlisten = "127.0.0.1:{port}"\n'
                    f'tls = {"true" if tls else "false"}\n[vm.b1]\n'
                    'cmd = ["-machine", "q35", "-accel", "tcg", "-m", "64", "-display", "none", "-nodefaults"]\n')
    return path


async def wait_up(url: str, headers: dict[str, str]) -> None:
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(verify=False) as client:
        while True:
            try:
                if (await client.get(url, headers=headers)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} does not answer")
            await asyncio.sleep(0.2)


def wrk(url: str, connections: int, seconds: float, headers: dict[str, str]) -> tuple[float, float, float]:
    """Requests per second, p50 and p99 latency in ms."""
    arguments = ["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--latency", "--timeout", "5s"]
    for key, value in headers.items():
        arguments += ["-H", f"{key}: {value}"]
    output = subprocess.run([*arguments, url], capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if errors:
        raise RuntimeError(f"{url}: {errors.group(1)} failed requests\n{output}")

    def percentile(label: str) -> float:
        value, unit = re.search(rf"\s{label}%\s+([\d.]+)(us|ms|s)", output).groups()  # type: ignore[union-attr]
        return float(value) * UNITS[unit]

    return rate, percentile("50"), percentile("99")


async def force_off_times(nc, url: str, count: int) -> list[float]:  # type: ignore[no-untyped-def]
    """Seconds from POST Reset ForceOff to the QEMU process gone."""
    times = []
    async with httpx.AsyncClient(verify=False, headers={"Authorization": AUTHORIZATION}, timeout=60) as client:
        reset = f"{url}/redfish/v1/Systems/b1/Actions/ComputerSystem.Reset"
        for _ in range(count):
            assert (await client.post(reset, json={"ResetType": "On"})).status_code == 204
            pid = (await bus.request(nc, "b1", subjects.POWER_GET, None, PowerStatus)).pid
            assert pid
            await asyncio.sleep(0.5)
            started = time.perf_counter()
            assert (await client.post(reset, json={"ResetType": "ForceOff"})).status_code == 204
            while Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text():  # noqa: ASYNC110
                await asyncio.sleep(0.001)
            times.append(time.perf_counter() - started)
    return times


async def main(arguments: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="qb-bench-", dir="/tmp"))
    nats = NatsServer(work / "nats")
    await nats.start()
    ports = {name: free_tcp_port() for name in ("qemu-bmc HTTPS", "qemu-bmc HTTP", "sushy-emulator HTTP")}
    https, http = config(work, "https", ports["qemu-bmc HTTPS"], True), config(work, "http", ports["qemu-bmc HTTP"],
                                                                               False)
    environment = {**os.environ, "IPMI_PASS": PASSWORD}
    command = [sys.executable, "-m"]
    processes = [subprocess.Popen([*command, module, "--nats", nats.url, "--config", str(path), "--log-level",
                                   "WARNING", *(["--stop-vms-on-exit"] if module == "qemu_bmc_machine" else [])],
                                  env=environment)
                 for module, path in (("qemu_bmc_state", https), ("qemu_bmc_machine", https),
                                      ("qemu_bmc_redfish", https), ("qemu_bmc_redfish", http))]
    emulator = Path(sys.executable).parent / "sushy-emulator"
    processes.append(subprocess.Popen([str(emulator), "--fake", "-i", "127.0.0.1", "-p",
                                       str(ports["sushy-emulator HTTP"])],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    nc = await bus.connect(nats.url, "bench")
    try:
        auth = {"Authorization": AUTHORIZATION}
        urls = {"qemu-bmc HTTPS": f"https://127.0.0.1:{ports['qemu-bmc HTTPS']}/redfish/v1/Systems/b1",
                "qemu-bmc HTTP": f"http://127.0.0.1:{ports['qemu-bmc HTTP']}/redfish/v1/Systems/b1"}
        sushy = f"http://127.0.0.1:{ports['sushy-emulator HTTP']}"
        await wait_up(f"{sushy}/redfish/v1/Systems", {})
        async with httpx.AsyncClient() as client:
            member = (await client.get(f"{sushy}/redfish/v1/Systems")).json()["Members"][0]["@odata.id"]
        urls["sushy-emulator HTTP"] = f"{sushy}{member}"
        for url in urls.values():
            await wait_up(url, auth)
        results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
        for _ in range(arguments.rounds):
            for name, url in urls.items():
                for connections in (1, 16):
                    results.setdefault((name, connections), []).append(
                        await asyncio.to_thread(wrk, url, connections, arguments.seconds, auth))
        print(f"GET ComputerSystem with wrk, {arguments.rounds} interleaved rounds of {arguments.seconds} s\n")
        print("| server | connections | requests/s | p50 ms | p99 ms |")
        print("|---|---|---|---|---|")
        summary = {}
        for (name, connections), runs in results.items():
            rate = statistics.mean(run[0] for run in runs)
            p50 = statistics.median(run[1] for run in runs)
            p99 = max(run[2] for run in runs)
            summary[name, connections] = (rate, p50, p99)
            print(f"| {name} | {connections} | {rate:.0f} | {p50:.2f} | {p99:.2f} |")
        for connections in (1, 16):
            ratio = summary["qemu-bmc HTTP", connections][0] / summary["sushy-emulator HTTP", connections][0]
            print(f"\nHTTP requests/s, {connections} connection(s): qemu-bmc/sushy-emulator {ratio:.1f}x (target >= 3)")
        print(f"p99 at 16 connections: HTTPS {summary['qemu-bmc HTTPS', 16][2]:.2f} ms, HTTP "
              f"{summary['qemu-bmc HTTP', 16][2]:.2f} ms (target < 10)")
        off = await force_off_times(nc, urls["qemu-bmc HTTP"].rsplit("/redfish", 1)[0], arguments.resets)
        print(f"\nPOST Reset ForceOff to QEMU gone: p50 {statistics.median(off) * 1000:.0f} ms, max "
              f"{max(off) * 1000:.0f} ms ({len(off)} runs)")
        if arguments.plot:
            plot(arguments.plot, summary)
    finally:
        await nc.close()
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)
        await nats.stop()


def plot(path: str, summary: dict[tuple[str, int], tuple[float, float, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({name for name, _ in summary})
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.38
    for offset, connections in ((-width / 2, 1), (width / 2, 16)):
        positions = [index + offset for index in range(len(names))]
        axes[0].bar(positions, [summary[name, connections][0] for name in names], width, label=f"{connections} conn.")
        axes[1].bar(positions, [summary[name, connections][2] for name in names], width, label=f"{connections} conn.")
    for axis, title in zip(axes, ("requests/s (GET ComputerSystem)", "p99 latency (ms)"), strict=True):
        axis.set_xticks(range(len(names)), names)
        axis.set_title(title)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f"plot: {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--resets", type=int, default=5)
    parser.add_argument("--plot", default=None)
    uvloop.run(main(parser.parse_args()))
