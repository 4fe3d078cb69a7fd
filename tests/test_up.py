"""`qemu-bmc up` starts and stops the whole tree; the CLI drives machines through the bus."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import nats
import pytest
from conftest import toml_list, wait_for, write_config
from guest_images import GuestImages
from processes import processes_with

QEMU_BMC = [sys.executable, "-m", "qemu_bmc"]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*QEMU_BMC, *args], capture_output=True, text=True, timeout=90,
                          env={**os.environ, **(env or {})})


async def start_up(*args: str, env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    output = log.open("wb")
    process = await asyncio.create_subprocess_exec(*QEMU_BMC, "up", *args, stdout=output, stderr=output,
                                                   env={**os.environ, **env})
    await wait_for(lambda: "qemu-bmc is up" in log.read_text(), timeout=90, message="qemu-bmc up")
    return process


async def test_up_runs_and_stops_the_whole_tree(short_dir: Path, images: GuestImages):
    config = write_config(short_dir, f"[vm.n1]\ncmd = {toml_list(images.qemu_args(nic=False))}\n")
    c = ["-c", str(config)]
    up = await start_up(*c, env={}, log=short_dir / "up.log")
    runtime = short_dir / "rt"
    try:
        url = (runtime / "nats.url").read_text().strip()
        assert url.startswith("nats://") and (runtime / "nats.url").stat().st_mode & 0o777 == 0o600
        nats_pids = processes_with(str(runtime / "nats"))
        assert nats_pids, "the embedded nats-server runs"
        # the bus takes only clients with the token, and the token is on no command line
        token = url.split("//", 1)[1].split("@", 1)[0]
        without_token = "nats://" + url.split("@", 1)[1]
        with pytest.raises(Exception, match=r"(?i)authorization"):
            await nats.connect(without_token, max_reconnect_attempts=0, allow_reconnect=False)
        for pid in processes_with(""):
            assert token.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()

        def services_up() -> bool:
            result = cli("services", "--json", *c)
            names = {service["name"] for service in json.loads(result.stdout or "[]")}
            return {"qemu-bmc-machine", "qemu-bmc-state"} <= names

        await wait_for(services_up, timeout=20, message="both services on the bus")
        assert "n1: Off" in cli("power", "status", "n1", *c).stdout
        on = json.loads(cli("power", "on", "n1", "--json", *c).stdout)
        assert on["state"] == "On" and on["pid"]
        boot = json.loads(cli("boot", "n1", "--target", "cd", "--once", "--json", *c).stdout)
        assert boot == {"target": "Cd", "enabled": "Once", "mode": "Legacy",
                        "alias": None, "boot_next": None, "uefi_target": None}
        media = json.loads(cli("media", "insert", "n1", str(images.iso), "--json", *c).stdout)
        assert media["inserted"] and media["image"] == str(images.iso)
        missing = cli("power", "status", "ghost", "--json", *c)
        assert missing.returncode == 1 and json.loads(missing.stdout)["error"] == "unknown_machine"

        # a service that dies is restarted, and adopts the running VM
        machine_pids = processes_with("qemu_bmc_machine", str(config))
        assert len(machine_pids) == 1
        os.kill(machine_pids[0], signal.SIGKILL)
        await wait_for(lambda: processes_with("qemu_bmc_machine", str(config)) not in ([], machine_pids), timeout=15,
                       message="machine service restarted")
        await wait_for(lambda: json.loads(cli("power", "status", "n1", "--json", *c).stdout or "{}").get("pid")
                       == on["pid"], timeout=20, message="the running VM adopted")
    finally:
        up.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(up.wait(), 60)
    assert code == 0, (short_dir / "up.log").read_text()
    assert processes_with("qemu_bmc_machine", str(config)) == [] and processes_with("qemu_bmc_state", str(config)) == []
    assert not any(pid in processes_with(str(runtime / "nats")) for pid in nats_pids)
    assert processes_with(str(runtime / "vm" / "n1" / "qmp.sock")) == [], "the managed VM was stopped"
    assert not (runtime / "nats.url").exists()
