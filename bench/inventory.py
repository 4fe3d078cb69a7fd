"""Inventory: a full hardware inventory read as Ironic's redfish inspection reads it with sushy
(the ComputerSystem with its memory summary, the processors, simple storage, storage with its
drives and volumes, the NICs), against this service and, in the same run, sushy-tools'
``sushy-emulator`` with its fake driver; runs are interleaved in rounds.

The machines are QEMU processes started here, paused (``-S``), that the machine service attaches
to over QMP: each has 2 sockets of 2 cores, 1 GiB, a 2 GiB SATA disk and a 3 GiB virtio disk
(QEMU's ``null-co`` driver: no image files) and two NICs. sushy-emulator's fake systems get the
same storage (two controllers with a drive and a volume each) and two NICs from its config file;
its fake driver has no processors and no simple storage (sushy sees no link and skips them), and
no volumes (its volume collections stay empty: the fake driver answers 501 for a listed one), so
its inspections make fewer requests than ours.

For one machine and across all (``--machines``, 100): the latency of one inspection by one client
(p50/p99), and inspections per second by ``--clients`` client processes (each with its own sushy
session, as Ironic's conductor keeps one per node). Before that, the first inspection of every
machine (the machine service reads the hardware from QEMU then; later reads come from its cache).

Targets: p50 under 50 ms for one machine; at least 3x sushy-emulator's inspections per second.

    .venv/bin/pip install -e .[bench]; .venv/bin/python bench/inventory.py [--machines 100] [--seconds 5]
        [--rounds 2] [--clients 4] [--inspections 200]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import sushy
import uvloop
from qemu_bmc.natsserver import NatsServer
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import PowerStatus
from sushy.exceptions import MissingAttributeError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ports import free_tcp_port

USER, PASSWORD = "admin", "password"
QEMU = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "1G", "-smp", "sockets=2,cores=2", "-S",
        "-display", "none", "-nodefaults", "-no-shutdown",
        "-device", "ich9-ahci,id=sata", "-drive", "if=none,id=d0,driver=null-co,size=2G",
        "-device", "ide-hd,drive=d0,bus=sata.0,id=disk0",
        "-drive", "if=none,id=d1,driver=null-co,size=3G", "-device", "virtio-blk-pci,drive=d1,id=disk1"]
SERVERS = ("qemu-bmc HTTPS", "qemu-bmc HTTP", "sushy-emulator HTTP")


# ---------------------------------------------------------------- the client side (in client processes)

def inspect(root: sushy.Sushy, system_uri: str, full: bool) -> None:
    """What ironic.drivers.modules.redfish.inspect reads (``full``; a part a service lacks is
    skipped), or only what both servers serve: the system and its memory summary, the storage
    drives, the NICs."""
    system = root.get_system(system_uri)
    _ = system.memory_summary.size_gib
    reads = [lambda: system.storage.drives_sizes_bytes]
    if full:
        reads += [lambda: system.processors.summary, lambda: system.simple_storage.disks_sizes_bytes,
                  lambda: system.storage.volumes_sizes_bytes]
    for read in reads:
        try:
            read()
        except MissingAttributeError:
            pass
    _ = system.ethernet_interfaces.summary


def connect(url: str, ca: str) -> sushy.Sushy:
    """A sushy session as Ironic's conductor keeps one, verifying the service's certificate (requests
    would verify against the CA bundle of ``REQUESTS_CA_BUNDLE`` instead, whatever sushy asks)."""
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        os.environ.pop(name, None)
    return sushy.Sushy(f"{url}/redfish/v1", verify=ca, auth=sushy.auth.SessionOrBasicAuth(USER, PASSWORD))


def client(url: str, ca: str, systems: list[str], full: bool, offset: int, seconds: float,
           count: int) -> tuple[list[float], float]:
    """Inspections in turn over ``systems`` (from ``offset``), for ``seconds`` or ``count`` of them:
    the seconds each took, and the CPU seconds the client used for them."""
    root = connect(url, ca)
    latencies: list[float] = []
    cpu = time.process_time()
    deadline = time.perf_counter() + seconds
    while (len(latencies) < count) if count else (time.perf_counter() < deadline):
        started = time.perf_counter()
        inspect(root, systems[(offset + len(latencies)) % len(systems)], full)
        latencies.append(time.perf_counter() - started)
    return latencies, time.process_time() - cpu


def requests_per_inspection(url: str, ca: str, system: str, full: bool) -> int:
    root = connect(url, ca)
    sent: list[str] = []
    root._conn._session.hooks["response"].append(lambda response, **_: sent.append(response.url))
    inspect(root, system, full)
    return len(sent)


# ---------------------------------------------------------------- the services

def start_machines(work: Path, count: int) -> tuple[list[subprocess.Popen[bytes]], list[Path]]:
    sockets = [work / "qemu" / f"b{index:03d}.sock" for index in range(count)]
    sockets[0].parent.mkdir(parents=True)
    processes = []
    for index, path in enumerate(sockets):
        nics = ["-device", f"virtio-net-pci,id=nic0,mac=52:54:00:10:{index // 256:02x}:{index % 256:02x}",
                "-device", f"e1000,id=nic1,mac=52:54:00:20:{index // 256:02x}:{index % 256:02x}"]
        processes.append(subprocess.Popen([*QEMU, *nics, "-qmp", f"unix:{path},server=on,wait=off"],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
    deadline = time.monotonic() + 120
    while not all(path.exists() for path in sockets):
        if time.monotonic() > deadline:
            raise RuntimeError("the QEMU processes did not open their QMP sockets")
        time.sleep(0.2)
    return processes, sockets


def service_config(work: Path, name: str, port: int, tls: bool, sockets: list[Path]) -> Path:
    path = work / f"{name}.toml"
    path.write_text(f'runtime_dir = "{work / "rt"}"\n[redfish]\nlisten = "127.0.0.1:{port}"\n'
                    f'tls = {"true" if tls else "false"}\n'
                    + "".join(f'[vm.b{index:03d}]\nqmp = "{socket}"\n' for index, socket in enumerate(sockets)))
    return path


def emulator_config(work: Path, count: int) -> Path:
    """sushy-emulator's fake driver with ``count`` systems shaped like ours (storage, drives, NICs)."""
    systems = [{"uuid": str(uuid.UUID(int=index + 1)), "name": f"fake{index:03d}", "power_state": "Off",
                "external_notifier": False,
                "nics": [{"mac": f"52:54:00:30:{index // 256:02x}:{index % 256:02x}", "ip": "10.0.2.15"},
                         {"mac": f"52:54:00:40:{index // 256:02x}:{index % 256:02x}", "ip": "10.0.3.15"}]}
               for index in range(count)]
    storage, drives, volumes = {}, {}, {}
    for system in systems:
        storage[system["uuid"]] = [{"Id": name, "Name": f"{name} controller", "Drives": [f"{name}-disk"],
                                    "StorageControllers": [{"MemberId": "0", "Name": name, "SpeedGbps": 6}]}
                                   for name in ("sata", "virtio")]
        for name, size in (("sata", 2 << 30), ("virtio", 3 << 30)):
            drives[system["uuid"], name] = [{"Id": f"{name}-disk", "Name": f"{name} disk", "CapacityBytes": size,
                                             "Protocol": "SATA" if name == "sata" else "PCIe"}]
            volumes[system["uuid"], name] = []  # the fake driver cannot list volumes (501)
    path = work / "emulator.conf"
    path.write_text(f"SUSHY_EMULATOR_FAKE_DRIVER = True\nSUSHY_EMULATOR_FAKE_SYSTEMS = {systems!r}\n"
                    f"SUSHY_EMULATOR_STORAGE = {storage!r}\nSUSHY_EMULATOR_DRIVES = {drives!r}\n"
                    f"SUSHY_EMULATOR_VOLUMES = {volumes!r}\nSUSHY_EMULATOR_STATE_DIR = {str(work / 'emulator')!r}\n")
    return path


async def wait_members(url: str, count: int) -> list[str]:
    """The Systems collection's members once it lists ``count``."""
    deadline = time.monotonic() + 120
    async with httpx.AsyncClient(verify=False, auth=(USER, PASSWORD)) as http:
        while True:
            try:
                response = await http.get(f"{url}/redfish/v1/Systems")
                members = [member["@odata.id"] for member in response.json().get("Members", [])]
                if len(members) >= count:
                    return sorted(members)
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} does not list {count} systems")
            await asyncio.sleep(0.2)


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time of processes so far."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def milliseconds(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:.1f} / {percentile(samples, 0.99) * 1000:.1f}"


# ---------------------------------------------------------------- the run

async def main(arguments: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="qb-bench-", dir="/tmp"))
    qemus, sockets = start_machines(work, arguments.machines)
    nats = NatsServer(work / "nats")
    await nats.start()
    ports = {name: free_tcp_port() for name in SERVERS}
    https = service_config(work, "https", ports["qemu-bmc HTTPS"], True, sockets)
    http = service_config(work, "http", ports["qemu-bmc HTTP"], False, sockets)
    environment = {**os.environ, "IPMI_PASS": PASSWORD}
    processes = [subprocess.Popen([sys.executable, "-m", module, "--nats", nats.url, "--config", str(path),
                                   "--log-level", "WARNING"], env=environment)
                 for module, path in (("qemu_bmc_state", https), ("qemu_bmc_machine", https),
                                      ("qemu_bmc_redfish", https), ("qemu_bmc_redfish", http))]
    processes.append(subprocess.Popen([str(Path(sys.executable).parent / "sushy-emulator"), "--config",
                                       str(emulator_config(work, arguments.machines)), "-i", "127.0.0.1", "-p",
                                       str(ports["sushy-emulator HTTP"])],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    nc = await bus.connect(nats.url, "bench")
    pool = concurrent.futures.ProcessPoolExecutor(arguments.clients, mp_context=multiprocessing.get_context("spawn"))
    loop = asyncio.get_running_loop()

    ca = str(work / "rt" / "redfish" / "cert.pem")

    async def run(url: str, systems: list[str], full: bool, clients: int, seconds: float = 0,
                  count: int = 0) -> tuple[list[float], float]:
        """The latency of each inspection, and the clients' CPU seconds per inspection."""
        parts = await asyncio.gather(*(loop.run_in_executor(pool, client, url, ca, systems, full,
                                                            index * len(systems) // clients, seconds, count)
                                       for index in range(clients)))
        latencies = [latency for part, _ in parts for latency in part]
        return latencies, sum(cpu for _, cpu in parts) / len(latencies)

    try:
        urls = {"qemu-bmc HTTPS": f"https://127.0.0.1:{ports['qemu-bmc HTTPS']}",
                "qemu-bmc HTTP": f"http://127.0.0.1:{ports['qemu-bmc HTTP']}",
                "sushy-emulator HTTP": f"http://127.0.0.1:{ports['sushy-emulator HTTP']}"}
        shared = [processes[0].pid, processes[1].pid, nats.process.pid] if nats.process else []
        server_pids = {"qemu-bmc HTTPS": [*shared, processes[2].pid], "qemu-bmc HTTP": [*shared, processes[3].pid],
                       "sushy-emulator HTTP": [processes[4].pid]}
        members = {name: await wait_members(url, arguments.machines) for name, url in urls.items()}
        names = [f"b{index:03d}" for index in range(arguments.machines)]
        while True:  # the machine service connected to every QEMU
            statuses = await asyncio.gather(*(bus.request(nc, name, subjects.POWER_GET, None, PowerStatus)
                                              for name in names))
            if all(status.run_state != "disconnected" for status in statuses):
                break
            await asyncio.sleep(0.1)
        await asyncio.gather(*(loop.run_in_executor(pool, time.sleep, 0.1) for _ in range(arguments.clients)))

        # the first inspection of every machine: the machine service reads each one's hardware from QEMU
        cold, _ = await run(urls["qemu-bmc HTTP"], members["qemu-bmc HTTP"], True, 1, count=arguments.machines)
        modes = {"full": True, "same reads": False}
        requests = {(name, mode): await loop.run_in_executor(pool, requests_per_inspection, url, ca,
                                                             members[name][0], full)
                    for name, url in urls.items() for mode, full in modes.items()}

        cases = [(mode, scope, name) for mode in modes for scope in ("1 machine", f"{arguments.machines} machines")
                 for name in urls]
        sequential: dict[tuple[str, str, str], list[float]] = {}
        rates: dict[tuple[str, str, str], list[float]] = {}
        loaded: dict[tuple[str, str, str], list[float]] = {}
        server_cpu: dict[tuple[str, str, str], list[float]] = {}
        client_cpu: dict[tuple[str, str, str], list[float]] = {}
        for _ in range(arguments.rounds):
            for case in cases:
                mode, scope, name = case
                systems = members[name][:1 if scope == "1 machine" else arguments.machines]
                sequential.setdefault(case, []).extend((await run(
                    urls[name], systems, modes[mode], 1, count=arguments.inspections // arguments.rounds))[0])
                started, cpu = time.perf_counter(), cpu_seconds(server_pids[name])
                latencies, clients_cpu = await run(urls[name], systems, modes[mode], arguments.clients,
                                                   seconds=arguments.seconds)
                rates.setdefault(case, []).append(len(latencies) / (time.perf_counter() - started))
                server_cpu.setdefault(case, []).append((cpu_seconds(server_pids[name]) - cpu) / len(latencies))
                client_cpu.setdefault(case, []).append(clients_cpu)
                loaded.setdefault(case, []).extend(latencies)

        print(f"Inventory reads with sushy, {arguments.rounds} interleaved rounds; {arguments.clients} client "
              f"processes for {arguments.seconds:g} s per throughput case\n")
        print(f"First inspection of each of the {arguments.machines} machines (the machine service reads the "
              f"hardware from QEMU), p50 / p99 ms: {milliseconds(cold)}\n")
        print("| reads | machines | server | requests per inspection | one client p50 / p99 ms | inspections/s "
              f"({arguments.clients} clients) | p50 / p99 ms under load | CPU ms per inspection: server / clients |")
        print("|---|---|---|---|---|---|---|---|")
        for case in cases:
            mode, scope, name = case
            print(f"| {mode} | {scope} | {name} | {requests[name, mode]} | {milliseconds(sequential[case])} | "
                  f"{statistics.mean(rates[case]):.1f} | {milliseconds(loaded[case])} | "
                  f"{statistics.mean(server_cpu[case]) * 1000:.1f} / {statistics.mean(client_cpu[case]) * 1000:.1f} |")
        print()
        for mode, scope, name in cases:
            if name != "qemu-bmc HTTP":
                continue
            ours, theirs = (mode, scope, "qemu-bmc HTTP"), (mode, scope, "sushy-emulator HTTP")
            https_p50 = statistics.median(sequential[mode, scope, "qemu-bmc HTTPS"]) * 1000
            print(f"{mode}, {scope}: qemu-bmc/sushy-emulator over HTTP: inspections/s "
                  f"{statistics.mean(rates[ours]) / statistics.mean(rates[theirs]):.2f}x (target >= 3), server CPU "
                  f"per inspection {statistics.mean(server_cpu[theirs]) / statistics.mean(server_cpu[ours]):.1f}x "
                  f"less; one client p50 over HTTPS {https_p50:.1f} ms (target < 50 for one machine)")
    finally:
        pool.shutdown()
        await nc.close()
        for process in processes + qemus:
            process.terminate()
        for process in processes + qemus:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        await nats.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--machines", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--inspections", type=int, default=200, help="one-client inspections per case, over all rounds")
    uvloop.run(main(parser.parse_args()))
