"""`qemu-bmc up`: the whole tree on one machine, each service its own child process.

Holds a lock on its runtime directory (one `up` per directory); starts an embedded nats-server
with JetStream (unless ``--nats`` names one), then every service; restarts a child that dies;
prints what serves where once the services have announced themselves on the bus; on Ctrl-C or
SIGTERM stops them in order: the front-ends, then the machine and state services, NATS last.

Every child ends with the launcher, even when the launcher is killed with SIGKILL
(``PR_SET_PDEATHSIG``); the QEMU processes the machine service started do not (they are the
machines): the next `up` on the same runtime directory adopts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import logging
import os
import secrets
import shlex
import shutil
import signal
import sys
from pathlib import Path
from typing import IO, Any

from qemu_bmc_shared import bus
from qemu_bmc_shared.bus import BusUnreachable
from qemu_bmc_shared.config import DEFAULT_PASSWORD, Config
from qemu_bmc_shared.discovery import service_infos, unserved
from qemu_bmc_shared.launcher import wait_exit
from qemu_bmc_shared.service import NATS_URL_FILE

from .natsserver import NatsServer
from .parent_death import die_with_parent

log = logging.getLogger("qemu-bmc")
RESTART_DELAYS = (0.5, 1, 2, 5, 10)
STABLE_AFTER = 60.0
"""Seconds after which a running child counts as healthy: its next restart starts again from the
first, short delay."""
STOP_TIMEOUT = 20.0
ANNOUNCE_TIMEOUT = 20.0
"""Seconds to wait for every service to announce itself on the bus before printing the banner."""
LOCK_FILE = "up.lock"
STOP_ORDER = (("redfish", "ipmi-lan", "vmwire"), ("machine",), ("state",))
"""Who stops first: the front-ends (no new requests), then the machine and state services."""
SERVICE_NAMES = {"state": "qemu-bmc-state", "machine": "qemu-bmc-machine", "ipmi-lan": "qemu-bmc-ipmi-lan",
                 "redfish": "qemu-bmc-redfish", "vmwire": "qemu-bmc-vmwire"}


class AlreadyUp(Exception):
    """Another `qemu-bmc up` holds the runtime directory."""


def hold_runtime_lock(runtime: Path) -> IO[str]:
    """Lock ``runtime`` for this process (flock: released by the kernel however the process
    ends, so a crash leaves nothing stale); the lock file names the holder's pid. Keep the file
    open as long as the lock is needed."""
    runtime.mkdir(parents=True, exist_ok=True)
    lock = (runtime / LOCK_FILE).open("a+")  # not truncated before the lock is held
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise AlreadyUp(f"qemu-bmc up already runs on {runtime} (pid {holder})") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def processes_with_argument(argument: str) -> list[int]:
    """The live processes one of whose command-line arguments is ``argument``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if argument.encode() in (entry / "cmdline").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found


async def stop_stray_nats_servers(store: Path) -> None:
    """Stop a nats-server still running on this runtime directory's JetStream store (one the
    launcher that held the lock before left, as a launcher before PR_SET_PDEATHSIG did, or one
    still shutting down): two servers on one store would split the bus in two."""
    for pid in processes_with_argument(str(store)):
        log.warning("a nats-server (pid %d) from an earlier qemu-bmc up still runs on %s: stopping it", pid, store)
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            if await wait_exit(pid, grace):
                break


class Child:
    """A service process that is restarted when it dies, and that dies with the launcher (SIGKILL:
    the machine service must not stop the VMs then). The NATS URL, which may hold a token,
    goes in its environment (readable by its owner only), not on its command line."""

    def __init__(self, name: str, argv: list[str], nats_url: str, log_dir: Path) -> None:
        self.name, self.argv, self.log_dir = name, argv, log_dir
        self.env = {**os.environ, "NATS_URL": nats_url}
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.started_at = 0.0
        self.stopping = False
        self.starting = asyncio.Lock()
        self.supervisor: asyncio.Task[None] | None = None

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    async def start(self) -> None:
        async with self.starting:
            if self.stopping:
                return
            with self.log_path.open("ab") as output:
                self.process = await asyncio.create_subprocess_exec(
                    *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=output, env=self.env,
                    start_new_session=True, preexec_fn=die_with_parent(signal.SIGKILL))
            self.started_at = asyncio.get_running_loop().time()
        if self.supervisor is None:
            self.supervisor = asyncio.create_task(self.supervise())

    async def supervise(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping:
            assert self.process is not None
            code = await self.process.wait()
            if self.stopping:
                return
            if loop.time() - self.started_at >= STABLE_AFTER:
                self.restarts = 0
            delay = RESTART_DELAYS[min(self.restarts, len(RESTART_DELAYS) - 1)]
            self.restarts += 1
            log.warning("%s exited with %s; restarting in %s s (see %s)", self.name, code, delay, self.log_path)
            await asyncio.sleep(delay)
            await self.start()

    async def stop(self) -> None:
        self.stopping = True
        async with self.starting:  # not while it is being started
            process = self.process
        if self.supervisor is not None:
            self.supervisor.cancel()
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            log.warning("%s did not stop within %g s: killing it", self.name, STOP_TIMEOUT)
            process.kill()
            await process.wait()


def service_argv(module: str, config_path: Path | None, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", module]
    if config_path is not None:
        argv += ["--config", str(config_path)]
    return argv + list(extra)


async def announcements(nats_url: str, expected: set[str], stop: asyncio.Event) -> list[dict[str, Any]] | None:
    """What the services announce on the bus, once every one of ``expected`` has (or after
    ANNOUNCE_TIMEOUT seconds); None when the bus cannot be reached."""
    try:
        nc = await bus.connect(nats_url, "qemu-bmc-up", timeout=5)
    except BusUnreachable as exc:
        log.error("%s", exc)
        return None
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ANNOUNCE_TIMEOUT
        while True:
            infos = await service_infos(nc, first=0.5, quiet=0.1)
            if expected <= {info.get("name") for info in infos} or loop.time() > deadline or stop.is_set():
                return infos
            await asyncio.sleep(0.25)
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def describe(config: Config, nats_address: str, log_dir: Path, expected: set[str],
             infos: list[dict[str, Any]] | None) -> str:
    """The banner: where everything is served, and each address that is not (from the services'
    announcements: ``unserved.<kind>.<machine>``)."""
    problems = unserved(infos or [])
    lines = [f"qemu-bmc is up.  NATS: {nats_address} (URL with its token in {config.runtime_dir / NATS_URL_FILE})",
             f"  logs: {log_dir}"]
    if infos is None:
        lines.append(f"  ERROR: the bus at {nats_address} does not answer: see {log_dir}")
    else:
        missing = sorted(expected - {info.get("name") for info in infos})
        if missing:
            lines.append(f"  WARNING: not on the bus after {ANNOUNCE_TIMEOUT:g} s: {', '.join(missing)}"
                         f" (see {log_dir})")
    for vm in config.vms.values():
        where = f"QMP {vm.runtime_dir / 'qmp.sock'}, serial {vm.runtime_dir / 'serial.log'}" \
            if vm.mode == "managed" else f"QMP {vm.qmp}" + (f", serial {vm.serial}" if vm.serial else "")
        lines.append(f"  machine {vm.name} ({vm.mode}): {where}")
        if vm.ipmi:
            problem = problems.pop(f"ipmi.{vm.name}", None)
            lines.append(f"    ERROR: IPMI over LAN {problem}" if problem else
                         f"    IPMI over LAN: udp {vm.ipmi[0]}:{vm.ipmi[1]}")
        if vm.vnc:
            problem = problems.pop(f"vnc.{vm.name}", None)
            lines.append(f"    ERROR: VNC listener {problem}" if problem else
                         f"    VNC listener: tcp {vm.vnc[0]}:{vm.vnc[1]} (password: vnc_password)")
        if vm.inband and vm.mode == "managed":
            lines.append("    in-band IPMI (KCS): over the bus")
        elif vm.vmwire:
            problem = problems.pop(f"vmwire.{vm.name}", None)
            lines.append(f"    ERROR: VM wire {problem}" if problem else
                         f"    VM wire: tcp {vm.vmwire[0]}:{vm.vmwire[1]}")
    host, port = config.redfish.listen
    problem = problems.pop("redfish", None)
    lines.append(f"  ERROR: Redfish {problem}" if problem else
                 f"  Redfish {'https' if config.redfish.tls else 'http'}://{host}:{port}/redfish/v1/")
    lines += [f"  ERROR: {what} {why}" for what, why in sorted(problems.items())]
    lines += try_lines(config)
    lines.append("Ctrl-C stops everything.")
    return "\n".join(lines)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # every address ("", "*"), or a host name
        return False


def exposed_listeners(config: Config) -> list[str]:
    """The listeners other hosts may reach (not on a loopback address): Redfish's and each
    machine's IPMI over LAN address."""
    host, port = config.redfish.listen
    exposed = [] if is_loopback(host) else [f"Redfish {host}:{port}"]
    return exposed + [f"IPMI over LAN of {vm.name} {vm.ipmi[0]}:{vm.ipmi[1]}" for vm in config.vms.values()
                      if vm.ipmi and not is_loopback(vm.ipmi[0])]


def warn_if_exposed(config: Config) -> None:
    """A WARNING (once, at start) when a listener other hosts may reach serves the default
    password: the first administrator's is IPMI_PASS's, "password" when it is not set."""
    exposed = exposed_listeners(config)
    if exposed and config.state.default_password == DEFAULT_PASSWORD:
        log.warning("%s listen%s beyond this machine while IPMI_PASS is not set: the first administrator (%s) has "
                    "the default password; set IPMI_PASS before the first start, or change the password (ipmitool "
                    "user set password, or Redfish's AccountService)", ", ".join(exposed),
                    "s" if len(exposed) == 1 else "", config.state.default_user)


def client_host(host: str) -> str:
    """The address a client on this machine uses for a listener on ``host``."""
    if host in ("", "*", "0.0.0.0"):
        return "127.0.0.1"
    return "::1" if host == "::" else host


def cli_name() -> str:
    """This qemu-bmc as a shell runs it: its name when PATH finds this one, else its path."""
    script = Path(sys.executable).parent / "qemu-bmc"
    if not script.exists():
        return "qemu-bmc"
    found = shutil.which("qemu-bmc")
    return "qemu-bmc" if found and Path(found).resolve() == script.resolve() else shlex.quote(str(script))


def try_lines(config: Config) -> list[str]:
    """Commands to paste: IPMI, Redfish, the serial and graphical consoles, a VNC viewer, the CLI.
    The default password is printed; one set through IPMI_PASS is not (the lines read the variable
    instead); a VNC listener's password is the config's vnc_password, never printed."""
    user = config.state.default_user
    default = config.state.default_password == DEFAULT_PASSWORD
    in_quotes = "".join("\\" + char if char in '"$`\\' else char for char in user)
    ipmi_password = DEFAULT_PASSWORD if default else '"$IPMI_PASS"'
    credentials = shlex.quote(f"{user}:{DEFAULT_PASSWORD}") if default else f'"{in_quotes}:$IPMI_PASS"'
    machine = config.machine_names[0] if config.vms else None
    lines = ["Try:" if default else f"Try (IPMI_PASS holds {user}'s password: export it where you paste these):"]
    with_ipmi = [vm for name in config.machine_names if (vm := config.vms[name]).ipmi]
    if with_ipmi:
        host, port = with_ipmi[0].ipmi  # type: ignore[misc]
        lines.append(f"  ipmitool -I lanplus -H {client_host(host)} -p {port} -U {shlex.quote(user)} "
                     f"-P {ipmi_password} power status")
    host, port = config.redfish.listen
    host = client_host(host)
    base = f"{'https' if config.redfish.tls else 'http'}://{f'[{host}]' if ':' in host else host}:{port}"
    lines.append(f"  curl {'-k ' if config.redfish.tls else ''}-u {credentials} {base}/redfish/v1/Systems"
                 + (f"/{machine}" if machine else ""))
    if machine:
        lines.append(f"  console: {base}/console/{machine}")
        if config.vms[machine].mode == "managed" or config.vms[machine].vnc_socket:
            lines.append(f"  kvm: {base}/kvm/{machine}")
    with_vnc = [vm for name in config.machine_names if (vm := config.vms[name]).vnc]
    if with_vnc:
        host, port = with_vnc[0].vnc  # type: ignore[misc]
        lines.append(f"  vncviewer {client_host(host)}::{port}")
    config_option = f" -c {shlex.quote(str(config.path))}" if config.path else ""
    lines.append(f"  {cli_name()} power status {machine or 'NAME'}{config_option}")
    return lines


def nats_token(runtime: Path) -> str:
    """The embedded nats-server's token, made at the first start and kept (0600)."""
    path = runtime / "nats" / "token"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(24))
    return path.read_text().strip()


async def up(config: Config, nats_url: str | None, keep_vms: bool, stop: asyncio.Event) -> None:
    """Run the tree until ``stop`` is set. The caller holds the runtime directory's lock."""
    runtime = config.runtime_dir
    log_dir = runtime / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    nats: NatsServer | None = None
    nats_address = bus.without_credentials(nats_url or "")  # never print credentials
    warn_if_exposed(config)
    if nats_url is None:
        nats = NatsServer(runtime / "nats", token=nats_token(runtime), owned=True)
        await stop_stray_nats_servers(nats.directory / "jetstream")
        await nats.start()
        nats_url, nats_address = nats.url, nats.address
    url_file = runtime / NATS_URL_FILE
    url_file.touch(mode=0o600)
    url_file.write_text(nats_url + "\n")

    machine_extra = [] if keep_vms else ["--stop-vms-on-exit"]
    children = [
        Child("state", service_argv("qemu_bmc_state", config.path), nats_url, log_dir),
        Child("machine", service_argv("qemu_bmc_machine", config.path, *machine_extra), nats_url, log_dir),
    ]
    if any(vm.ipmi or vm.vnc for vm in config.vms.values()):  # it serves the VNC listeners too
        children.append(Child("ipmi-lan", service_argv("qemu_bmc_ipmi_lan", config.path), nats_url, log_dir))
    children.append(Child("redfish", service_argv("qemu_bmc_redfish", config.path), nats_url, log_dir))
    if any(vm.inband for vm in config.vms.values()):
        # before the machine service, so that QEMU finds its BMC when it starts
        children.insert(1, Child("vmwire", service_argv("qemu_bmc_vmwire", config.path), nats_url, log_dir))
    try:
        for child in children:
            await child.start()
        expected = {SERVICE_NAMES[child.name] for child in children}
        infos = await announcements(nats_url, expected, stop)
        print(describe(config, nats_address, log_dir, expected, infos), flush=True)
        nats_watch = asyncio.create_task(nats.process.wait()) if nats and nats.process else None
        stop_wait = asyncio.create_task(stop.wait())
        while not stop.is_set():
            waiting = {stop_wait} | ({nats_watch} if nats_watch else set())
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if nats and nats_watch and nats_watch.done() and not stop.is_set():
                log.warning("nats-server exited; restarting it on port %d", nats.port)
                try:
                    await nats.start()
                except (RuntimeError, OSError) as exc:
                    log.error("nats-server did not start again (%s); trying again in 1 s", exc)
                    nats_watch = asyncio.create_task(asyncio.sleep(1))
                    continue
                nats_watch = asyncio.create_task(nats.process.wait())  # type: ignore[union-attr]
    finally:
        print("qemu-bmc: stopping", flush=True)
        by_name = {child.name: child for child in children}
        for group in STOP_ORDER:
            stopping = [by_name[name] for name in group if name in by_name]
            await asyncio.gather(*(child.stop() for child in stopping))
            if stopping:
                log.info("stopped %s", ", ".join(child.name for child in stopping))
        if nats:
            await nats.stop()
            log.info("stopped nats-server")
        with contextlib.suppress(OSError):
            (runtime / NATS_URL_FILE).unlink()
