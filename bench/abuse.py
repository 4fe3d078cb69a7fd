"""Abuse: what a legitimate administrator gets while an unauthenticated attacker floods the BMC
(issue 13), beside the same measurement with no attacker.

IPMI over LAN, against this service and, in the same run, OpenIPMI's ``ipmi_sim``: a legitimate
client on 127.0.0.1 logs in at a steady pace (``--login-rate`` full logins a second for
``--seconds``: Open Session, RAKP 1-4, one Get Device ID, Close Session, cipher suite 3, one try
with a 2 s time-out per packet, the service's own in-process RMCP+ client) while one source,
127.0.0.2, sends ``--packet-rate`` packets a second:

* ``open-session``: Open Session requests, never followed up (the session table fills);
* ``bogus-rakp3``: Open Session, RAKP 1 for ``admin``, then a RAKP 3 with a wrong HMAC (the
  per-user lockout);
* ``both``: the two alternately.

After each flood the legitimate client keeps trying every 0.5 s: "recovery" is the time from the
flood's end to its first login; a BMC that has not recovered after ``--recovery`` seconds is
restarted (qemu-bmc: its state and ipmi-lan services) so that the next case starts clean.

Redfish: GET of a ComputerSystem (HTTPS, Basic authentication, ``--get-rate`` a second in an open
loop over up to 4 keep-alive connections) while one client POSTs ``--body-mib`` MiB JSON bodies to
the Sessions collection, unauthenticated, one after the other; with the Redfish service's resident
memory.

The paces are open loops: each request starts on time whatever the earlier ones are doing, and
its latency counts from then (a wait for a free connection included).

Targets: 100 % of legitimate logins succeed; p99 at most 3x the quiet figure.

    .venv/bin/python bench/abuse.py [--seconds 30] [--login-rate 5] [--packet-rate 1000]
        [--attacks open-session,bogus-rakp3,both] [--get-rate 50] [--body-mib 64] [--recovery 90]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvloop
from qemu_bmc.natsserver import NatsServer
from qemu_bmc_ipmi_lan import framing
from qemu_bmc_ipmi_lan.client import RmcpPlusClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ipmi_sim import ipmi_sim_argv
from ports import free_tcp_port, free_udp_port

USER, PASSWORD = "admin", "password"
AUTHORIZATION = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
LEGITIMATE, ATTACKER = "127.0.0.1", "127.0.0.2"
ATTACKS = ("open-session", "bogus-rakp3", "both")
WARM_UP = 1.0
"""Seconds a flood runs before the legitimate client starts measuring."""
GET_CONNECTIONS = 4
"""Connections of the legitimate Redfish client."""
STATUS_NAMES = {0x01: "insufficient resources", 0x02: "invalid session id", 0x0D: "unauthorized name",
                0x0F: "invalid integrity check"}
SUITE_3 = (1, 1, 1)  # RAKP-HMAC-SHA1, HMAC-SHA1-96, AES-CBC-128 (IPMI v2.0 §22.15.2, table 22-19)
ADMINISTRATOR_BY_NAME = 0x14


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def reason(exc: BaseException) -> str:
    """A short name for why a legitimate request failed."""
    text = str(exc) or type(exc).__name__
    status = re.fullmatch(r"RMCP\+ status (0x[0-9a-f]+)", text)
    if status:
        code = int(status.group(1), 16)
        return f"status {code:#04x} ({STATUS_NAMES.get(code, 'other')})"
    return {"no answer to payload 0x10": "no answer to Open Session", "no answer to payload 0x12": "no RAKP 2",
            "no answer to payload 0x14": "no RAKP 4"}.get(text, text)


# ---------------------------------------------------------------------------------------- peers


MODULES = {"state": "qemu_bmc_state", "machine": "qemu_bmc_machine", "ipmi-lan": "qemu_bmc_ipmi_lan",
           "redfish": "qemu_bmc_redfish"}
BMC_PROCESSES = {"qemu-bmc": ("state", "ipmi-lan"), "ipmi_sim": ("ipmi_sim",)}
"""What a restart of each BMC restarts: the state service holds qemu-bmc's login failures."""


@dataclass
class Peers:
    nats: NatsServer
    ipmi: dict[str, int]
    """IPMI LAN port by BMC name."""
    redfish: str
    """The qemu-bmc ComputerSystem URL."""
    commands: dict[str, list[str]]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def spawn(self, name: str) -> None:
        quiet = subprocess.DEVNULL if name == "ipmi_sim" else None
        self.processes[name] = subprocess.Popen(self.commands[name], stdout=quiet, stderr=quiet,
                                                env={**os.environ, "IPMI_PASS": PASSWORD})

    def stop(self, names: tuple[str, ...] | None = None) -> None:
        chosen = [self.processes.pop(name) for name in names or list(self.processes)]
        for process in chosen:
            process.terminate()
        for process in chosen:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    async def restart(self, bmc: str) -> None:
        """A fresh start of ``bmc``, as a power cycle of a real BMC would give."""
        self.stop(BMC_PROCESSES[bmc])
        for name in BMC_PROCESSES[bmc]:
            self.spawn(name)
        if await until(lambda: login(self.ipmi[bmc]), 30) is None:
            raise RuntimeError(f"{bmc} does not answer IPMI on port {self.ipmi[bmc]} after a restart")


async def login(port: int, timeout: float = 2.0) -> None:
    """One full legitimate login; IpmiClientError or AssertionError when it fails."""
    async with RmcpPlusClient(LEGITIMATE, port, USER, PASSWORD, timeout=timeout) as client:
        await client.open()
        completion, _ = await client.request(0x06, 0x01)  # Get Device ID
        assert completion == 0, f"Get Device ID completion {completion:#x}"
        await client.close()


async def until(attempt: Callable[[], Awaitable[object]], deadline: float, pause: float = 0.2) -> float | None:
    """Seconds until ``attempt`` first succeeds, None after ``deadline`` seconds."""
    started = time.monotonic()
    while True:
        try:
            await attempt()
            return time.monotonic() - started
        except Exception:
            if time.monotonic() - started > deadline:
                return None
            await asyncio.sleep(pause)


async def redfish_get(client: httpx.AsyncClient, url: str) -> None:
    response = await client.get(url)
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}")


async def start_peers(work: Path) -> Peers:
    nats = NatsServer(work / "nats")
    await nats.start()
    ipmi = {"qemu-bmc": free_udp_port(), "ipmi_sim": free_udp_port()}
    redfish_port = free_tcp_port()
    config = work / "abuse.toml"
    config.write_text(f'runtime_dir = "{work / "rt"}"\n[redfish]\nlisten = "127.0.0.1:{redfish_port}"\n'
                      f'[vm.b1]\ncmd = ["-machine", "q35", "-accel", "tcg", "-m", "64", "-display", "none", '
                      f'"-nodefaults"]\nipmi = "127.0.0.1:{ipmi["qemu-bmc"]}"\n')
    commands = {name: [sys.executable, "-m", module, "--nats", nats.url, "--config", str(config), "--log-level",
                       "ERROR", *(["--stop-vms-on-exit"] if name == "machine" else [])]
                for name, module in MODULES.items()}
    commands["ipmi_sim"] = ipmi_sim_argv(work, ipmi["ipmi_sim"], USER, PASSWORD)
    peers = Peers(nats, ipmi, f"https://127.0.0.1:{redfish_port}/redfish/v1/Systems/b1", commands)
    try:
        for name in commands:
            peers.spawn(name)
        for name, port in ipmi.items():
            if await until(lambda port=port: login(port), 30) is None:
                raise RuntimeError(f"{name} does not answer IPMI on port {port}")
        async with httpx.AsyncClient(verify=False, headers={"Authorization": AUTHORIZATION}, timeout=5) as client:
            if await until(lambda: redfish_get(client, peers.redfish), 30) is None:
                raise RuntimeError(f"{peers.redfish} does not answer")
    except BaseException:
        peers.stop()
        await nats.stop()
        raise
    return peers


# ---------------------------------------------------------------------------------------- IPMI flood


class _Flood(asyncio.DatagramProtocol):
    """The attacker's socket: answers to its Open Sessions and RAKP 1s queue its next packets."""

    def __init__(self, attack: str) -> None:
        self.attack = attack
        self.follow_ups: list[bytes] = []
        self.bmc_ids: dict[bytes, int] = {}
        """Session ids of the handshakes under way, by console id (RAKP 2 carries only the latter)."""
        self.received: Counter[str] = Counter()
        self.started = 0

    def next_packet(self) -> tuple[str, bytes]:
        if self.follow_ups:
            payload = self.follow_ups.pop(0)
            return ("RAKP 1" if payload[0] == 1 else "bogus RAKP 3"), framing.build_v20(
                framing.PAYLOAD_RAKP1 if payload[0] == 1 else framing.PAYLOAD_RAKP3, 0, 0, payload)
        self.started += 1
        handshake = self.attack == "bogus-rakp3" or (self.attack == "both" and self.started % 2 == 0)
        # the console id's low bit tells a handshake (followed up) from a bare Open Session
        console_id = struct.pack("<I", (self.started << 1) | handshake)
        proposal = b"".join(bytes([kind, 0, 0, 8, algorithm, 0, 0, 0]) for kind, algorithm in enumerate(SUITE_3))
        return "Open Session", framing.build_v20(framing.PAYLOAD_OPEN_SESSION_REQUEST, 0, 0,
                                                 bytes([0, ADMINISTRATOR_BY_NAME & 0x0F, 0, 0]) + console_id + proposal)

    def datagram_received(self, data: bytes, addr: object) -> None:
        try:
            packet = framing.parse_v20(framing.split_rmcp(data)[1], 0)
        except framing.FrameError:
            self.received["undecodable"] += 1
            return
        payload = packet.payload
        if len(payload) < 2:
            self.received["empty"] += 1
            return
        status, console_id = payload[1], payload[4:8]  # a refusal may stop after the status
        name = {framing.PAYLOAD_OPEN_SESSION_RESPONSE: "Open Session", framing.PAYLOAD_RAKP2: "RAKP 2",
                framing.PAYLOAD_RAKP4: "RAKP 4"}.get(packet.payload_type, f"payload {packet.payload_type:#x}")
        self.received[f"{name} status {status:#04x}"] += 1
        if status != 0:
            self.bmc_ids.pop(console_id, None)
        elif packet.payload_type == framing.PAYLOAD_OPEN_SESSION_RESPONSE and console_id[0] & 1 \
                and len(payload) >= 12:
            if len(self.bmc_ids) > 10000:  # handshakes the BMC never answered
                self.bmc_ids.clear()
            self.bmc_ids[console_id] = struct.unpack("<I", payload[8:12])[0]
            self.follow_ups.append(bytes([1, 0, 0, 0]) + payload[8:12] + os.urandom(16)
                                   + bytes([ADMINISTRATOR_BY_NAME, 0, 0, len(USER)]) + USER.encode())
        elif packet.payload_type == framing.PAYLOAD_RAKP2 and console_id in self.bmc_ids:
            bogus_hmac = os.urandom(20)  # HMAC-SHA1 length, the wrong key
            self.follow_ups.append(bytes([3, 0, 0, 0]) + struct.pack("<I", self.bmc_ids.pop(console_id))
                                   + bogus_hmac)


async def _flood_ipmi(port: int, attack: str, rate: float, start_at: float, stop_at: float) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    flood = _Flood(attack)
    transport, _ = await loop.create_datagram_endpoint(lambda: flood, local_addr=(ATTACKER, 0),
                                                       remote_addr=("127.0.0.1", port))
    sent: Counter[str] = Counter()
    await asyncio.sleep(max(0.0, start_at - time.time()))
    started = time.monotonic()
    count = 0
    while time.time() < stop_at:
        due = int((time.monotonic() - started) * rate)
        while count < due:
            kind, packet = flood.next_packet()
            transport.sendto(packet)
            sent[kind] += 1
            count += 1
        await asyncio.sleep(0.001)
    elapsed = time.monotonic() - started
    await asyncio.sleep(0.5)  # the last answers
    transport.close()
    return {"rate": count / elapsed, "sent": dict(sent), "received": dict(flood.received)}


def flood_ipmi(port: int, attack: str, rate: float, start_at: float, stop_at: float) -> dict[str, object]:
    """The attacker, in its own process (so that it does not share the client's event loop)."""
    return uvloop.run(_flood_ipmi(port, attack, rate, start_at, stop_at))


@dataclass
class Run:
    """What the legitimate client got in one case."""

    latencies: list[float] = field(default_factory=list)
    """ms, of the requests that succeeded."""
    failures: Counter[str] = field(default_factory=Counter)
    recovery: float | None = 0.0
    attacker: dict[str, object] = field(default_factory=dict)
    rss_max: float = 0.0

    @property
    def total(self) -> int:
        return len(self.latencies) + sum(self.failures.values())

    @property
    def success(self) -> float:
        return 100.0 * len(self.latencies) / self.total if self.total else float("nan")


async def paced(call: Callable[[], Awaitable[object]], rate: float, seconds: float, start_at: float) -> Run:
    """``call`` ``rate`` times a second for ``seconds`` from ``start_at`` (wall clock), whatever
    the earlier calls are doing (an open loop: a slow answer does not slow the pace)."""
    run = Run()

    async def one(when: float) -> None:
        await asyncio.sleep(max(0.0, when - time.time()))
        started = time.perf_counter()
        try:
            await call()
        except Exception as exc:
            run.failures[reason(exc)] += 1
            return
        run.latencies.append((time.perf_counter() - started) * 1000)

    await asyncio.gather(*(one(start_at + index / rate) for index in range(int(rate * seconds))))
    return run


async def ipmi_case(port: int, attack: str | None, arguments: argparse.Namespace) -> Run:
    start_at = time.time() + 2.0  # the attacker process's start-up
    if attack is None:
        return await paced(lambda: login(port), arguments.login_rate, arguments.seconds, start_at)
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(1) as pool:
        attacker = loop.run_in_executor(pool, flood_ipmi, port, attack, arguments.packet_rate, start_at,
                                        start_at + WARM_UP + arguments.seconds + 0.5)
        run = await paced(lambda: login(port), arguments.login_rate, arguments.seconds, start_at + WARM_UP)
        run.attacker = await attacker
    run.recovery = await until(lambda: login(port), arguments.recovery, pause=0.5)
    return run


# ---------------------------------------------------------------------------------------- Redfish flood


def flood_redfish(url: str, mib: int, start_at: float, stop_at: float) -> dict[str, object]:
    """One client POSTing oversized JSON bodies, unauthenticated, one after the other."""
    body = b'{"UserName": "' + b"a" * (mib << 20) + b'", "Password": "x"}'
    answers: Counter[str] = Counter()
    time.sleep(max(0.0, start_at - time.time()))
    started = time.monotonic()
    with httpx.Client(verify=False, timeout=60) as client:
        while time.time() < stop_at:
            try:
                response = client.post(url, content=body, headers={"Content-Type": "application/json"})
                answers[f"HTTP {response.status_code}"] += 1
            except httpx.HTTPError as exc:
                answers[type(exc).__name__] += 1
    count = sum(answers.values())
    return {"rate": count / (time.monotonic() - started), "sent": {f"{mib} MiB POST": count},
            "received": dict(answers)}


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


async def redfish_case(peers: Peers, attack: bool, arguments: argparse.Namespace) -> Run:
    start_at = time.time() + 2.0
    sessions = peers.redfish.split("/Systems/")[0] + "/SessionService/Sessions"
    loop = asyncio.get_running_loop()
    rss = [rss_mib(peers.processes["redfish"].pid)]
    watching = True

    async def watch_memory() -> None:
        while watching:
            rss.append(rss_mib(peers.processes["redfish"].pid))
            await asyncio.sleep(0.25)

    watcher = asyncio.ensure_future(watch_memory())
    # a few keep-alive connections, as a management client keeps: a GET that finds them all busy
    # waits for one (the wait counts), rather than adding TLS handshakes to a server that is behind
    async with httpx.AsyncClient(verify=False, headers={"Authorization": AUTHORIZATION},
                                 timeout=httpx.Timeout(10.0, pool=60.0),
                                 limits=httpx.Limits(max_connections=GET_CONNECTIONS)) as client:
        # a connection made before the measurement: the TLS handshake is not what is measured
        await redfish_get(client, peers.redfish)
        get = paced(lambda: redfish_get(client, peers.redfish), arguments.get_rate, arguments.seconds,
                    start_at + WARM_UP)
        if attack:
            with ProcessPoolExecutor(1) as pool:
                attacker = loop.run_in_executor(pool, flood_redfish, sessions, arguments.body_mib, start_at,
                                                start_at + WARM_UP + arguments.seconds)
                run = await get
                run.attacker = await attacker
            run.recovery = await until(lambda: redfish_get(client, peers.redfish), arguments.recovery)
        else:
            run = await get
    watching = False
    await watcher
    run.rss_max = max(rss)
    run.attacker["rss"] = (rss[0], rss_mib(peers.processes["redfish"].pid))
    return run


# ---------------------------------------------------------------------------------------- report


def attacker_line(run: Run) -> str:
    attacker = run.attacker
    sent = ", ".join(f"{count} {kind}" for kind, count in sorted(attacker["sent"].items()))  # type: ignore[union-attr]
    received = ", ".join(f"{count} {kind}" for kind, count in
                         sorted(attacker["received"].items()))  # type: ignore[union-attr]
    return f"{attacker['rate']:.0f}/s; sent {sent}; answers: {received or 'none'}"


def figure(value: float, digits: int = 2) -> str:
    return "-" if value != value else f"{value:.{digits}f}"  # NaN: nothing succeeded


def ratio(run: Run, other: Run) -> float:
    return percentile(run.latencies, 0.99) / percentile(other.latencies, 0.99)


def row(name: str, case: str, run: Run, quiet: Run, deadline: float) -> str:
    p50 = statistics.median(run.latencies) if run.latencies else float("nan")
    failures = ", ".join(f"{count} {why}" for why, count in run.failures.most_common()) or "-"
    recovery = "-" if run is quiet else f"not within {deadline:g} (restarted)" if run.recovery is None \
        else f"{run.recovery:.1f}"
    return (f"| {name} | {case} | {run.total} | {run.success:.1f} | {figure(p50)} | "
            f"{figure(percentile(run.latencies, 0.99))} | {figure(ratio(run, quiet))} | {failures} | {recovery} |")


def verdict(run: Run, quiet: Run) -> str:
    return "met" if run.success == 100.0 and ratio(run, quiet) <= 3.0 else "**not met**"


async def main(arguments: argparse.Namespace) -> None:
    attacks = [attack for attack in arguments.attacks.split(",") if attack]
    unknown = set(attacks) - set(ATTACKS)
    if unknown:
        raise SystemExit(f"unknown attack {sorted(unknown)[0]!r} (known: {', '.join(ATTACKS)})")
    work = Path(tempfile.mkdtemp(prefix="qb-abuse-", dir="/tmp"))
    peers = await start_peers(work)
    try:
        ipmi: dict[tuple[str, str], Run] = {}
        for attack in [None, *attacks]:  # each case against each BMC in turn, so that noise hits both
            for name, port in peers.ipmi.items():
                print(f"IPMI {name}: {attack or 'quiet'} ...", file=sys.stderr, flush=True)
                ipmi[name, attack or "quiet"] = await ipmi_case(port, attack, arguments)
                if ipmi[name, attack or "quiet"].recovery is None:
                    print(f"{name} has not recovered from {attack}: restarting it", file=sys.stderr, flush=True)
                    await peers.restart(name)
        redfish: dict[str, Run] = {}
        if arguments.body_mib:
            for case in ("quiet", "oversized POST"):
                print(f"Redfish: {case} ...", file=sys.stderr, flush=True)
                redfish[case] = await redfish_case(peers, case != "quiet", arguments)
    finally:
        peers.stop()
        await peers.nats.stop()
    print(f"IPMI: {arguments.login_rate:g} legitimate full logins/s for {arguments.seconds:g} s from {LEGITIMATE} "
          f"(cipher suite 3, one try, 2 s time-out per packet); the flood: {arguments.packet_rate:g} packets/s from "
          f"{ATTACKER}, from {WARM_UP:g} s before the first login to the last\n")
    print("| BMC | attack | logins | succeeded % | p50 ms | p99 ms | p99 / quiet p99 | failures | recovery s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (name, case), run in ipmi.items():
        print(row(name, case, run, ipmi[name, "quiet"], arguments.recovery))
    print()
    for attack in attacks:
        ours, sim = ipmi["qemu-bmc", attack], ipmi["ipmi_sim", attack]
        print(f"- {attack}: target (100 % and p99 <= 3x quiet) qemu-bmc {verdict(ours, ipmi['qemu-bmc', 'quiet'])}, "
              f"ipmi_sim {verdict(sim, ipmi['ipmi_sim', 'quiet'])}; success qemu-bmc {ours.success:.1f} % vs "
              f"ipmi_sim {sim.success:.1f} %; p99 qemu-bmc/ipmi_sim "
              f"{figure(ratio(ours, sim))}x")
        for name, run in (("qemu-bmc", ours), ("ipmi_sim", sim)):
            print(f"  - attacker against {name}: {attacker_line(run)}")
    if redfish:
        quiet, attacked = redfish["quiet"], redfish["oversized POST"]
        print(f"\nRedfish (HTTPS): GET ComputerSystem {arguments.get_rate:g}/s for {arguments.seconds:g} s "
              f"(Basic, {GET_CONNECTIONS} keep-alive connections); the attacker: one client POSTing "
              f"{arguments.body_mib} MiB JSON bodies to SessionService/Sessions in a loop\n")
        print("| BMC | attack | GETs | succeeded % | p50 ms | p99 ms | p99 / quiet p99 | failures | recovery s "
              "| Redfish RSS start / max / end MiB |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for case, run in redfish.items():
            start, end = run.attacker["rss"]  # type: ignore[misc]
            memory = f"{start:.0f} / {run.rss_max:.0f} / {end:.0f}"
            print(f"{row('qemu-bmc', case, run, quiet, arguments.recovery)} {memory} |")
        print(f"\n- target (100 % and p99 <= 3x quiet): {verdict(attacked, quiet)}")
        print(f"  - attacker: {attacker_line(attacked)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="measured seconds per case")
    parser.add_argument("--login-rate", type=float, default=5.0, help="legitimate IPMI logins a second")
    parser.add_argument("--packet-rate", type=float, default=1000.0, help="the IPMI flood's packets a second")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help=f"IPMI floods, of: {', '.join(ATTACKS)}")
    parser.add_argument("--get-rate", type=float, default=50.0, help="legitimate Redfish GETs a second")
    parser.add_argument("--body-mib", type=int, default=64, help="size of the attacker's POST bodies; 0: no Redfish")
    parser.add_argument("--recovery", type=float, default=90.0,
                        help="seconds to wait, after a flood, for the first legitimate login")
    uvloop.run(main(parser.parse_args()))
