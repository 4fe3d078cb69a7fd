"""Bus overhead: power status through NATS to the machine service, beside direct QMP query-status.

All in the same run, interleaved in rounds, against two identical QEMU machines (a QMP socket
takes one client at a time, and the machine service holds its machine's):

* ``power.get``: the status request front-ends send; the machine service answers from the run
  state it keeps current from QMP events and the QEMU process;
* ``power.get`` with ``fresh``: the machine service asks QEMU (``query-status``) first, so its
  difference to direct QMP is exactly what the bus (NATS round trip, JSON, dispatch) adds;
* direct QMP ``query-status`` with qemu.qmp, the peer.

Target: the bus adds at most 0.5 ms at p50.

    .venv/bin/python bench/bus.py [--requests 3000]
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
from qemu.qmp import QMPClient
from qemu_bmc.natsserver import NatsServer
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import PowerQuery, PowerRequest, PowerStatus

QEMU_ARGS = ["-machine", "q35", "-accel", "tcg", "-m", "64", "-display", "none", "-nodefaults"]


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def summary(samples: list[float]) -> tuple[float, float, float]:
    return statistics.median(samples), percentile(samples, 0.99), statistics.mean(samples)


async def main(requests: int, rounds: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="qb-bench-", dir="/tmp"))
    nats = NatsServer(work / "nats")
    await nats.start()
    config = work / "bench.toml"
    config.write_text(f'runtime_dir = "{work / "rt"}"\n[vm.b1]\ncmd = {QEMU_ARGS!r}\n'.replace("'", '"'))
    service = subprocess.Popen([sys.executable, "-m", "qemu_bmc_machine", "--nats", nats.url, "--config",
                                str(config), "--stop-vms-on-exit", "--log-level", "WARNING"])
    peer_socket = work / "peer.sock"
    peer = subprocess.Popen(["qemu-system-x86_64", *QEMU_ARGS, "-qmp", f"unix:{peer_socket},server=on,wait=off"])
    nc = await bus.connect(nats.url, "bench")
    qmp = QMPClient("bench")
    try:
        for _ in range(200):
            try:
                await bus.request(nc, "b1", subjects.POWER_SET, PowerRequest(action="on"), PowerStatus, timeout=30)
                break
            except bus.BusError:
                await asyncio.sleep(0.1)
        await qmp.connect(str(peer_socket))

        fresh = PowerQuery(fresh=True)
        paths = {
            "power.get over NATS (state kept from QMP events)":
                lambda: bus.request(nc, "b1", subjects.POWER_GET, None, PowerStatus),
            "power.get fresh over NATS (QMP query-status inside)":
                lambda: bus.request(nc, "b1", subjects.POWER_GET, fresh, PowerStatus),
            "direct QMP query-status (peer QEMU, qemu.qmp)": lambda: qmp.execute("query-status"),
        }
        results: dict[str, list[float]] = {name: [] for name in paths}
        for call in paths.values():  # warm-up
            for _ in range(200):
                await call()
        for _ in range(rounds):
            for name, call in paths.items():
                for _ in range(requests // rounds):
                    started = time.perf_counter()
                    await call()
                    results[name].append((time.perf_counter() - started) * 1000)
        figures = {name: summary(samples) for name, samples in results.items()}
        cached, live, direct = figures.values()
        print(f"{requests} requests per path, {rounds} interleaved rounds\n")
        print("| path | p50 ms | p99 ms | mean ms |")
        print("|---|---|---|---|")
        for name, (p50, p99, mean) in figures.items():
            print(f"| {name} | {p50:.3f} | {p99:.3f} | {mean:.3f} |")
        print(f"| added by the bus (fresh minus direct) | {live[0] - direct[0]:.3f} | {live[1] - direct[1]:.3f} | "
              f"{live[2] - direct[2]:.3f} |")
        print(f"\npower.get / direct QMP at p50: {cached[0] / direct[0]:.2f}x; "
              f"fresh / direct: {live[0] / direct[0]:.2f}x")
        print(f"target (bus adds <= 0.5 ms at p50): power.get {cached[0] - direct[0]:+.3f} ms, "
              f"fresh {live[0] - direct[0]:+.3f} ms")
    finally:
        await qmp.disconnect()
        await nc.close()
        service.terminate()
        service.wait(30)
        peer.kill()
        peer.wait()
        await nats.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=10)
    arguments = parser.parse_args()
    uvloop.run(main(arguments.requests, arguments.rounds))  # the loop the services run on, for both paths
