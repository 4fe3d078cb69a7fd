"""`qemu-bmc up`: the whole tree on one machine, each service its own child process.

Starts an embedded nats-server with JetStream (unless ``--nats`` names one), then every
service; restarts a child that dies; on Ctrl-C or SIGTERM stops them all, NATS last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import sys
from pathlib import Path

from qemu_bmc_shared.config import Config
from qemu_bmc_shared.service import NATS_URL_FILE

from .natsserver import NatsServer

log = logging.getLogger("qemu-bmc")
RESTART_DELAYS = (0.5, 1, 2, 5, 10)
STOP_TIMEOUT = 20.0


class Child:
    """A service process that is restarted when it dies. The NATS URL, which may hold a token,
    goes in its environment (readable by its owner only), not on its command line."""

    def __init__(self, name: str, argv: list[str], nats_url: str, log_dir: Path) -> None:
        self.name, self.argv, self.log_dir = name, argv, log_dir
        self.env = {**os.environ, "NATS_URL": nats_url}
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.stopping = False

    async def start(self) -> None:
        with (self.log_dir / f"{self.name}.log").open("ab") as output:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=output, env=self.env,
                start_new_session=True)

    async def supervise(self) -> None:
        while not self.stopping:
            assert self.process is not None
            code = await self.process.wait()
            if self.stopping:
                return
            delay = RESTART_DELAYS[min(self.restarts, len(RESTART_DELAYS) - 1)]
            self.restarts += 1
            log.warning("%s exited with %s; restarting in %s s (see %s)", self.name, code, delay,
                        self.log_dir / f"{self.name}.log")
            await asyncio.sleep(delay)
            if not self.stopping:
                await self.start()

    async def stop(self) -> None:
        self.stopping = True
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()


def service_argv(module: str, config_path: Path | None, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", module]
    if config_path is not None:
        argv += ["--config", str(config_path)]
    return argv + list(extra)


def describe(config: Config, nats_address: str, log_dir: Path) -> str:
    lines = [f"qemu-bmc is up.  NATS: {nats_address} (URL with its token in {config.runtime_dir / NATS_URL_FILE})",
             f"  logs: {log_dir}"]
    for vm in config.vms.values():
        where = f"QMP {vm.runtime_dir / 'qmp.sock'}, serial {vm.runtime_dir / 'serial.log'}" \
            if vm.mode == "managed" else f"QMP {vm.qmp}" + (f", serial {vm.serial}" if vm.serial else "")
        lines.append(f"  machine {vm.name} ({vm.mode}): {where}")
        if vm.ipmi:
            lines.append(f"    IPMI over LAN: udp {vm.ipmi[0]}:{vm.ipmi[1]}")
        if vm.vmwire:
            lines.append(f"    VM wire address {vm.vmwire[0]}:{vm.vmwire[1]} (its service is not built yet)")
    host, port = config.redfish.listen
    lines.append(f"  Redfish {'https' if config.redfish.tls else 'http'}://{host}:{port}/redfish/v1/")
    lines.append("Try: qemu-bmc power status " + (config.machine_names[0] if config.vms else "NAME"))
    lines.append("Ctrl-C stops everything.")
    return "\n".join(lines)


def nats_token(runtime: Path) -> str:
    """The embedded nats-server's token, made at the first start and kept (0600)."""
    path = runtime / "nats" / "token"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(24))
    return path.read_text().strip()


async def up(config: Config, nats_url: str | None, keep_vms: bool, stop: asyncio.Event) -> None:
    runtime = config.runtime_dir
    log_dir = runtime / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    nats: NatsServer | None = None
    nats_address = re.sub(r"//[^@/]*@", "//", nats_url or "")  # never print credentials
    if nats_url is None:
        nats = NatsServer(runtime / "nats", token=nats_token(runtime))
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
    if any(vm.ipmi for vm in config.vms.values()):
        children.append(Child("ipmi-lan", service_argv("qemu_bmc_ipmi_lan", config.path), nats_url, log_dir))
    children.append(Child("redfish", service_argv("qemu_bmc_redfish", config.path), nats_url, log_dir))
    if any(vm.vmwire for vm in config.vms.values()):
        # before the machine service, so that QEMU finds its BMC when it starts
        children.insert(1, Child("vmwire", service_argv("qemu_bmc_vmwire", config.path), nats_url, log_dir))
    supervisors = []
    try:
        for child in children:
            await child.start()
            supervisors.append(asyncio.create_task(child.supervise()))
        print(describe(config, nats_address, log_dir), flush=True)
        nats_watch = asyncio.create_task(nats.process.wait()) if nats and nats.process else None
        stop_wait = asyncio.create_task(stop.wait())
        while not stop.is_set():
            waiting = {stop_wait} | ({nats_watch} if nats_watch else set())
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if nats and nats_watch and nats_watch.done() and not stop.is_set():
                log.warning("nats-server exited; restarting it on port %d", nats.port)
                await nats.start()
                nats_watch = asyncio.create_task(nats.process.wait())  # type: ignore[union-attr]
    finally:
        print("qemu-bmc: stopping", flush=True)
        await asyncio.gather(*(child.stop() for child in reversed(children)))
        for task in supervisors:
            task.cancel()
        if nats:
            await nats.stop()
        with contextlib.suppress(OSError):
            (runtime / NATS_URL_FILE).unlink()
