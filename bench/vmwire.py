"""In-band IPMI: FreeIPMI's ``bmc-config --checkout`` (every section, thousands of KCS request and
response pairs) inside the tiny Linux test guest, with QEMU's ipmi-bmc-extern wired to this
VM-wire service and, in the same run, to OpenIPMI's ``ipmi_sim`` (``serial 15 ... codec VM``).

The guest runs the checkout several times per boot; the host times each run from the guest's
serial output (markers printed before and after), so guest boot time is not counted. Boots
alternate between the two BMCs, in rounds, so that noise hits both alike.

Target: no more than 1.2x ipmi_sim.

    .venv/bin/python bench/vmwire.py [--rounds 3] [--checkouts 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop
from qemu_bmc.natsserver import NatsServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
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


LINES: dict[tuple[int, str], int] = {}
"""The lines of bmc-config's output per BMC port and kind: how much there was to check out."""


async def start_peers(work: Path) -> tuple[dict[str, int], list[subprocess.Popen], NatsServer]:
    ports = {"qemu-bmc": free_tcp_port(), "ipmi_sim": free_tcp_port()}
    nats = NatsServer(work / "nats")
    await nats.start()
    config = work / "bench.toml"
    config.write_text(f'runtime_dir = "{work / "rt"}"\n[vm.b1]\ncmd = ["-m", "64"]\n'
                      f'ipmi = "127.0.0.1:{free_tcp_port()}"\nvmwire = "127.0.0.1:{ports["qemu-bmc"]}"\n')
    processes = [subprocess.Popen([sys.executable, "-m", module, "--nats", nats.url, "--config", str(config),
                                   "--log-level", "WARNING"], env={"IPMI_PASS": "password", "PATH": "/usr/bin"})
                 for module in ("qemu_bmc_state", "qemu_bmc_vmwire")]
    (work / "lan.conf").write_text(f"""name "bench"
set_working_mc 0x20
  startlan 1
    addr 127.0.0.1 {free_tcp_port()}
    priv_limit admin
    allowed_auths_admin md5
    guid a123456789abcdefa123456789abcdef
  endlan
  serial 15 127.0.0.1 {ports["ipmi_sim"]} codec VM
  user 2 true "admin" "password" admin 64 md5
""")
    (work / "bench.emu").write_text("mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02\n"
                                    "mc_enable 0x20\n")
    processes.append(subprocess.Popen(["ipmi_sim", "-c", str(work / "lan.conf"), "-f", str(work / "bench.emu"), "-n",
                                       "-p"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
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


async def boot(guest: LinuxGuest, initrd: Path, port: int) -> dict[str, list[float]]:
    """Boot the guest against the BMC on ``port``; the seconds of each checkout, by kind."""
    process = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64", *guest.qemu_args(initrd), "-no-reboot", "-serial", "stdio",
        "-chardev", f"socket,id=ipmi0,host=127.0.0.1,port={port},reconnect=1",
        "-device", "ipmi-bmc-extern,id=bmc0,chardev=ipmi0", "-device", "isa-ipmi-kcs,bmc=bmc0",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert process.stdout is not None
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    began, transcript = 0.0, []
    while line := await asyncio.wait_for(process.stdout.readline(), 600):
        text = line.decode(errors="replace").strip()
        transcript.append(text)
        if text.startswith("BENCH-BEGIN"):
            began = time.perf_counter()
        elif text.startswith("BENCH-END"):
            _, kind, rc, lines = text.split()
            times[kind].append(time.perf_counter() - began)
            LINES[port, kind] = int(lines.split("=")[1])
            if rc not in ("rc=0", "rc=1"):  # 1: some keys not supported, as on real BMCs
                raise RuntimeError(f"bmc-config failed: {text}")
    await process.wait()
    if not all(times.values()):
        raise RuntimeError("no checkout ran:\n" + "\n".join(transcript[-30:]))
    return times


async def main(arguments: argparse.Namespace) -> None:
    guest = LinuxGuest(default_cache()).build()
    work = Path(tempfile.mkdtemp(prefix="qb-bench-", dir="/tmp"))
    initrd = guest.initrd(SCRIPT.format(checkouts=arguments.checkouts), work)
    ports, processes, nats = await start_peers(work)
    try:
        results: dict[tuple[str, str], list[float]] = {(name, kind): [] for name in ports for kind in KINDS}
        for _ in range(arguments.rounds):
            for name, port in ports.items():
                for kind, times in (await boot(guest, initrd, port)).items():
                    results[name, kind] += times
        print(f"bmc-config --checkout in the guest, {arguments.rounds} rounds x {arguments.checkouts} per boot, "
              "interleaved\n")
        print("| BMC | checkout | p50 s | max s | mean s | runs | lines |")
        print("|---|---|---|---|---|---|---|")
        for (name, kind), times in results.items():
            print(f"| {name} | {kind} | {statistics.median(times):.3f} | {max(times):.3f} | "
                  f"{statistics.mean(times):.3f} | {len(times)} | {LINES[ports[name], kind]} |")
        for kind in KINDS:
            ratio = statistics.median(results["qemu-bmc", kind]) / statistics.median(results["ipmi_sim", kind])
            print(f"\n{kind}: p50 qemu-bmc/ipmi_sim {ratio:.2f}x (target <= 1.2)")
    finally:
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
