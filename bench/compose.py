"""compose.yaml under a real engine beside `qemu-bmc up` on the host, in rounds (interleaved):

- the seconds from `docker-compose up -d` (the image built and cached beforehand, new volumes
  each round: the first start's work is counted) to every front-end answering, with 10 managed
  machines started at once (``autostart``): IPMI over LAN (``ipmi-power`` of FreeIPMI: node01
  first, then all ten), Redfish (``GET /redfish/v1/Systems`` listing ten), VM wire (a Get Device ID
  frame for node01 over the bus, answered); the same for ``qemu-bmc up -c`` with the same config
  on the host;
- memory of the whole deployment once the ten guests idle (the demo's boot sector, which halts
  between ticks): the proportional set size (PSS, shared pages split between their users) of
  every process, QEMU apart from the services and NATS; for compose, the processes of every
  container (``docker top``), and what the engine counts (``docker stats``: the containers'
  cgroups, page cache included);
- the image's size, and the base image's (``debian:bookworm-slim``).

The engine is the compose test's (tests/container_engine.py: Debian's dockerd on a private data
root in the user cache, base images made locally). Targets: answering within 20 s, image under
400 MB.

    .venv/bin/pip install -e .[bench]; .venv/bin/python bench/compose.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import uvloop
from qemu_bmc_shared.config import DEMO_GUEST
from startup import (
    DEADLINE,
    IPMI_CLIENTS,
    PASSWORD,
    USER,
    NoAnswer,
    ipmi_answers,
    stop,
    timed,
    until,
    vmwire_answers,
    vmwire_answers_at,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from container_engine import DEBIAN_IMAGE, ContainerEngine, compose_project, running_engine
from ports import free_tcp_port, free_udp_ports

REPOSITORY = Path(__file__).resolve().parent.parent
TAG = "bench"
MACHINES = [f"node{number:02}" for number in range(1, 11)]
QEMU_ARGS = ["-machine", "q35", "-accel", "tcg", "-m", "64", "-display", "none",
             "-drive", "if=none,id=guest,format=raw,readonly=on,file={{.images}}/guest.img",
             "-device", "virtio-blk-pci,drive=guest,id=disk0,bootindex=1,cyls=1,heads=1,secs=1"]
SETTLE = 10.0
"""Seconds the guests are left after all ten are On before memory is read (their boot done)."""
FRONT_ENDS = ("IPMI node01", "IPMI all ten", "Redfish, ten systems", "VM wire", "every front-end")


def write_config(path: Path, images: str, runtime: Path | None) -> tuple[int, int]:
    """The ten machines' config; the Redfish port and the first IPMI port (one each, in order)."""
    redfish, ipmi = free_tcp_port(), free_udp_ports(len(MACHINES))
    quoted = ", ".join(f'"{argument}"' for argument in QEMU_ARGS)
    lines = [f'runtime_dir = "{runtime}"' if runtime else "", f'[vars]\nimages = "{images}"',
             f'[redfish]\nlisten = "127.0.0.1:{redfish}"']
    for number, machine in enumerate(MACHINES):
        lines.append(f'[vm.{machine}]\ncmd = [{quoted}]\nautostart = true\nipmi = "127.0.0.1:{ipmi + number}"\n'
                     f"vmwire = true")
    path.write_text("\n".join(lines) + "\n")
    return redfish, ipmi


async def every_ipmi_answers(first_port: int) -> None:
    """node01 answers (a new client every 50 ms), then each of the others in turn."""
    await ipmi_answers("ipmi-power", first_port)
    for port in range(first_port + 1, first_port + len(MACHINES)):
        await until(lambda port=port: ipmi_power_answers(port), DEADLINE, f"IPMI on {port}")


async def ipmi_power_answers(port: int) -> bool:
    _, argv = IPMI_CLIENTS["ipmi-power"]
    process = await asyncio.create_subprocess_exec(*argv(port), stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.DEVNULL)
    output, _ = await process.communicate()
    return process.returncode == 0 and output.strip().lower().endswith((b"on", b"off"))


async def front_ends(started: float, redfish: int, ipmi: int, vmwire: Awaitable[None]) -> dict[str, float | str]:
    node01 = asyncio.create_task(timed(started, ipmi_answers("ipmi-power", ipmi)))
    probes = {"IPMI all ten": every_ipmi_answers(ipmi),
              "Redfish, ten systems": until(lambda: systems_listed(redfish), DEADLINE, "ten systems"),
              "VM wire": vmwire}
    values = await asyncio.gather(*(timed(started, probe) for probe in probes.values()))
    results = {"IPMI node01": await node01, **dict(zip(probes, values, strict=True))}
    numbers = list(results.values())
    results["every front-end"] = max(numbers) if all(isinstance(value, float) for value in numbers) \
        else "a front-end did not answer"
    return results


async def systems_listed(redfish: int, power_state: str | None = None) -> bool:
    """Whether Redfish lists the ten systems (and, given ``power_state``, each of them in it)."""
    async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{redfish}", verify=False, auth=(USER, PASSWORD),
                                 timeout=10) as client:
        try:
            listed = await client.get("/redfish/v1/Systems")
            if listed.status_code != 200 or listed.json().get("Members@odata.count") != len(MACHINES):
                return False
            if power_state is None:
                return True
            for machine in MACHINES:
                system = await client.get(f"/redfish/v1/Systems/{machine}")
                if system.status_code != 200 or system.json().get("PowerState") != power_state:
                    return False
        except httpx.HTTPError:
            return False
    return True


def pss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def is_qemu(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().startswith("qemu-system")
    except OSError:
        return False


def descendants(pid: int) -> list[int]:
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                pending.extend(int(child) for child in (task / "children").read_text().split())
            except OSError:
                continue
    return found


def memory(pids: list[int]) -> dict[str, float]:
    qemu = [pid for pid in pids if is_qemu(pid)]
    return {"QEMU (ten)": sum(map(pss_mib, qemu)),
            "services and NATS": sum(pss_mib(pid) for pid in pids if pid not in qemu),
            "QEMU processes": float(len(qemu))}


async def when_idle(redfish: int) -> None:
    await until(lambda: systems_listed(redfish, "On"), DEADLINE * 2, "ten systems On")
    await asyncio.sleep(SETTLE)


async def host_round(work: Path) -> dict[str, float | str]:
    images = work / "images"
    images.mkdir()
    shutil.copy2(DEMO_GUEST, images / "guest.img")
    config = work / "qemu-bmc.toml"
    redfish, ipmi = write_config(config, str(images), work / "rt")
    log = work / "up.log"
    with log.open("wb") as output:
        started = time.monotonic()
        up = await asyncio.create_subprocess_exec(str(Path(sys.executable).parent / "qemu-bmc"), "up", "-c",
                                                  str(config), stdout=output, stderr=output,
                                                  start_new_session=True)
    try:
        results = await front_ends(started, redfish, ipmi, vmwire_answers(work / "rt", MACHINES[0]))
        await when_idle(redfish)
        return {**results, **memory(descendants(up.pid))}
    finally:
        await stop(up, group=True)


async def compose_round(engine: ContainerEngine, work: Path) -> dict[str, float | str]:
    project = work / "qbbench"
    project.mkdir()
    token, nats_port = compose_project(project, TAG)
    shutil.copy2(DEMO_GUEST, project / "images/guest.img")
    redfish, ipmi = write_config(project / "qemu-bmc.toml", "/images", None)
    started = time.monotonic()
    engine.compose(project, "up", "-d", "--no-build", timeout=600)
    returned = time.monotonic() - started
    try:
        results = await front_ends(started, redfish, ipmi,
                                   vmwire_answers_at(f"nats://{token}@127.0.0.1:{nats_port}", MACHINES[0]))
        await when_idle(redfish)
        containers = engine.compose(project, "ps", "-q").stdout.split()
        pids = [int(pid) for container in containers
                for pid in engine.docker("top", container, "-eo", "pid").stdout.split()[1:]]
        stats = engine.docker("stats", "--no-stream", "--format", "{{.MemUsage}}", *containers).stdout.split("\n")
        engine_mib = sum(mib(line.split("/")[0]) for line in stats if line.strip())
        return {**results, "`up -d` returned": returned, **memory(pids), "engine's count (docker stats)": engine_mib}
    finally:
        engine.compose(project, "down", "-v", "--timeout", "40", check=False, timeout=300)


def mib(text: str) -> float:
    """docker stats' 12.3MiB / 1.2GiB / 800KiB, in MiB."""
    text = text.strip()
    for unit, factor in (("GiB", 1024), ("MiB", 1), ("KiB", 1 / 1024), ("kB", 1 / 1024), ("B", 1 / 1024 / 1024)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return 0.0


def image_mb(engine: ContainerEngine, image: str) -> float:
    return int(engine.docker("image", "inspect", "-f", "{{.Size}}", image).stdout) / 1e6


async def main(arguments: argparse.Namespace) -> None:
    figures: dict[str, dict[str, list[float | str]]] = {"compose": {}, "qemu-bmc up (host)": {}}
    load_before = os.getloadavg()[0]

    async def run(kind: str, measure: Callable[[Path], Awaitable[dict[str, float | str]]]) -> None:
        with tempfile.TemporaryDirectory(prefix="qb-compose-", dir="/tmp") as directory:
            try:
                results = await measure(Path(directory))
            except NoAnswer as exc:
                results = {"every front-end": str(exc)}
        for name, value in results.items():
            figures[kind].setdefault(name, []).append(value)
            print(f"  {kind} | {name}: {value:.2f}" if isinstance(value, float) else f"  {kind} | {name}: {value}",
                  file=sys.stderr)

    with running_engine() as engine:
        engine.ensure_base_images()
        started = time.monotonic()
        built = engine.build_image(REPOSITORY, f"qemu-bmc:{TAG}")
        build_seconds = time.monotonic() - started
        sizes = {"qemu-bmc image": image_mb(engine, f"qemu-bmc:{TAG}"), "base image": image_mb(engine, DEBIAN_IMAGE)}
        for round_number in range(arguments.rounds):
            print(f"round {round_number + 1}", file=sys.stderr)
            await run("compose", lambda work: compose_round(engine, work))
            await run("qemu-bmc up (host)", host_round)

    def median(kind: str, name: str) -> float | None:
        numbers = [value for value in figures[kind].get(name, []) if isinstance(value, float)]
        return statistics.median(numbers) if numbers else None

    print(f"\n{arguments.rounds} rounds, ten machines; load average (1 min) {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after; image {'built' if built else 'cached'} ({build_seconds:.0f} s)\n")
    print("| figure | compose | qemu-bmc up (host) | compose / host | each (compose; host) |")
    print("|---|---|---|---|---|")
    names = list(dict.fromkeys([*FRONT_ENDS, *figures["compose"], *figures["qemu-bmc up (host)"]]))
    for name in names:
        if name == "QEMU processes":
            continue
        unit = "s" if name in FRONT_ENDS or name.startswith("`up") else "MiB"
        compose, host = median("compose", name), median("qemu-bmc up (host)", name)
        ratio = f"{compose / host:.2f}x" if compose is not None and host else "-"
        each = "; ".join(", ".join(f"{value:.1f}" if isinstance(value, float) else value
                                   for value in figures[kind].get(name, [])) or "-" for kind in figures)
        print(f"| {name} ({unit}, median) | {'-' if compose is None else f'{compose:.1f}'} | "
              f"{'-' if host is None else f'{host:.1f}'} | {ratio} | {each} |")
    print()
    for name, size in sizes.items():
        print(f"{name}: {size:.0f} MB")
    slowest = [value for value in figures["compose"].get("every front-end", []) if isinstance(value, float)]
    if slowest:
        print(f"compose: every front-end answering, max {max(slowest):.1f} s (target 20 s: "
              f"{'met' if max(slowest) < 20 else 'NOT met'}); image {sizes['qemu-bmc image']:.0f} MB (target 400 MB: "
              f"{'met' if sizes['qemu-bmc image'] < 400 else 'NOT met'})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    uvloop.run(main(parser.parse_args()))
