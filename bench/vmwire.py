"""In-band IPMI: FreeIPMI's ``bmc-config --checkout`` (every section, thousands of KCS request and
response pairs) inside the tiny Linux test guest, with QEMU's ipmi-bmc-extern wired to qemu-bmc's
VM-wire service two ways, and, in the same run, to OpenIPMI's ``ipmi_sim`` (``serial 15 ... codec VM``):

* ``qemu-bmc bus``: a managed machine (``vmwire = true``): the machine service launches QEMU, owns
  its chardev (a unix socket) and carries every frame over the bus to the VM-wire service;
* ``qemu-bmc tcp``: an attached machine: QEMU connects to the VM-wire service's TCP address;
* ``ipmi_sim``: QEMU connects to its TCP address.

The guest runs the checkout several times per boot; the host times each run from the guest's
serial output (markers printed before and after; for the managed machine, its console on the
bus), so guest boot time is not counted. Boots alternate between the BMCs, in rounds, so that
noise hits them alike.

Target: no more than 1.2x ipmi_sim; the bus hop's cost is the bus/tcp ratio.

    .venv/bin/python bench/vmwire.py [--rounds 3] [--checkouts 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop
from qemu_bmc.natsserver import NatsServer
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import ConsoleOutput, PowerRequest, PowerStatus

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ipmi_sim import ipmi_sim_argv
from linux_guest import LinuxGuest, default_cache
from ports import free_tcp_port

#: The whole checkout (its size depends on the BMC: ipmi_sim has more users), and the LAN, channel and
#: SOL sections, which both BMCs fill alike: the like-for-like figure.
KINDS = ("all", "lan")
SCRIPT = """\
for i in $(seq 1 {checkouts}); do
  for kind in all lan; do
    case $kind in all) sections="" ;; lan) sections="-S Lan_Conf -S Lan_Channel -S SOL_Conf" ;; esac
    echo "BENCH-BEGIN $kind"
    bmc-config --checkout $sections > /tmp/checkout.txt 2>&1
    echo "BENCH-END $kind rc=$? lines=$(wc -l < /tmp/checkout.txt)"
  done
done
"""


LINES: dict[tuple[str, str], int] = {}
"""The lines of bmc-config's output per BMC and kind: how much there was to check out."""
BUS = "qemu-bmc bus"
MANAGED = "b2"
"""The managed machine, whose in-band link goes over the bus."""


async def start_peers(work: Path, guest_args: list[str]) -> tuple[dict[str, int], list[subprocess.Popen], NatsServer]:
    ports = {"qemu-bmc tcp": free_tcp_port(), "ipmi_sim": free_tcp_port()}
    nats = NatsServer(work / "nats")
    await nats.start()
    managed = f"[vm.{MANAGED}]\ncmd = {json.dumps(guest_args)}\nvmwire = true\n"  # a JSON list of strings is TOML
    config = work / "bench.toml"
    config.write_text(f'runtime_dir = "{work / "rt"}"\n[vm.b1]\nqmp = "{work / "b1-qmp.sock"}"\n'
                      f'ipmi = "127.0.0.1:{free_tcp_port()}"\nvmwire = "127.0.0.1:{ports["qemu-bmc tcp"]}"\n'
                      + managed)
    machine_config = work / "machine.toml"  # the machine service: the managed machine only
    machine_config.write_text(f'runtime_dir = "{work / "rt"}"\n' + managed)
    processes = [subprocess.Popen([sys.executable, "-m", module, "--nats", nats.url, "--config", str(path),
                                   "--log-level", "WARNING", *extra], env={"IPMI_PASS": "password", "PATH": "/usr/bin"})
                 for module, path, extra in (("qemu_bmc_state", config, []), ("qemu_bmc_vmwire", config, []),
                                             ("qemu_bmc_machine", machine_config, ["--stop-vms-on-exit"]))]
    processes.append(subprocess.Popen(ipmi_sim_argv(work, free_tcp_port(), "admin", "password",
                                                    f"  serial 15 127.0.0.1 {ports['ipmi_sim']} codec VM\n"),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for port in ports.values():  # both listening
        deadline = time.monotonic() + 30
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
    return ports, processes, nats


class Timings:
    """The seconds of each checkout, by kind, from the guest's serial lines as they come."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        self.began = 0.0
        self.transcript: list[str] = []
        self.done = asyncio.Event()

    def line(self, text: str) -> None:
        self.transcript.append(text)
        if text.startswith("BENCH-BEGIN"):
            self.began = time.perf_counter()
        elif text.startswith("BENCH-END"):
            _, kind, rc, lines = text.split()
            self.times[kind].append(time.perf_counter() - self.began)
            LINES[self.name, kind] = int(lines.split("=")[1])
            if rc not in ("rc=0", "rc=1"):  # 1: some keys not supported, as on real BMCs
                raise RuntimeError(f"bmc-config failed: {text}")
        elif text.startswith("GUEST-DONE"):
            self.done.set()

    def result(self) -> dict[str, list[float]]:
        if not all(self.times.values()):
            raise RuntimeError(f"{self.name}: no checkout ran:\n" + "\n".join(self.transcript[-30:]))
        return self.times


async def boot(guest: LinuxGuest, initrd: Path, name: str, port: int) -> dict[str, list[float]]:
    """Boot the guest against the BMC on TCP ``port``; the seconds of each checkout, by kind."""
    process = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64", *guest.qemu_args(initrd), "-no-reboot", "-serial", "stdio",
        "-chardev", f"socket,id=ipmi0,host=127.0.0.1,port={port},reconnect=1",
        "-device", "ipmi-bmc-extern,id=bmc0,chardev=ipmi0", "-device", "isa-ipmi-kcs,bmc=bmc0",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert process.stdout is not None
    timings = Timings(name)
    while line := await asyncio.wait_for(process.stdout.readline(), 600):
        timings.line(line.decode(errors="replace").strip())
    await process.wait()
    return timings.result()


async def boot_managed(nc, guest_console: dict[str, Timings]) -> dict[str, list[float]]:
    """Power the managed machine on (the machine service launches or resets QEMU) and time its
    checkouts from its console on the bus; the guest powers off when it is done."""
    timings = guest_console["current"] = Timings(BUS)
    for _ in range(150):  # the machine service on the bus
        try:
            await bus.request(nc, MANAGED, subjects.POWER_GET, None, PowerStatus)
            break
        except bus.BusError:
            await asyncio.sleep(0.2)
    await bus.request(nc, MANAGED, subjects.POWER_SET, PowerRequest(action="on"), PowerStatus, timeout=60)
    await asyncio.wait_for(timings.done.wait(), 600)
    for _ in range(300):  # the guest powers off after its script
        if (await bus.request(nc, MANAGED, subjects.POWER_GET, None, PowerStatus)).state == "Off":
            break
        await asyncio.sleep(0.2)
    return timings.result()


async def follow_console(nc, guest_console: dict[str, Timings]) -> None:
    """The managed machine's serial output, line by line, to the boot being timed."""
    pending = bytearray()

    async def received(message) -> None:
        pending.extend(bus.decode(message.data, ConsoleOutput).data)
        while b"\n" in pending:
            line, _, rest = bytes(pending).partition(b"\n")
            pending[:] = rest
            if "current" in guest_console:
                guest_console["current"].line(line.decode(errors="replace").strip())

    await nc.subscribe(subjects.for_machine(MANAGED, subjects.CONSOLE_OUT), cb=received)


async def main(arguments: argparse.Namespace) -> None:
    guest = LinuxGuest(default_cache()).build()
    work = Path(tempfile.mkdtemp(prefix="qb-bench-", dir="/tmp"))
    initrd = guest.initrd(SCRIPT.format(checkouts=arguments.checkouts), work)
    ports, processes, nats = await start_peers(work, guest.qemu_args(initrd))
    nc = await bus.connect(nats.url, "bench")
    guest_console: dict[str, Timings] = {}
    await follow_console(nc, guest_console)
    names = [BUS, *ports]
    try:
        results: dict[tuple[str, str], list[float]] = {(name, kind): [] for name in names for kind in KINDS}
        for _ in range(arguments.rounds):
            for name in names:
                times = await boot_managed(nc, guest_console) if name == BUS else \
                    await boot(guest, initrd, name, ports[name])
                for kind, kind_times in times.items():
                    results[name, kind] += kind_times
        print(f"bmc-config --checkout in the guest, {arguments.rounds} rounds x {arguments.checkouts} per boot, "
              "interleaved\n")
        print("| BMC | checkout | p50 s | max s | mean s | runs | lines |")
        print("|---|---|---|---|---|---|---|")
        for (name, kind), times in results.items():
            print(f"| {name} | {kind} | {statistics.median(times):.3f} | {max(times):.3f} | "
                  f"{statistics.mean(times):.3f} | {len(times)} | {LINES[name, kind]} |")
        for kind in KINDS:
            p50 = {name: statistics.median(results[name, kind]) for name in names}
            print(f"\n{kind}: p50 qemu-bmc bus/ipmi_sim {p50[BUS] / p50['ipmi_sim']:.2f}x (target <= 1.2), "
                  f"tcp/ipmi_sim {p50['qemu-bmc tcp'] / p50['ipmi_sim']:.2f}x; the bus hop: "
                  f"{p50[BUS] / p50['qemu-bmc tcp']:.2f}x tcp ({(p50[BUS] - p50['qemu-bmc tcp']) * 1000:+.0f} ms "
                  "per checkout)")
    finally:
        await nc.close()
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(20)
        await nats.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--checkouts", type=int, default=3)
    uvloop.run(main(parser.parse_args()))
