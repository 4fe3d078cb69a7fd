"""Start-up: the seconds from starting a BMC to the first successful answer of each front-end, on
this machine, in rounds (the servers interleaved, so that noise hits them alike):

- ``qemu-bmc up -c CONFIG``, one managed machine (off; IPMI over LAN and Redfish on free loopback
  ports, ``vmwire = true``), a new runtime directory each time (so the first start's work is
  counted: JetStream store, bus token, self-signed certificate). Its front-ends, polled at once:
  IPMI over LAN (``ipmi-power --stat`` of FreeIPMI, or ``ipmitool -I lanplus power status`` in a
  separate start), Redfish (``GET /redfish/v1/Systems/NAME``, HTTPS, Basic authentication), and
  VM wire (a Get Device ID frame on the machine's ``vmwire.frame`` subject, the bus request the
  machine service makes for each frame QEMU's ipmi-bmc-extern sends: answered with completion 0);
- the demo (``qemu-bmc up`` with no config), when 127.0.0.1:6230 (udp) and 8443 (tcp) are free:
  its Redfish ``GET /redfish/v1/Systems`` with a member, and its IPMI and VM wire when its banner
  shows them;
- peers: a pyghmi ``Bmc`` (what VirtualBMC runs) from its start to its first ``ipmi-power`` and
  ``ipmitool`` power status, and ``sushy-emulator --fake`` (HTTPS, a certificate made here) to its
  first ``GET /redfish/v1/Systems``;
- a fresh ``git clone`` of this repository to a running demo with ``scripts/up.sh`` (packages from
  pip's local sources), to the demo's first Redfish answer; then stopped and ``scripts/up.sh`` run
  again in the same clone; for each, whether pip ran (seen in the process list).

An IPMI client is started only once the server's UDP port is bound (no client can succeed
before), then a new one every 50 ms (FreeIPMI; ipmitool every 100 ms: 40 ms of processor each)
while earlier ones still wait, so that a try lost to a server not yet reading costs nothing.

Target: every front-end answering within 3 s of `up`.

    .venv/bin/pip install -e .[bench]; .venv/bin/python bench/startup.py [--rounds 5] [--clone-rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import uvloop
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared import vmwire as framing
from qemu_bmc_shared.messages import VmWireAnswer, VmWireFrame

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ports import free_tcp_port, free_udp_ports
from waiting import TimedOut, wait_for

REPOSITORY = Path(__file__).resolve().parent.parent
USER, PASSWORD = "admin", "password"
MACHINE = "n1"
QEMU_ARGS = ["-machine", "q35", "-accel", "tcg", "-m", "64", "-display", "none", "-nodefaults", "-vga", "none"]
DEMO_IPMI, DEMO_REDFISH = 6230, 8443
POLL = 0.02
DEADLINE = 60.0
"""Seconds a front-end may take before its row says it did not answer."""
CLONE_DEADLINE = 900.0
PORTS_WAIT = 60.0
"""Seconds to wait for the demo's ports to be free before its rows say they were taken."""
PORTS_TAKEN = f"skipped: udp {DEMO_IPMI} or tcp {DEMO_REDFISH} taken for {PORTS_WAIT:g} s"
ALL_THREE = "all three (the last of them)"
ROWS = ["qemu-bmc up | IPMI (ipmi-power)", "qemu-bmc up | IPMI (ipmitool, separate start)", "qemu-bmc up | Redfish",
        "qemu-bmc up | VM wire", f"qemu-bmc up | {ALL_THREE}", "qemu-bmc up | banner printed",
        "pyghmi Bmc | IPMI (ipmi-power)", "pyghmi Bmc | IPMI (ipmitool)", "sushy-emulator --fake | Redfish",
        "demo | Redfish", "demo | IPMI (ipmi-power)", "demo | VM wire", "demo | banner printed"]
"""The table's rows, in its order (a row without figures is left out)."""
PYGHMI_BMC = """
import sys
from pyghmi.ipmi import bmc

class Peer(bmc.Bmc):
    power = "off"

    def get_power_state(self):
        return self.power

    def power_on(self):
        self.power = "on"

    def power_off(self):
        self.power = "off"

Peer({"admin": "password"}, port=int(sys.argv[1]), address="127.0.0.1").listen()
"""
IPMI_CLIENTS = {
    "ipmi-power": (0.05, lambda port: ["ipmi-power", "-h", f"127.0.0.1:{port}", "-u", USER, "-p", PASSWORD,
                                       "-D", "LAN_2_0", "--stat", "--session-timeout=2000",
                                       "--retransmission-timeout=200"]),
    "ipmitool": (0.1, lambda port: ["ipmitool", "-I", "lanplus", "-H", "127.0.0.1", "-p", str(port), "-U", USER,
                                    "-P", PASSWORD, "-N", "1", "-R", "2", "power", "status"]),
}
"""Each client: seconds between two starts, and its command line."""


class NoAnswer(TimedOut):
    """A front-end that did not answer (the row says why)."""


def bound(protocol: str, port: int, listening: bool = False) -> bool:
    """Whether some socket of ``protocol`` (udp or tcp) is bound to ``port`` (tcp: listening)."""
    for table in (f"/proc/net/{protocol}", f"/proc/net/{protocol}6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and (not listening or fields[3] == "0A"):
                    return True
    return False


async def until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    try:
        await wait_for(predicate, timeout, POLL, what)
    except TimedOut as exc:
        raise NoAnswer(str(exc)) from None


async def ipmi_answers(client: str, port: int) -> None:
    """Returns when ``client`` has had a power status from 127.0.0.1:``port``."""
    await until(lambda: bound("udp", port), DEADLINE, f"UDP {port} bound")
    every, argv = IPMI_CLIENTS[client]
    answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    tries: set[asyncio.Task[None]] = set()

    async def attempt() -> None:
        process = await asyncio.create_subprocess_exec(*argv(port), stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.DEVNULL)
        try:
            output, _ = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        if process.returncode == 0 and output.strip().lower().endswith((b"on", b"off")) and not answered.done():
            answered.set_result(None)

    try:
        deadline = time.monotonic() + DEADLINE
        while not answered.done():
            if time.monotonic() > deadline:
                raise NoAnswer(f"no {client} answer within {DEADLINE:g} s")
            task = asyncio.create_task(attempt())
            tries.add(task)
            task.add_done_callback(tries.discard)
            await asyncio.wait([answered], timeout=every)
    finally:
        for task in list(tries):
            task.cancel()
        await asyncio.gather(*tries, return_exceptions=True)


async def redfish_answers(url: str, auth: tuple[str, str] | None) -> None:
    """Returns when ``url`` has answered 200 (for a collection, with a member)."""
    async with httpx.AsyncClient(verify=False, auth=auth, timeout=5) as client:

        async def answered() -> bool:
            try:
                reply = await client.get(url)
            except httpx.HTTPError:
                return False
            return reply.status_code == 200 and (not url.endswith("/Systems") or bool(reply.json().get("Members")))

        await until(answered, DEADLINE, f"200 from {url}")


async def vmwire_answers(runtime: Path, machine: str) -> None:
    """Returns when a Get Device ID frame for ``machine``'s in-band link has its answer over the bus."""
    url_file = runtime / "nats.url"
    await until(lambda: url_file.exists() and url_file.read_text().startswith("nats://"), DEADLINE, "nats.url")
    await vmwire_answers_at(url_file.read_text().strip(), machine)


async def vmwire_answers_at(url: str, machine: str) -> None:
    """vmwire_answers with the bus's URL given."""
    nc = await bus.connect(url, "bench-startup", timeout=DEADLINE)
    number = 0

    async def answered() -> bool:
        nonlocal number
        number += 1
        body = bytes([number & 0xFF, 0x06 << 2, 0x01])  # Get Device ID (IPMI v2.0 §20.1)
        frame = framing.escape(body + bytes([framing.checksum(body)])) + bytes([framing.MESSAGE_END])
        try:
            answer = await bus.request(nc, machine, subjects.VMWIRE_FRAME,
                                       VmWireFrame(link="bench-startup", number=number, frame=frame), VmWireAnswer,
                                       timeout=2)
        except bus.BusError:
            return False
        return len(answer.data) > 3 and answer.data[3] == 0

    try:
        await until(answered, DEADLINE, f"VM-wire answer for {machine}")
    finally:
        await nc.close()


async def demo_ports_free(timeout: float) -> bool:
    """Whether the demo's fixed ports are free, or become free within ``timeout`` seconds (a demo
    of someone else's may hold them for a while)."""
    try:
        await until(lambda: not bound("udp", DEMO_IPMI) and not bound("tcp", DEMO_REDFISH, listening=True), timeout,
                    "free demo ports")
    except NoAnswer:
        return False
    return True


async def timed(started: float, probe: Awaitable[None]) -> float | str:
    """Seconds from ``started`` to the end of ``probe``, or why it did not answer."""
    try:
        await probe
    except NoAnswer as exc:
        return str(exc)
    return time.monotonic() - started


async def stop(process: asyncio.subprocess.Process, group: bool = False) -> None:
    """Ctrl-C, as a user stops `qemu-bmc up`; SIGKILL (to its process group: ``group``) after a minute."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(process.wait(), 60)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL) if group else process.kill()
            await process.wait()


def qemu_bmc_config(work: Path) -> tuple[Path, int, int]:
    redfish, ipmi = free_tcp_port(), free_udp_ports()
    config = work / "qemu-bmc.toml"
    qemu_args = ", ".join(f'"{argument}"' for argument in QEMU_ARGS)
    config.write_text(f'runtime_dir = "{work / "rt"}"\n[redfish]\nlisten = "127.0.0.1:{redfish}"\n'
                      f'[vm.{MACHINE}]\nipmi = "127.0.0.1:{ipmi}"\nvmwire = true\ncmd = [{qemu_args}]\n')
    return config, redfish, ipmi


async def qemu_bmc_up(work: Path, ipmi_client: str, ipmi_only: bool) -> dict[str, float | str]:
    """One `qemu-bmc up -c CONFIG`: the seconds to each front-end's first answer (``ipmi_only``:
    IPMI's alone, so that the other clients' polling does not slow the IPMI service's start)."""
    config, redfish, ipmi = qemu_bmc_config(work)
    log = work / "up.log"
    qemu_bmc = str(Path(sys.executable).parent / "qemu-bmc")
    with log.open("wb") as output:
        started = time.monotonic()
        up = await asyncio.create_subprocess_exec(qemu_bmc, "up", "-c", str(config), stdout=output, stderr=output)
    try:
        probes = {
            f"IPMI ({ipmi_client})": ipmi_answers(ipmi_client, ipmi),
            "Redfish": redfish_answers(f"https://127.0.0.1:{redfish}/redfish/v1/Systems/{MACHINE}", (USER, PASSWORD)),
            "VM wire": vmwire_answers(work / "rt", MACHINE),
            "banner printed": until(lambda: "qemu-bmc is up" in log.read_text(), DEADLINE, "banner"),
        }
        if ipmi_only:
            for name in [name for name in probes if not name.startswith("IPMI")]:
                probes.pop(name).close()  # a coroutine never awaited
        results = await asyncio.gather(*(timed(started, probe) for probe in probes.values()))
        return dict(zip(probes, results, strict=True))
    finally:
        await stop(up)
        if up.returncode != 0:
            print(f"qemu-bmc up exited with {up.returncode}:\n{log.read_text()[-2000:]}", file=sys.stderr)


async def demo_up(work: Path) -> dict[str, float | str]:
    """`qemu-bmc up` with no config (its own runtime directory): its front-ends' first answers,
    those its banner shows."""
    if not await demo_ports_free(PORTS_WAIT):
        reason = PORTS_TAKEN
        return {"Redfish": reason, "IPMI (ipmi-power)": reason, "VM wire": reason}
    log = work / "demo.log"
    runtime = work / "demo-rt"
    qemu_bmc = str(Path(sys.executable).parent / "qemu-bmc")
    with log.open("wb") as output:
        started = time.monotonic()
        up = await asyncio.create_subprocess_exec(qemu_bmc, "up", stdout=output, stderr=output,
                                                  env={**os.environ, "QEMU_BMC_RUNTIME_DIR": str(runtime)})
    try:
        banner = asyncio.create_task(timed(started, until(lambda: "qemu-bmc is up" in log.read_text(), DEADLINE,
                                                            "banner")))
        probes = {"Redfish": asyncio.create_task(timed(started, redfish_answers(
                      f"https://127.0.0.1:{DEMO_REDFISH}/redfish/v1/Systems", (USER, PASSWORD)))),
                  "IPMI (ipmi-power)": asyncio.create_task(timed(started, ipmi_answers("ipmi-power", DEMO_IPMI))),
                  "VM wire": asyncio.create_task(timed(started, vmwire_answers(runtime, "node1")))}
        results: dict[str, float | str] = {"banner printed": await banner}
        text = log.read_text()
        shown = {"IPMI (ipmi-power)": str(DEMO_IPMI) in text, "VM wire": "in-band" in text or "VM wire" in text,
                 "Redfish": True}
        for name, task in probes.items():
            if not shown[name] and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                results[name] = "skipped: not in the demo's banner"
            else:
                results[name] = await task
        return results
    finally:
        await stop(up)


async def pyghmi_bmc(ipmi_client: str) -> float | str:
    port = free_udp_ports()
    started = time.monotonic()
    peer = await asyncio.create_subprocess_exec(sys.executable, "-c", PYGHMI_BMC, str(port))
    try:
        return await timed(started, ipmi_answers(ipmi_client, port))
    finally:
        peer.terminate()
        await peer.wait()


def certificate(work: Path) -> tuple[Path, Path]:
    """A self-signed certificate for sushy-emulator's HTTPS (qemu-bmc makes its own)."""
    cert, key = work / "sushy.crt", work / "sushy.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


async def sushy_emulator(work: Path) -> float | str:
    port = free_tcp_port()
    cert, key = certificate(work)
    emulator = str(Path(sys.executable).parent / "sushy-emulator")
    started = time.monotonic()
    peer = await asyncio.create_subprocess_exec(emulator, "--fake", "-i", "127.0.0.1", "-p", str(port),
                                                "--ssl-certificate", str(cert), "--ssl-key", str(key),
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        return await timed(started, redfish_answers(f"https://127.0.0.1:{port}/redfish/v1/Systems", None))
    finally:
        peer.terminate()
        await peer.wait()


def pip_runs_in(clone: Path) -> bool:
    """Whether a pip process (``python -m pip``, ``pip``) runs in ``clone`` or on its files."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            arguments = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            pip = any(name in ("pip", "pip3") for name in map(os.path.basename, arguments[:2])) or any(
                arguments[index:index + 2] == ["-m", "pip"] for index in range(len(arguments)))
            if pip and (Path(os.readlink(entry / "cwd")).is_relative_to(clone)
                        or any(str(clone) in argument for argument in arguments)):
                return True
    return False


async def up_sh(clone: Path, runtime: Path, log: Path) -> dict[str, float | str]:
    """`scripts/up.sh` in ``clone``: seconds to the demo's first Redfish answer, the seconds
    setup.sh took (until `qemu-bmc up` runs), and whether pip ran."""
    seen: dict[str, float | str] = {"pip ran": "no"}
    with log.open("ab") as output:
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(str(clone / "scripts" / "up.sh"), cwd=clone, stdout=output,
                                                       stderr=output, start_new_session=True,
                                                       env={**os.environ, "QEMU_BMC_RUNTIME_DIR": str(runtime)})

    async def watch() -> None:
        while True:
            if pip_runs_in(clone):
                seen["pip ran"] = "yes"
            with contextlib.suppress(OSError):
                arguments = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
                if "setup.sh" not in seen and b"up" in arguments and any(argument.endswith(b"/qemu-bmc")
                                                                          for argument in arguments):
                    seen["setup.sh"] = time.monotonic() - started  # up.sh has exec'd `qemu-bmc up`
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    try:
        answer = asyncio.create_task(redfish_answers(f"https://127.0.0.1:{DEMO_REDFISH}/redfish/v1/Systems",
                                                     (USER, PASSWORD)))
        exited = asyncio.create_task(process.wait())
        await asyncio.wait([answer, exited], timeout=CLONE_DEADLINE, return_when=asyncio.FIRST_COMPLETED)
        if answer.done() and answer.exception() is None:
            seen["Redfish"] = time.monotonic() - started
        else:
            answer.cancel()
            seen["Redfish"] = (f"up.sh exited with {process.returncode} (see {log})" if exited.done()
                               else f"no answer within {CLONE_DEADLINE:g} s" if not answer.done()
                               else str(answer.exception()))
        exited.cancel()
        return seen
    finally:
        watcher.cancel()
        await stop(process, group=True)


async def clone_to_demo(work: Path) -> dict[str, float | str]:
    if not await demo_ports_free(PORTS_WAIT):
        return {"1st: clone to Redfish answer": PORTS_TAKEN}
    clone = work / "clone"
    started = time.monotonic()
    subprocess.run(["git", "clone", "-q", str(REPOSITORY), str(clone)], check=True)
    cloned = time.monotonic() - started
    first = await up_sh(clone, work / "clone-rt", work / "up-sh.log")
    if isinstance(first["Redfish"], float):
        first["Redfish"] += cloned
    second = await up_sh(clone, work / "clone-rt", work / "up-sh.log") if await demo_ports_free(PORTS_WAIT) else \
        {"Redfish": PORTS_TAKEN}
    return {"git clone": cloned, "1st: setup.sh": first.get("setup.sh", "-"),
            "1st: clone to Redfish answer": first["Redfish"], "1st: pip ran": first.get("pip ran", "-"),
            "2nd: setup.sh": second.get("setup.sh", "-"), "2nd: start to Redfish answer": second["Redfish"],
            "2nd: pip ran": second.get("pip ran", "-")}


def summary(values: list[float | str]) -> tuple[str, str, str]:
    """median, max and each value (or the reasons there is none)."""
    numbers = [value for value in values if isinstance(value, float)]
    each = ", ".join(f"{value:.2f}" if isinstance(value, float) else value for value in values)
    if not numbers:
        return "-", "-", each
    return f"{statistics.median(numbers):.2f}", f"{max(numbers):.2f}", each


async def main(arguments: argparse.Namespace) -> None:
    figures: dict[str, list[float | str]] = {name: [] for name in ROWS}  # the rows in this order, then any other
    load_before = os.getloadavg()[0]

    def add(name: str, value: float | str) -> None:
        figures.setdefault(name, []).append(value)
        shown = f"{value:.2f} s" if isinstance(value, float) else value
        print(f"  {name}: {shown}", file=sys.stderr)

    for round_number in range(arguments.rounds):
        print(f"round {round_number + 1}", file=sys.stderr)
        for ipmi_client in IPMI_CLIENTS:
            with tempfile.TemporaryDirectory(prefix="qb-startup-", dir="/tmp") as directory:
                results = await qemu_bmc_up(Path(directory), ipmi_client, ipmi_only=ipmi_client != "ipmi-power")
            if ipmi_client != "ipmi-power":
                results = {f"IPMI ({ipmi_client}, separate start)": value for value in results.values()}
            if len(results) > 1:
                numbers = [value for name, value in results.items() if name != "banner printed"]
                results[ALL_THREE] = max(numbers) if all(isinstance(value, float) for value in numbers) \
                    else "a front-end did not answer"
            for name, value in results.items():
                add(f"qemu-bmc up | {name}", value)
            add(f"pyghmi Bmc | IPMI ({ipmi_client})", await pyghmi_bmc(ipmi_client))
        with tempfile.TemporaryDirectory(prefix="qb-startup-", dir="/tmp") as directory:
            add("sushy-emulator --fake | Redfish", await sushy_emulator(Path(directory)))
            for name, value in (await demo_up(Path(directory))).items():
                add(f"demo | {name}", value)
    for round_number in range(arguments.clone_rounds):
        print(f"fresh clone {round_number + 1}", file=sys.stderr)
        directory = tempfile.mkdtemp(prefix="qb-startup-clone-", dir="/tmp")
        try:
            for name, value in (await clone_to_demo(Path(directory))).items():
                add(f"fresh clone, up.sh | {name}", value)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    print(f"\nstart to first answer, {arguments.rounds} rounds (fresh clone: {arguments.clone_rounds}); seconds; "
          f"load average (1 min) {load_before:.2f} before, {os.getloadavg()[0]:.2f} after\n")
    print("| server | front-end (client) | median s | max s | each |")
    print("|---|---|---|---|---|")
    for name, values in figures.items():
        server, front_end = name.split(" | ")
        if not values or front_end.endswith("pip ran"):
            continue
        pip = figures.get(name.replace("setup.sh", "pip ran")) if front_end.endswith("setup.sh") else None
        if pip:
            front_end += f" (pip ran: {', '.join(map(str, pip))})"
        print(f"| {server} | {front_end} | " + " | ".join(summary(values)) + " |")

    def median(name: str) -> float | None:
        numbers = [value for value in figures.get(name, []) if isinstance(value, float)]
        return statistics.median(numbers) if numbers else None

    print()
    for ours, peer in (("qemu-bmc up | IPMI (ipmi-power)", "pyghmi Bmc | IPMI (ipmi-power)"),
                       ("qemu-bmc up | IPMI (ipmitool, separate start)", "pyghmi Bmc | IPMI (ipmitool)"),
                       ("qemu-bmc up | Redfish", "sushy-emulator --fake | Redfish")):
        mine, theirs = median(ours), median(peer)
        if mine is not None and theirs is not None:
            print(f"{ours} / {peer}: {mine / theirs:.2f}x ({mine:.2f} s vs {theirs:.2f} s)")
    worst = [value for value in figures.get(f"qemu-bmc up | {ALL_THREE}", []) if isinstance(value, float)]
    if worst:
        print(f"every front-end of `qemu-bmc up` answering: max {max(worst):.2f} s over "
              f"{len(worst)} starts (target: within 3 s: {'met' if max(worst) <= 3 else 'NOT met'})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clone-rounds", type=int, default=2)
    uvloop.run(main(parser.parse_args()))
